"""Parse, normalise and check prompts written in the namespaced INE tag language."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field

from bot.errors import PromptRejected
from bot.prompts.namespaces import ALIASES, CONTENT, KNOWN, PROVENANCE

MAX_TOKENS = 75  # CLIP reads 77 ids; the start and end ids take two.
MAX_CHARS = 1500

# A namespace is one or two lowercase-able words before the first colon; anything else with a colon is text.
_CANDIDATE = re.compile(r"(?P<open>\(*)\s*(?P<namespace>[A-Za-z][A-Za-z_ ]{0,19}?)\s*:(?P<rest>.*)", re.DOTALL)
_WEIGHT = re.compile(r"\s*[+-]?\d+(\.\d+)?\s*\)*\s*")
_TRAILING_WEIGHT = re.compile(r"(?P<tag>.*?)(?P<weight>\s*:\s*[+-]?\d+(\.\d+)?)?\s*$", re.DOTALL)
_SPACES = re.compile(r"[\s_]+")


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
class Verdict:
    prompt: str
    tags: tuple[Tag, ...] = ()
    tokens: int | None = None
    max_tokens: int = MAX_TOKENS
    errors: tuple[Problem, ...] = ()
    warnings: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_for_errors(self) -> None:
        """Raise PromptRejected with every error as one message."""
        if self.errors:
            raise PromptRejected("\n".join(problem.message for problem in self.errors))


def check_prompt(
    text: str,
    *,
    field_name: str = "prompt",
    count_tokens: Callable[[str], int] | None = None,
    max_tokens: int = MAX_TOKENS,
    allow_empty: bool = False,
) -> Verdict:
    """Normalise ``text`` and return the verdict; never raises for any input string."""
    errors: list[Problem] = []
    warnings: list[str] = []
    tags: list[Tag] = []
    cleaned = _clean(text)
    if len(cleaned) > MAX_CHARS:
        errors.append(
            Problem("too_long", f"The {field_name} is {len(cleaned)} characters; at most {MAX_CHARS} are accepted.")
        )
        return Verdict(prompt=cleaned[:MAX_CHARS], errors=tuple(errors), max_tokens=max_tokens)
    items: list[str] = []
    for raw in cleaned.split(","):
        item = _SPACES.sub(" ", raw).strip()
        if not item:
            continue
        items.append(_check_item(item, field_name, tags, errors, warnings))
    prompt = ", ".join(items)
    if not prompt and not allow_empty:
        errors.append(Problem("empty", f"The {field_name} is empty: describe the image, e.g. `species:seal, beach`."))
    tokens = None
    if count_tokens is not None and prompt:
        tokens = count_tokens(prompt)
        if tokens > max_tokens:
            errors.append(
                Problem(
                    "too_many_tokens",
                    f"The {field_name} is {tokens} tokens long; the model reads only {max_tokens}. "
                    "Remove some tags or words.",
                )
            )
    return Verdict(
        prompt=prompt,
        tags=tuple(tags),
        tokens=tokens,
        max_tokens=max_tokens,
        errors=tuple(errors),
        warnings=tuple(warnings),
    )


def _clean(text: str) -> str:
    """Drop control and format characters (zero-width tricks) and apply NFKC, keeping newlines as separators."""
    text = unicodedata.normalize("NFKC", text)
    return "".join(
        " " if char in "\n\r\t" else char for char in text if char in "\n\r\t" or unicodedata.category(char)[0] != "C"
    )


def _check_item(item: str, field_name: str, tags: list[Tag], errors: list[Problem], warnings: list[str]) -> str:
    """Return the normalised item, recording its tag, or why it is refused."""
    match = _CANDIDATE.fullmatch(item)
    if match is None:
        return item
    namespace = _SPACES.sub(" ", match["namespace"]).strip().lower()
    rest = match["rest"]
    if rest.startswith("//"):  # a URL
        return item
    opening = match["open"]
    suffix = ""
    if opening:
        # `(species:seal:1.2)` is a weighted tag: the weight and the closing brackets are not part of the tag.
        closing = len(rest) - len(rest.rstrip().rstrip(")"))
        closing = min(closing, len(opening))
        body = rest.rstrip()[: len(rest.rstrip()) - closing] if closing else rest
        weighted = _TRAILING_WEIGHT.fullmatch(body)
        assert weighted is not None
        rest = weighted["tag"]
        suffix = (weighted["weight"] or "").replace(" ", "") + ")" * closing
    tag = _SPACES.sub(" ", rest).strip().lower()
    if namespace in ALIASES:
        canonical = ALIASES[namespace]
        warnings.append(f"`{namespace}:` is written `{canonical}:` in Sygil's tags; changed `{namespace}:{tag}`.")
        namespace = canonical
    if namespace not in KNOWN:
        suggestion = nearest_namespace(namespace)
        if suggestion is None or _WEIGHT.fullmatch(rest):
            return item  # plain text with a colon, such as `re:zero` or a `(word:1.2)` weight
        errors.append(
            Problem(
                "unknown_namespace",
                f"`{namespace}:` is not a namespace Sygil knows. Did you mean `{suggestion}:`?",
                suggestion=f"{suggestion}:",
            )
        )
        return item
    if not tag or (_WEIGHT.fullmatch(rest) and namespace != "year"):
        errors.append(
            Problem(
                "empty_tag",
                f"`{namespace}:` needs a tag after the colon, e.g. `{namespace}:{_EXAMPLES.get(namespace, 'seal')}`.",
            )
        )
        return item
    if namespace in PROVENANCE:
        errors.append(
            Problem(
                "provenance_namespace",
                f"`{namespace}:` records where a training image came from, not what it shows, so it cannot steer "
                f"the picture. Describe what it shows instead, e.g. with `{_NEAREST_CONTENT.get(namespace, 'meta')}:`.",
            )
        )
    tags.append(Tag(namespace, tag))
    return f"{opening}{namespace}:{tag}{suffix}"


_EXAMPLES = {"species": "seal", "studio": "dc", "series": "star wars", "medium": "oil painting", "year": "1999"}
_NEAREST_CONTENT = {"title": "series", "category": "meta", "text": "meta"}


def nearest_namespace(word: str) -> str | None:
    """Return the content namespace closest to ``word`` when it looks like a typo of one."""
    word = word.lower().strip()
    if len(word) < 3:
        return None
    best: tuple[int, str] | None = None
    for candidate in sorted(CONTENT | ALIASES.keys()):
        distance = _edit_distance(word, candidate)
        if best is None or distance < best[0]:
            best = (distance, candidate)
    assert best is not None
    distance, candidate = best
    limit = 1 if len(word) <= 4 else 2
    if distance > limit:
        return None
    return ALIASES.get(candidate, candidate)


def _edit_distance(a: str, b: str) -> int:
    """Count insertions, deletions, substitutions and swaps of neighbours (Damerau-Levenshtein, restricted)."""
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
