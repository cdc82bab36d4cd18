"""Suggest INE tags while a prompt is typed, from the tag vocabulary packaged in ``vocabulary.tsv``.

The packaged ``vocabulary.tsv`` is hand-written: its tags are common, plausible INE tags, and its weights are
integers chosen by hand to rank suggestions (higher means more common). They are NOT counts from the INE
dataset, which this project has no copy of. ``scripts/build_vocabulary.py`` rebuilds the file, with real
counts, from a tag-count export of the data.
"""

from __future__ import annotations

import heapq
import logging
import re
from bisect import bisect_left
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from bot.prompts.namespaces import ALIASES, CONTENT, KNOWN

log = logging.getLogger(__name__)

HEADER = ("namespace", "tag", "weight")

# Discord allows 25 choices, each name and value at most 100 characters.
MAX_CHOICES = 25
MAX_CHOICE_LENGTH = 100

# Offered when nothing is typed, in a hand-made guess at how often prompts use them (we have no counts).
NAMESPACE_ORDER = (
    "species",
    "studio",
    "series",
    "character",
    "creator",
    "medium",
    "meta",
    "clothing",
    "person",
    "gender",
    "rating",
    "genre",
    "action",
    "bodypart",
    "meme",
    "year",
)

# A namespace is typed as a prefix of its name or of one of its aliases, e.g. `arti` for `creator:`.
_NAMESPACE_NAMES = sorted(
    [(name, name) for name in NAMESPACE_ORDER] + [(alias, canonical) for alias, canonical in ALIASES.items()]
)
_SPACES = re.compile(r"[\s_]+")
# Sorts after any character a tag holds, so `prefix + _HIGHEST` bounds the tags starting with prefix.
_HIGHEST = "\U0010ffff"
# Prefixes matching more tags than this have their best tags listed in advance; `_LISTED` covers 25 choices with
# room for some that are too long to offer.
_SMALL_RANGE = 32
_LISTED = 48
_MIN_BARE_PREFIX = 2


def normalise_tag(text: str) -> str:
    """Return ``text`` as INE writes tags: lowercase, underscores as spaces, single spaces, trimmed."""
    return _SPACES.sub(" ", text).strip().lower()


@dataclass(frozen=True, slots=True)
class Entry:
    namespace: str
    tag: str
    weight: int

    def __str__(self) -> str:
        return f"{self.namespace}:{self.tag}" if self.namespace else self.tag


class _Index:
    """Entries sorted by tag, so the entries starting with a prefix are one bisected range, listed best first.

    A small range is ranked when asked. For each prefix with a large range, the best ranked entries are listed in
    advance, so short prefixes such as ``st`` or an empty tag cost a lookup instead of ranking the whole range.
    """

    __slots__ = ("_keys", "_top", "ranks", "values")

    def __init__(self, ranked: Iterable[tuple[int, Entry]]) -> None:
        items = sorted(ranked, key=lambda item: (item[1].tag, item[0]))
        self._keys = [entry.tag for _, entry in items]
        self.ranks = [rank for rank, _ in items]
        self.values = [str(entry) for _, entry in items]
        self._top: dict[str, list[int]] = {}
        for key in self._keys:
            for end in range(len(key) + 1):
                prefix = key[:end]
                lo, hi = self._range(prefix)
                if hi - lo <= _SMALL_RANGE:
                    break  # longer prefixes have smaller ranges still
                if prefix not in self._top:
                    self._top[prefix] = heapq.nsmallest(_LISTED, range(lo, hi), key=self.ranks.__getitem__)

    def _range(self, prefix: str) -> tuple[int, int]:
        """Return the positions ``lo`` to ``hi - 1`` of the tags starting with ``prefix``."""
        lo = bisect_left(self._keys, prefix)
        return lo, bisect_left(self._keys, prefix + _HIGHEST, lo)

    def positions(self, prefix: str) -> Iterator[int]:
        """Yield the positions of the entries whose tag starts with ``prefix``, best rank first."""
        lo, hi = self._range(prefix)
        top = self._top.get(prefix) if hi - lo > _SMALL_RANGE else None
        if top is None:
            yield from sorted(range(lo, hi), key=self.ranks.__getitem__)
            return
        yield from top
        # Only when many of the best were too long to offer.
        if hi - lo > len(top):
            yield from sorted(range(lo, hi), key=self.ranks.__getitem__)[len(top) :]

    def ranked(self, prefix: str) -> Iterator[tuple[int, str]]:
        """Yield ``(rank, value)`` for the entries whose tag starts with ``prefix``, best rank first."""
        ranks, values = self.ranks, self.values
        return ((ranks[position], values[position]) for position in self.positions(prefix))

    def suggest(self, prefix: str) -> Iterator[str]:
        """Yield the values (``namespace:tag``) of the entries whose tag starts with ``prefix``, best rank first."""
        values = self.values
        return (values[position] for position in self.positions(prefix))


