"""Write the real CLIP ViT-L/14 tokenizer files from the BPE vocabulary shipped in this package.

``bpe_simple_vocab_16e6.txt.gz`` is OpenAI CLIP's vocabulary, as open_clip ships it (both MIT; the notices are in
``bpe_simple_vocab_16e6.LICENSE`` beside it). It is ours to read with no other package installed.
"""

from __future__ import annotations

import gzip
import importlib.resources
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


def _bpe_bytes() -> bytes:
    """Return the gzipped BPE vocabulary shipped in this package; raise FileNotFoundError if the install lacks it."""
    resource = importlib.resources.files("bot.engine") / _BPE_FILE
    try:
        return resource.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{_BPE_FILE} is missing from the installed bot.engine package: reinstall it") from None


def write_clip_tokenizer(folder: Path) -> None:
    """Write vocab.json, merges.txt and the two config files of the CLIP tokenizer into folder."""
    lines = gzip.decompress(_bpe_bytes()).decode("utf-8").split("\n")
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
