from __future__ import annotations

import pytest

from bot.errors import BotError, UnknownNamespace
from bot.prompts.guide import complete_namespace, guide, guides, resolve_namespace
from bot.prompts.namespaces import CONTENT, DESCRIPTIONS
from bot.prompts.vocabulary import NAMESPACE_ORDER, Vocabulary

VOCABULARY = Vocabulary.load()


def test_every_content_namespace_is_described_once_in_autocompletes_order() -> None:
    assert DESCRIPTIONS.keys() == CONTENT
    found = guides(VOCABULARY)
    assert [namespace.name for namespace in found] == list(NAMESPACE_ORDER)
    assert all(namespace.description and namespace.tags for namespace in found)


def test_a_namespaces_tags_are_the_vocabularys_most_used_first() -> None:
    species = guide(VOCABULARY, "species")
    assert species.tags == tuple(entry.tag for entry in VOCABULARY.tags("species"))
    assert species.tags[:3] == ("human", "cat", "dog")
    assert guide(VOCABULARY, "rating").tags == ("safe", "questionable", "explicit")


@pytest.mark.parametrize("written", ["species", "Species", "species:", " SPECIES: "])
def test_a_namespace_may_be_written_as_in_a_prompt(written: str) -> None:
    assert resolve_namespace(written) == "species"


def test_aliases_name_their_namespace() -> None:
    assert resolve_namespace("artist") == "creator"
    assert guide(VOCABULARY, "franchise").name == "series"


def test_an_unknown_namespace_gets_a_suggestion() -> None:
    with pytest.raises(
        UnknownNamespace, match=r"`speces` is not a namespace Sygil knows\. Did you mean `species`\?"
    ) as caught:
        resolve_namespace("speces")
    assert caught.value.suggestion == "species" and isinstance(caught.value, BotError)
    assert "/tags namespace:species" in str(caught.value)


def test_a_namespace_far_from_any_lists_them_all() -> None:
    with pytest.raises(UnknownNamespace) as caught:
        resolve_namespace("banana")
    assert caught.value.suggestion is None
    assert all(f"`{name}`" in str(caught.value) for name in NAMESPACE_ORDER)


def test_a_provenance_namespace_cannot_steer() -> None:
    with pytest.raises(UnknownNamespace, match="where a training image came from") as caught:
        resolve_namespace("title")
    assert caught.value.suggestion == "series"


def test_namespaces_complete_by_name_or_alias() -> None:
    assert complete_namespace("") == list(NAMESPACE_ORDER)
    assert complete_namespace("s") == ["species", "studio", "series"]
    assert complete_namespace("art") == ["creator"]
    assert complete_namespace("Species:") == ["species"]
    assert complete_namespace("x") == []
