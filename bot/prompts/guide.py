"""What each namespace users steer with means, and its commonest tags: the content of ``/tags``, without Discord."""

from __future__ import annotations

from dataclasses import dataclass

from bot.errors import UnknownNamespace
from bot.prompts.checker import nearest_namespace
from bot.prompts.namespaces import ALIASES, CONTENT, DESCRIPTIONS, PROVENANCE, STEER_INSTEAD
from bot.prompts.vocabulary import NAMESPACE_ORDER, Vocabulary, normalise_tag


@dataclass(frozen=True, slots=True)
class NamespaceGuide:
    """A namespace users steer with: what it means and its tags in the vocabulary, commonest first."""

    name: str
    description: str
    tags: tuple[str, ...]


def guides(vocabulary: Vocabulary) -> list[NamespaceGuide]:
    """Return every namespace users steer with, in the order autocomplete offers them."""
    return [_guide(vocabulary, name) for name in NAMESPACE_ORDER]


def guide(vocabulary: Vocabulary, namespace: str) -> NamespaceGuide:
    """Return the guide to ``namespace`` (an alias or a trailing colon is fine); raise UnknownNamespace if none."""
    return _guide(vocabulary, resolve_namespace(namespace))


def resolve_namespace(namespace: str) -> str:
    """Return the content namespace ``namespace`` names, or raise UnknownNamespace saying what to write instead."""
    name = normalise_tag(namespace).removesuffix(":").strip()
    name = ALIASES.get(name, name)
    if name in CONTENT:
        return name
    shown = name.replace("`", "'")[:50]
    if name in PROVENANCE:
        instead = STEER_INSTEAD.get(name, "meta")
        raise UnknownNamespace(
            f"`{shown}:` records where a training image came from, not what it shows, so it cannot steer the "
            f"picture. Try `/tags namespace:{instead}`.",
            suggestion=instead,
        )
    suggestion = nearest_namespace(name)
    if suggestion is not None:
        raise UnknownNamespace(
            f"`{shown}` is not a namespace Sygil knows. Did you mean `{suggestion}`? "
            f"Try `/tags namespace:{suggestion}`.",
            suggestion=suggestion,
        )
    raise UnknownNamespace(
        f"`{shown}` is not a namespace Sygil knows. The namespaces are: "
        + ", ".join(f"`{name}`" for name in NAMESPACE_ORDER)
        + ". `/tags` alone describes them.",
        suggestion=None,
    )


def complete_namespace(current: str) -> list[str]:
    """Return the namespaces whose name, or an alias of it, starts with what is typed, in autocomplete's order."""
    typed = normalise_tag(current).removesuffix(":")
    matched = {name for name in CONTENT if name.startswith(typed)}
    matched |= {canonical for alias, canonical in ALIASES.items() if alias.startswith(typed)}
    return [name for name in NAMESPACE_ORDER if name in matched]


def _guide(vocabulary: Vocabulary, name: str) -> NamespaceGuide:
    return NamespaceGuide(
        name=name,
        description=DESCRIPTIONS[name],
        tags=tuple(entry.tag for entry in vocabulary.tags(name)),
    )
