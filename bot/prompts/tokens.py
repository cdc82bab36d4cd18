"""The token budget: count with the served model's own CLIP tokenizer, so the count is exact."""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bot.errors import ModelError

MAX_TOKENS = 75  # CLIP reads 77 ids; the start and end ids take two.


class Tokenizer(Protocol):
    """What the checker needs of a tokenizer; transformers' CLIPTokenizer has both methods."""

    def encode(self, text: str, text_pair: None = None, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str | list[str]: ...


@dataclass(frozen=True, slots=True)
class TokenCount:
    tokens: int
    overflow: str  # the text past the budget, as the tokenizer reads it; empty when it fits


# CLIP's pre-tokenizer split, for text that is printable ASCII once lowercased: there \p{L} is [a-z] and
# \p{N} is [0-9], and the only whitespace is the space.
_ASCII_PIECES = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")
_CACHE_LIMIT = 200_000


class _Counter:
    """Count like the tokenizer, faster: BPE works word by word, so each word's count is looked up once."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._pieces: dict[str, int] = {}

    def ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def count(self, text: str) -> int:
        # CLIP lowercases, then splits into words and punctuation runs that BPE encodes independently, so the
        # count is the sum of the words' counts. Anything but printable ASCII goes through the tokenizer itself.
        if not (text.isascii() and text.isprintable()):
            return len(self.ids(text))
        if len(self._pieces) > _CACHE_LIMIT:
            self._pieces.clear()
        total = 0
        for piece in _ASCII_PIECES.findall(text.lower()):
            count = self._pieces.get(piece)
            if count is None:
                count = self._pieces[piece] = len(self.ids(piece))
            total += count
        return total


_COUNTERS: dict[int, _Counter] = {}  # by id(tokenizer); the counter holds the tokenizer, so ids are not reused


def count_tokens(tokenizer: Tokenizer, text: str, max_tokens: int = MAX_TOKENS) -> TokenCount:
    """Count the content tokens of ``text`` exactly as ``tokenizer`` does; say what falls past ``max_tokens``."""
    counter = _COUNTERS.get(id(tokenizer))
    if counter is None:
        counter = _COUNTERS[id(tokenizer)] = _Counter(tokenizer)
    tokens = counter.count(text)
    if tokens <= max_tokens:
        return TokenCount(tokens=tokens, overflow="")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Offsets point into the text as written, so the user sees their own words, not decoded tokens.
        encoding = backend.encode(text, add_special_tokens=False)
        return TokenCount(tokens=len(encoding.ids), overflow=text[encoding.offsets[max_tokens][0] :].strip(" ,"))
    ids = counter.ids(text)
    return TokenCount(tokens=len(ids), overflow=str(tokenizer.decode(ids[max_tokens:])).strip())


def load_tokenizer(model: str | None = None) -> Tokenizer:
    """Load a model's CLIP tokenizer (hub id or folder), or the bundled CLIP ViT-L/14 one when ``model`` is None."""
    from transformers import CLIPTokenizer

    if model is None:
        from bot.engine._tokenizer import write_clip_tokenizer

        with tempfile.TemporaryDirectory(prefix="sygil-clip-") as folder:
            try:
                write_clip_tokenizer(Path(folder))
            except FileNotFoundError as exc:
                raise ModelError(f"No bundled CLIP vocabulary: {exc}; or name a model with --model") from None
            return CLIPTokenizer.from_pretrained(folder)
    local = Path(model).expanduser()
    subfolder = "tokenizer" if (local / "tokenizer").is_dir() or not local.exists() else ""
    try:
        return CLIPTokenizer.from_pretrained(str(local) if local.exists() else model, subfolder=subfolder)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"Cannot load the tokenizer of model {model!r}: {first}") from None