class Vocabulary:
    """The INE tags autocomplete suggests, indexed once so each suggestion takes microseconds."""

    def __init__(self, entries: Iterable[Entry]) -> None:
        best: dict[tuple[str, str], Entry] = {}
        for entry in entries:
            _validate(entry)
            key = (entry.namespace, entry.tag)
            if key not in best or entry.weight > best[key].weight:
                best[key] = entry
        # One rank per entry, shared by every index, so results merged from several indexes stay in order.
        self._ranked = sorted(best.values(), key=lambda entry: (-entry.weight, str(entry)))
        self._keys = frozenset(best)
        self._all = _Index(enumerate(self._ranked))
        grouped: dict[str, list[tuple[int, Entry]]] = {}
        for rank, entry in enumerate(self._ranked):
            grouped.setdefault(entry.namespace, []).append((rank, entry))
        self._by_namespace = {namespace: _Index(items) for namespace, items in grouped.items()}
        self._tags = {namespace: [entry for _, entry in items] for namespace, items in grouped.items()}

    @classmethod
    def load(cls, path: Path | None = None) -> Vocabulary:
        """Read a vocabulary TSV, by default the one packaged with the bot."""
        if path is None:
            text = resources.files("bot.prompts").joinpath("vocabulary.tsv").read_text("utf-8")
            source = "bot/prompts/vocabulary.tsv"
        else:
            text = path.read_text("utf-8")
            source = str(path)
        vocabulary = cls(parse_tsv(text, source=source))
        log.debug("Loaded %d tags from %s", len(vocabulary), source)
        return vocabulary

    def __len__(self) -> int:
        return len(self._ranked)

    def __contains__(self, item: object) -> bool:
        if not isinstance(item, str):
            return False
        namespace, tag = split_tag(item)
        return (namespace, tag) in self._keys

    def tags(self, namespace: str) -> list[Entry]:
        """Return the entries of ``namespace`` (``""`` for unnamespaced tags), commonest first."""
        namespace = normalise_tag(namespace)
        return list(self._tags.get(ALIASES.get(namespace, namespace), ()))

    def complete(
        self,
        text: str,
        *,
        limit: int = MAX_CHOICES,
        max_length: int = MAX_CHOICE_LENGTH,
        namespaces: Collection[str] | None = None,
    ) -> list[str]:
        """Return whole option values that complete the last comma-separated item of ``text``, best first.

        ``namespaces`` restricts the suggestions to those namespaces; include ``""`` to allow unnamespaced tags.
        """
        allowed = None if namespaces is None else {ALIASES.get(name, name) for name in map(normalise_tag, namespaces)}
        *before, last = text.split(",")
        # Discord replaces the whole value with the choice, so the items already typed lead every choice.
        earlier = [item.strip() for item in before if item.strip()]
        head = ", ".join(earlier) + ", " if earlier else ""
        # `(species:seal:1.2)` is a weighted tag: keep the brackets typed before the tag.
        stripped = last.lstrip()
        opened = stripped[: len(stripped) - len(stripped.lstrip("("))]
        head += opened
        item = normalise_tag(stripped[len(opened) :])
        if not item:
            if text.strip():
                return []
            suggestions: Iterable[str] = (f"{name}:" for name in NAMESPACE_ORDER if allowed is None or name in allowed)
        elif ":" in item:
            typed, _, prefix = item.partition(":")
            namespace = ALIASES.get(typed.strip(), typed.strip())
            if namespace not in CONTENT or (allowed is not None and namespace not in allowed):
                return []
            index = self._by_namespace.get(namespace)
            suggestions = () if index is None else index.suggest(prefix)
        elif len(item) < _MIN_BARE_PREFIX:
            return []
        else:
            suggestions = self._bare(item, allowed)
        room = max_length - len(head)
        if room <= 0:
            return []
        results: list[str] = []
        seen: set[str] = set()
        for suggestion in suggestions:
            if len(results) >= limit:
                break
            if len(suggestion) > room or suggestion in seen:
                continue
            seen.add(suggestion)
            results.append(head + suggestion)
        return results

    def _bare(self, prefix: str, allowed: set[str] | None) -> Iterator[str]:
        """Yield namespaces, then tags of any namespace, that start with ``prefix`` (typed without a colon)."""
        lo = bisect_left(_NAMESPACE_NAMES, (prefix,))
        hi = bisect_left(_NAMESPACE_NAMES, (prefix + _HIGHEST,), lo)
        matched = {canonical for _, canonical in _NAMESPACE_NAMES[lo:hi]}
        for name in NAMESPACE_ORDER:
            if name in matched and (allowed is None or name in allowed):
                yield f"{name}:"
        if allowed is None:
            yield from self._all.suggest(prefix)
            return
        indexes = [self._by_namespace[name] for name in allowed if name in self._by_namespace]
        # Ranks are shared by every index, so merging by rank keeps the order of the whole vocabulary.
        for _, value in heapq.merge(*(index.ranked(prefix) for index in indexes)):
            yield value


