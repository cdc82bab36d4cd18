"""Blocked terms, matched as whole words through case, width, accent, zero-width and lookalike tricks."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

# Letters from other scripts that look like Latin ones, and digits/symbols used as letters.
_LOOKALIKES = str.maketrans(
    {
        # Cyrillic
        "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c",
        "т": "t", "у": "y", "х": "x", "і": "i", "ї": "i", "ј": "j", "ѕ": "s", "ԁ": "d", "ԛ": "q", "ԝ": "w",
        "ɡ": "g", "һ": "h", "ӏ": "l",
        # Greek
        "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "μ": "u", "ν": "v", "ο": "o", "ρ": "p",
        "τ": "t", "υ": "u", "χ": "x", "ω": "w", "ς": "s", "σ": "o",
        # Latin oddities NFKC leaves alone
        "ı": "i", "ł": "l", "ø": "o", "đ": "d", "ħ": "h", "ŀ": "l", "ß": "ss", "æ": "ae", "œ": "oe",
    }
)  # fmt: skip
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i"})
_WORD = re.compile(r"[^\W_]+")
_SINGLE = re.compile(r"(?<![^\W_])[^\W_](?![^\W_])")  # a letter or digit standing alone


def skeleton(text: str) -> str:
    """Fold text to a plain lowercase Latin form: NFKC, case, accents, invisible characters and lookalikes."""
    if text.isascii():
        return text.lower()
    text = unicodedata.normalize("NFKC", text).casefold()
    decomposed = unicodedata.normalize("NFD", text)
    # Drop combining marks (accents stacked on letters) and format characters (zero-width joiners and spaces).
    text = "".join(char for char in decomposed if unicodedata.category(char) not in ("Mn", "Me", "Cf"))
    return text.translate(_LOOKALIKES)


def _words(text: str) -> list[str]:
    words = _WORD.findall(text)
    if not _SINGLE.search(text):
        return words
    # Letters spelled out one by one ("b a d", "b.a.d") are joined back into the word they spell.
    joined: list[str] = []
    run: list[str] = []
    for word in words:
        if len(word) == 1:
            run.append(word)
            continue
        if len(run) > 1:
            joined.append("".join(run))
        run = []
    if len(run) > 1:
        joined.append("".join(run))
    return words + joined


class Blocklist:
    """Terms a server does not allow in prompts; each term (one or more words) must match whole words."""

    def __init__(self, terms: Iterable[str] = ()) -> None:
        self._terms: set[tuple[str, ...]] = set()
        for term in terms:
            words = tuple(_WORD.findall(skeleton(term)))
            if words:
                self._terms.add(words)
        self._single = {words[0] for words in self._terms if len(words) == 1}
        self._phrases: dict[str, list[tuple[str, ...]]] = {}
        for words in self._terms:
            if len(words) > 1:
                self._phrases.setdefault(words[0], []).append(words)

    def __len__(self) -> int:
        return len(self._terms)

    def __bool__(self) -> bool:
        return bool(self._terms)

    def matches(self, text: str) -> bool:
        """Return whether ``text`` contains a blocked term as a word or run of words."""
        if not self._terms:
            return False
        folded = skeleton(text)
        leet = folded.translate(_LEET)
        for variant in (folded, leet) if leet != folded else (folded,):
            words = _words(variant)
            if not self._single.isdisjoint(words):
                return True
            for start, word in enumerate(words):
                for phrase in self._phrases.get(word, ()):
                    if tuple(words[start : start + len(phrase)]) == phrase:
                        return True
        return False
