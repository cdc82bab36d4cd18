"""Parse, normalise and check prompts written in the namespaced INE tag language.

A prompt is a comma-separated list of items. An item is ``namespace:tag`` when the text before its first colon
is a namespace (tag values may hold more colons: ``series:monster hunter:world``), else free text in any
language. Colons that are not namespaces stay text: ``16:9``, ``12:30``, URLs, ``re:zero``.

Inside free text, a later word written ``namespace:value`` is a tag too, of that one word: ``a photo of
species:seal on a beach`` keeps its text and yields the tag ``species:seal``. A multi-word tag needs its own item
(``a photo, creator:chris rallis``): read mid-item it would end at its first space. Such a word gets the checks a
whole item gets (aliases, ratings, weights; a provenance name such as ``text:`` stays text there), and a word that
is a typo of a namespace (``speces:seal``) is refused with the same suggestion. Other words with colons mid-item stay
text, as before.

Weights. ``(tag:1.2)`` and ``(species:seal:1.2)`` are accepted and kept as written, and a weighted tag keeps its
namespace. The bot renders with plain diffusers, which does not apply weights: CLIP reads the brackets and the
number as text, so a note says so. The old ``tag:1.2`` form (no brackets) is read the same way.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass, field

from bot.errors import PromptRejected
from bot.prompts.blocklist import Blocklist
from bot.prompts.namespaces import ALIASES, CONTENT, KNOWN, PROVENANCE, SAFE_RATINGS, STEER_INSTEAD
from bot.prompts.tokens import MAX_TOKENS, Tokenizer, count_tokens

MAX_CHARS = 1500  # Discord's longest string option is 6000; nothing useful is longer than CLIP's 77 tokens anyway.

_PREFIX = re.compile(r"(?P<open>\(*)\s*(?P<name>[^:()]*?)\s*:(?P<rest>.*)", re.DOTALL)
_NAME = re.compile(r"[a-z]+(?: [a-z]+)?")
_NUMBER = re.compile(r"\s*[+-]?(\d+(\.\d*)?|\.\d+)\s*")
_WEIGHT_SUFFIX = re.compile(r"(?P<body>.*?)\s*:\s*(?P<weight>[+-]?(\d+(\.\d*)?|\.\d+))\s*", re.DOTALL)
_WEIGHTED_TEXT = re.compile(r"\(.*:\s*[\d.]+\s*\)")
_EXAMPLES = {
    "species": "seal",
    "studio": "dc",
    "series": "star wars",
    "character": "link",
    "creator": "chris rallis",
    "medium": "oil painting",
    "meta": "highres",
    "clothing": "hat",
    "gender": "female",
    "rating": "safe",
    "genre": "fantasy",
    "action": "running",
    "bodypart": "hands",
    "year": "1999",
}
_GLUED = re.compile(r"\s(?P<namespace>" + "|".join(sorted(KNOWN | ALIASES.keys(), key=len, reverse=True)) + r"):\S")


@dataclass(frozen=True, slots=True)
class Tag:
    namespace: str
    tag: str

    def __str__(self) -> str:
        return f"{self.namespace}:{self.tag}"


@dataclass(frozen=True, slots=True)
class Problem:
    """Why a prompt is refused, with a fix when there is one."""

    code: str
    message: str
    suggestion: str | None = None


@dataclass(frozen=True, slots=True)
class Rules:
    """What the place a prompt is used in allows."""

    max_tokens: int = MAX_TOKENS
    allow_truncation: bool = False  # past the budget: warn and let CLIP cut, instead of refusing
    allow_rating: bool = False  # mature `rating:` tags (an age-restricted channel, or a moderator's setting)
    blocklist: Blocklist = field(default_factory=Blocklist)


@dataclass(frozen=True, slots=True)
class Verdict:
    prompt: str
    tags: tuple[Tag, ...] = ()
    tokens: int | None = None
    max_tokens: int = MAX_TOKENS
    errors: tuple[Problem, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_for_errors(self) -> None:
        """Raise PromptRejected with every error as one message."""
        if self.errors:
            raise PromptRejected("\n".join(problem.message for problem in self.errors))

    def as_dict(self) -> dict[str, object]:
        """Return the verdict as plain JSON-ready data (the `prompt check --json` format)."""
        return {
            "ok": self.ok,
            "prompt": self.prompt,
            "tags": [{"namespace": tag.namespace, "tag": tag.tag} for tag in self.tags],
            "tokens": self.tokens,
            "max_tokens": self.max_tokens,
            "errors": [
                {"code": error.code, "message": error.message, "suggestion": error.suggestion} for error in self.errors
            ],
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True, slots=True)
class _Item:
    text: str  # normalised
    tag: Tag | None = None
    error: Problem | None = None
    note: str | None = None
    weighted: bool = False
    within: tuple[_Item, ...] = ()  # the tags (and typos of namespaces) among the words of a free-text item


def normalise(text: str) -> str:
    """Return the INE form of a prompt: items trimmed and comma-separated, tags lowercase with single spaces."""
    return ", ".join(item.text for item in _items(text, field_name="prompt"))


def check_prompt(
    text: str,
    *,
    field_name: str = "prompt",
    tokenizer: Tokenizer | None = None,
    rules: Rules | None = None,
    allow_empty: bool = False,
) -> Verdict:
    """Normalise ``text`` and judge it under ``rules``; any string gets a verdict, never an exception."""
    rules = rules or Rules()
    items = _items(text, field_name=field_name)
    prompt = ", ".join(item.text for item in items)
    readings = [reading for item in items for reading in (item, *item.within)]
    errors = [reading.error for reading in readings if reading.error is not None]
    warnings = list(dict.fromkeys(reading.note for reading in readings if reading.note is not None))
    tags = tuple(reading.tag for reading in readings if reading.tag is not None)
    if any(reading.weighted for reading in readings):
        warnings.append(
            "Weights like `(tag:1.2)` are not applied by this bot: the model reads the brackets and numbers as text."
        )
    if not prompt and not allow_empty:
        errors.append(Problem("empty", f"The {field_name} is empty: describe the image, e.g. `species:seal, beach`."))
    if len(prompt) > MAX_CHARS:
        errors.append(
            Problem("too_long", f"The {field_name} is {len(prompt)} characters long; at most {MAX_CHARS} are accepted.")
        )
    for tag in tags:
        if tag.namespace == "rating" and tag.tag not in SAFE_RATINGS and not rules.allow_rating:
            errors.append(
                Problem(
                    "rating_not_allowed",
                    f"{_where(field_name)}`{tag}` steers towards mature content, which is allowed only in "
                    "age-restricted channels (or where a moderator allows it). Remove it, or use it in such a channel.",
                    suggestion="rating:safe",
                )
            )
    if rules.blocklist and (rules.blocklist.matches(prompt) or (text != prompt and rules.blocklist.matches(text))):
        # Never echo the term: the message may be seen by others, and repeating it defeats the list.
        errors.append(
            Problem("blocked_term", f"The {field_name} contains a term this server does not allow. Please rephrase it.")
        )
    tokens = None
    if tokenizer is not None and prompt and len(prompt) <= MAX_CHARS:
        counted = count_tokens(tokenizer, prompt, rules.max_tokens)
        tokens = counted.tokens
        if counted.overflow:
            summary = (
                f"The {field_name} is {counted.tokens} tokens long and the model reads only {rules.max_tokens}, "
                f"so this part would be cut off: `{_shorten(counted.overflow)}`"
            )
            if rules.allow_truncation:
                warnings.append(summary + ". It was left out.")
            else:
                errors.append(Problem("too_many_tokens", summary + ". Remove some tags or words."))
    return Verdict(
        prompt=prompt,
        tags=tags,
        tokens=tokens,
        max_tokens=rules.max_tokens,
        errors=tuple(errors),
        warnings=tuple(warnings),
    )


def nearest_namespace(word: str) -> str | None:
    """Return the content namespace closest to ``word`` when it looks like a typo of one."""
    word = word.lower().strip()
    if len(word) < 3:
        return None
    best = min(sorted(CONTENT | ALIASES.keys()), key=lambda candidate: _edit_distance(word, candidate))
    if _edit_distance(word, best) > (1 if len(word) <= 4 else 2):
        return None
    return ALIASES.get(best, best)


def _items(text: str, *, field_name: str) -> list[_Item]:
    items: list[_Item] = []
    for raw in _clean(text).split(","):
        item = " ".join(raw.split())
        if item:
            items.append(_item(item, field_name))
    return items


def _clean(text: str) -> str:
    """Apply NFKC, turn line breaks and tabs into separators and drop other control and format characters."""
    text = unicodedata.normalize("NFKC", text)
    if text.isprintable():  # no control, format or unassigned characters: the common case, done in C
        return text
    kept: list[str] = []
    for char in text:
        if char in "\n\r":
            kept.append(",")
        elif char == "\t":
            kept.append(" ")
        elif unicodedata.category(char) not in ("Cc", "Cf", "Cs", "Co", "Cn"):
            kept.append(char)
    return "".join(kept)


def _words(text: str) -> str:
    """Lowercase a tag, with spaces for underscores (INE writes `cloudy sky`, boorus `cloudy_sky`)."""
    text = " ".join(text.replace("_", " ").split()).lower()
    return text if text.isascii() else unicodedata.normalize("NFKC", text)


# Prompts reuse the same tags over and over; an item's reading depends on nothing but its text.
@functools.lru_cache(maxsize=65_536)
def _item(item: str, field_name: str) -> _Item:
    """Read one comma-separated item."""
    read = _whole(item, field_name)
    if read.tag is None and read.error is None and ":" in item and " " in read.text:
        return _within(item, field_name, read)
    return read


def _within(item: str, field_name: str, plain: _Item) -> _Item:
    """Read the words after the first of a free-text item: ``namespace:value`` is a tag of that one word."""
    words = plain.text.split(" ")  # underscores already read as spaces, so a word never hides two
    found: list[_Item] = []
    for position, word in enumerate(words[1:], start=1):
        if ":" not in word or word.endswith(":"):
            continue  # `genres: fantasy` is prose, and `species:` with nothing after it is no tag
        read = _item(word, field_name)
        if read.error is not None and read.error.code == "provenance_namespace":
            continue  # `a sign with text:hello`: mid-item, a provenance name stays text, as it was accepted before
        if read.tag is not None:
            words[position] = read.text
        elif read.error is None or read.error.code != "unknown_namespace" or read.error.suggestion is None:
            continue  # `10:30`, `hunter:world`, `re:zero`: text, as before
        found.append(read)
    if not found:
        return plain
    return _Item(text=" ".join(words), weighted=plain.weighted, within=tuple(found))


def _whole(item: str, field_name: str) -> _Item:
    """Read a whole item as a tag when it starts with a namespace, else as free text."""
    match = _PREFIX.fullmatch(item) if ":" in item else None
    if match is None:
        return _plain(item)
    opening, rest = match["open"], match["rest"]
    name = _words(match["name"])
    if rest.startswith("//") or not _NAME.fullmatch(name):
        return _plain(item)  # a URL, a time, a ratio, text in another script
    weighted = bool(opening)
    closing = ""
    if opening:
        # `(species:seal:1.2)`: the brackets and the weight belong to the weighting, not to the tag.
        stripped = rest.rstrip()
        count = min(len(stripped) - len(stripped.rstrip(")")), len(opening))
        rest, closing = stripped[: len(stripped) - count], ")" * count
    weight = ""
    suffix = _WEIGHT_SUFFIX.fullmatch(rest)
    if suffix is not None and name != "year":
        rest, weight, weighted = suffix["body"], f":{suffix['weight']}", True
    note = None
    if name in ALIASES:
        canonical = ALIASES[name]
        note = f"`{name}:` is written `{canonical}:` in Sygil's tags, so `{name}:` became `{canonical}:`."
        name = canonical
    if name not in KNOWN:
        if " " in name and name.rpartition(" ")[2] in KNOWN | ALIASES.keys():
            return _plain(item)  # `a species:seal`: free text with a tag in it, not a typo of `species:`
        if rest[:1].isspace():
            return _plain(item)  # `note: hello` is prose; INE never puts a space after the colon
        if _NUMBER.fullmatch(rest) and not weight:
            return _plain(item, weighted=True)  # the old `word:1.2` weight form
        suggestion = nearest_namespace(name)
        if suggestion is None and (len(name) < 3 or " " in name):
            return _plain(item)  # `re:zero`, `a:b`: not a namespace, just a colon in text
        hint = (
            f" Did you mean `{suggestion}:`?" if suggestion else " Write it without the colon if you meant plain text."
        )
        return _Item(
            text=_plain(item).text,
            error=Problem(
                "unknown_namespace",
                f"{_where(field_name)}`{name}:` is not a namespace Sygil knows.{hint}",
                suggestion=f"{suggestion}:" if suggestion else None,
            ),
        )
    tag = _words(rest)
    text = f"{opening}{name}:{tag}{weight}{closing}"
    if not tag:
        return _Item(
            text=text,
            error=Problem(
                "empty_tag",
                f"`{name}:` in the {field_name} needs a tag after the colon, "
                f"e.g. `{name}:{_EXAMPLES.get(name, 'something')}`.",
            ),
        )
    if name in PROVENANCE:
        instead = STEER_INSTEAD.get(name, "meta")
        return _Item(
            text=text,
            tag=Tag(name, tag),
            error=Problem(
                "provenance_namespace",
                f"{_where(field_name)}`{name}:` records where a training image came from, not what it shows, so it "
                f"cannot steer the picture. Describe what it shows instead, e.g. with `{instead}:`.",
                suggestion=f"{instead}:",
            ),
        )
    glued = _GLUED.search(tag)
    if glued is not None and note is None:
        note = f"`{text}` is read as one tag; put a comma before `{glued['namespace']}:` if you meant two."
    return _Item(text=text, tag=Tag(name, tag), note=note, weighted=weighted)


def _where(field_name: str) -> str:
    """Name the field a problem is in, unless it is the prompt itself (the field a reader assumes)."""
    return "" if field_name == "prompt" else f"In the {field_name}, "


def _plain(item: str, *, weighted: bool = False) -> _Item:
    """Free text: kept as written, with underscores read as spaces where it has words."""
    if "_" in item and any(char.isalpha() for char in item):
        item = " ".join(item.replace("_", " ").split())
    return _Item(text=item, weighted=weighted or ("(" in item and _WEIGHTED_TEXT.search(item) is not None))


def _shorten(text: str, limit: int = 200) -> str:
    text = text.replace("`", "'")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _edit_distance(a: str, b: str) -> int:
    """Count insertions, deletions, substitutions and swaps of neighbours (restricted Damerau-Levenshtein)."""
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            cost = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b))
            if i > 1 and j > 1 and char_a == b[j - 2] and a[i - 2] == char_b:
                cost = min(cost, previous2[j - 2] + 1)
            current.append(cost)
        previous2, previous = previous, current
    return previous[-1]
