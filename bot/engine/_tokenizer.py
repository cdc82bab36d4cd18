"""Write the real CLIP ViT-L/14 tokenizer files from the BPE vocabulary bundled with open-clip-torch."""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# OpenAI CLIP keeps the first 49152 - 256 - 2 merges, so that with the 512 byte tokens and the two
# special tokens the vocabulary is exactly 49408 entries.
_MERGE_COUNT = 49152 - 256 - 2
VOCAB_SIZE = 49408
MODEL_MAX_LENGTH = 77
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode character, as OpenAI CLIP and GPT-2 do."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes), strict=True))


def _bpe_path() -> Path:
    """Return the path of open_clip's BPE vocabulary without importing open_clip."""
    # importlib.resources.files("open_clip") would import the package, and open_clip's __init__ needs
    # torchvision, which is deliberately not installed (it drags in a CUDA torch); find_spec does not import.
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{_BPE_FILE} not found: install open-clip-torch with `pip install --no-deps`")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _BPE_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{_BPE_FILE} is missing from the installed open_clip package")


def write_clip_tokenizer(folder: Path) -> None:
    """Write vocab.json, merges.txt and the two config files of the CLIP tokenizer into folder."""
    lines = gzip.decompress(_bpe_path().read_bytes()).decode("utf-8").split("\n")
    # Line 0 is the "#version" header, exactly what transformers skips when it reads merges.txt.
    merges = lines[1 : _MERGE_COUNT + 1]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = [*byte_chars, *(char + "</w>" for char in byte_chars), *("".join(m.split()) for m in merges), BOS, EOS]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"built a CLIP vocabulary of {len(vocab)} entries, expected {VOCAB_SIZE}")

    special = {"content": "", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    special_tokens = {
        "bos_token": {**special, "content": BOS},
        "eos_token": {**special, "content": EOS},
        "pad_token": EOS,
        "unk_token": {**special, "content": EOS},
    }
    config = {
        **special_tokens,
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "tokenizer_class": "CLIPTokenizer",
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), "utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special_tokens, indent=2), "utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), "utf-8")
    log.debug("wrote CLIP tokenizer (%d tokens) to %s", len(vocab), folder)