def split_tag(text: str) -> tuple[str, str]:
    """Split ``namespace:tag`` on the first colon if that names a content namespace (aliases rewritten), else ``""``."""
    text = normalise_tag(text)
    namespace, colon, tag = text.partition(":")
    namespace = namespace.strip()
    namespace = ALIASES.get(namespace, namespace)
    if colon and namespace in CONTENT:
        return namespace, tag.strip()
    return "", text


def parse_tsv(text: str, *, source: str = "vocabulary.tsv") -> list[Entry]:
    """Parse vocabulary TSV text; a malformed line raises ValueError naming the source and the line."""
    lines = text.splitlines()
    if not lines or tuple(lines[0].split("\t")) != HEADER:
        raise ValueError(f"{source}: the first line must be the header {chr(9).join(HEADER)!r}")
    entries: list[Entry] = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(HEADER):
            raise ValueError(f"{source}:{number}: expected 3 tab-separated fields, got {len(fields)}")
        namespace, tag, weight = fields
        try:
            entry = Entry(namespace, tag, int(weight))
            _validate(entry)
        except ValueError as error:
            raise ValueError(f"{source}:{number}: {error}") from None
        entries.append(entry)
    return entries


def format_tsv(entries: Iterable[Entry]) -> str:
    """Return ``entries`` as vocabulary TSV text, sorted by namespace, then commonest first."""
    lines = ["\t".join(HEADER)]
    ordered = sorted(entries, key=lambda entry: (entry.namespace, -entry.weight, entry.tag))
    lines += [f"{entry.namespace}\t{entry.tag}\t{entry.weight}" for entry in ordered]
    return "\n".join(lines) + "\n"


def _validate(entry: Entry) -> None:
    """Raise ValueError unless ``entry`` is a normalised tag in a content namespace (or none)."""
    if entry.namespace and entry.namespace not in CONTENT:
        raise ValueError(f"{entry.namespace!r} is not a content namespace")
    if not entry.tag or normalise_tag(entry.tag) != entry.tag:
        raise ValueError(f"tag {entry.tag!r} is not normalised (lowercase, single spaces, no underscores)")
    if "," in entry.tag:
        raise ValueError(f"tag {entry.tag!r} holds a comma, which separates prompt items")
    if not entry.namespace and entry.tag.partition(":")[0].strip() in KNOWN | ALIASES.keys():
        # Read back from a prompt, it would be the namespaced tag, not this one.
        raise ValueError(f"unnamespaced tag {entry.tag!r} starts with a namespace")
    if entry.weight < 0:
        raise ValueError(f"weight {entry.weight} of {entry.tag!r} is negative")
