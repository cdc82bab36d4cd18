"""The token budget: count with the served model's own CLIP tokenizer, so the count is exact."""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from bot.engine import hub
from bot.engine._tokenizer import VOCAB_SIZE, write_clip_tokenizer
from bot.errors import ModelError

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

log = logging.getLogger(__name__)

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


def load_tokenizer(model: str | None = None, *, revision: str = "main") -> Tokenizer:
    """Load the CLIP tokenizer of ``model`` (hub id or folder), else the bundled CLIP ViT-L/14 one, never another.

    Without a model, the bundled one. A model that cannot be reached or found counts with the bundled one, and a
    warning says so; a folder whose tokenizer is not CLIP's raises ModelError.
    """
    if model is None:
        return _bundled()
    local = Path(model).expanduser()
    if local.is_dir():
        folder = local / "tokenizer" if (local / "tokenizer").is_dir() else local
        try:
            return _checked(_from_pretrained(str(folder)))
        except (OSError, ValueError) as exc:
            raise ModelError(f"Cannot load the tokenizer of model {model!r}: {_first_line(exc)}") from None
    if local.exists() or _looks_like_path(model):
        reason = f"model {model!r} is not a folder"
    else:
        try:
            return _checked(_from_pretrained(hub.snapshot(model, "tokenizer", revision)))
        # Whatever stops it (no network, no such model, a broken download), the bundled vocabulary is CLIP's.
        except Exception as exc:
            if hub.unreachable(exc) and not hub.cached(model, "tokenizer/vocab.json", revision):
                reason = f"{model}: {hub.not_cached_text()}"
            else:
                reason = f"cannot load the tokenizer of {model}: {_first_line(exc)}"
    tokenizer = _bundled(reason)
    log.warning("Counting tokens with the bundled CLIP ViT-L/14 tokenizer: %s", reason)
    return tokenizer


_PROBE, _PROBE_TOKENS = "species:seal", 3  # species, :, seal


def _checked(tokenizer: CLIPTokenizer) -> CLIPTokenizer:
    """Return ``tokenizer`` if it reads like CLIP's; raise ValueError for one built without its vocabulary."""
    # transformers 5 builds a CLIPTokenizer of two entries, silently, from a folder or hub id it found no files in.
    size = len(tokenizer)
    tokens = len(tokenizer.encode(_PROBE, add_special_tokens=False))
    if size < VOCAB_SIZE // 2 or tokens != _PROBE_TOKENS:
        raise ValueError(
            f"it is not a CLIP tokenizer ({size} entries where CLIP has {VOCAB_SIZE}; "
            f"{_PROBE!r} is {tokens} tokens, not {_PROBE_TOKENS})"
        )
    return tokenizer


def _bundled(instead_of: str | None = None) -> CLIPTokenizer:
    """Build the CLIP ViT-L/14 tokenizer from the vocabulary shipped in this package (``instead_of`` the model's)."""
    with tempfile.TemporaryDirectory(prefix="sygil-clip-") as folder:
        try:
            write_clip_tokenizer(Path(folder))
        except FileNotFoundError as exc:
            if instead_of is None:
                raise ModelError(f"No CLIP tokenizer: {exc}") from None
            raise ModelError(f"No tokenizer: {instead_of}; and {exc}") from None
        return _checked(_from_pretrained(folder))


def _from_pretrained(folder: str) -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder)


def _looks_like_path(model: str) -> bool:
    """Tell a local folder from a hub id ("owner/name") when nothing exists at that path."""
    path = Path(model)
    return path.is_absolute() or model.startswith((".", "~")) or "\\" in model or len(path.parts) > 2


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
