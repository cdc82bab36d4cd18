from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot.errors import PromptRejected
from bot.prompts import Tag, check_prompt, nearest_namespace


def test_tags_are_parsed_and_normalised() -> None:
    verdict = check_prompt("  Species:Seal ,studio:DC,  cloudy_sky, creator:chris   rallis ")
    assert verdict.ok
    assert verdict.prompt == "species:seal, studio:dc, cloudy sky, creator:chris rallis"
    assert verdict.tags == (Tag("species", "seal"), Tag("studio", "dc"), Tag("creator", "chris rallis"))


@pytest.mark.parametrize(
    ("typo", "suggestion"),
    [
        ("speces:seal", "species:"),
        ("studoi:dc", "studio:"),
        ("charcter:link", "character:"),
        ("Specie:seal", "species:"),
    ],
)
def test_unknown_namespace_suggests_the_nearest(typo: str, suggestion: str) -> None:
    verdict = check_prompt(typo)
    assert not verdict.ok
    (error,) = verdict.errors
    assert error.code == "unknown_namespace"
    assert error.suggestion == suggestion
    assert typo.split(":")[0].lower() in error.message and suggestion in error.message


@pytest.mark.parametrize(
    "text",
    ["a poster, 16:9", "meeting at 12:30", "https://example.com/a:b", "re:zero", "(cat:1.2), dog", "ratio 4:3"],
)
def test_colons_that_are_not_namespaces_pass(text: str) -> None:
    verdict = check_prompt(text)
    assert verdict.ok, verdict.errors
    assert verdict.tags == ()


def test_tag_values_may_contain_colons_and_brackets() -> None:
    verdict = check_prompt("series:monster hunter:world, species:star (sky)")
    assert verdict.tags == (Tag("series", "monster hunter:world"), Tag("species", "star (sky)"))


def test_weighted_tags_keep_their_namespace() -> None:
    verdict = check_prompt("(species:seal:1.2), (studio:dc)")
    assert verdict.ok
    assert verdict.tags == (Tag("species", "seal"), Tag("studio", "dc"))
    assert verdict.prompt == "(species:seal:1.2), (studio:dc)"


def test_aliases_are_rewritten_with_a_note() -> None:
    verdict = check_prompt("artist:chris rallis, franchise:star wars")
    assert verdict.ok
    assert verdict.prompt == "creator:chris rallis, series:star wars"
    assert len(verdict.warnings) == 2 and "creator:" in verdict.warnings[0]


def test_provenance_namespaces_are_refused_with_the_reason() -> None:
    verdict = check_prompt("species:seal, subreddit:aww")
    assert [error.code for error in verdict.errors] == ["provenance_namespace"]
    assert "where a training image came from" in verdict.errors[0].message


def test_empty_prompt_and_empty_tag() -> None:
    assert [e.code for e in check_prompt(" , ,").errors] == ["empty"]
    assert [e.code for e in check_prompt("species:").errors] == ["empty_tag"]
    assert check_prompt("", allow_empty=True).ok


def test_token_budget_uses_the_given_counter() -> None:
    verdict = check_prompt("species:seal", count_tokens=lambda text: 80)
    assert verdict.tokens == 80
    assert [e.code for e in verdict.errors] == ["too_many_tokens"]
    assert "80 tokens" in verdict.errors[0].message


def test_raise_for_errors_names_the_problem() -> None:
    with pytest.raises(PromptRejected, match="Did you mean `species:`"):
        check_prompt("speces:seal").raise_for_errors()


def test_mentions_are_kept_as_text() -> None:
    verdict = check_prompt("@everyone species:seal, <@123>")
    assert verdict.ok and "@everyone" in verdict.prompt


def test_zero_width_characters_are_removed() -> None:
    assert check_prompt("spe\u200bcies:seal").tags == (Tag("species", "seal"),)


def test_far_words_get_no_suggestion() -> None:
    assert nearest_namespace("re") is None
    assert nearest_namespace("banana") is None
    assert nearest_namespace("artst") == "creator"


@given(st.text(max_size=3000))
def test_any_text_gets_a_verdict(text: str) -> None:
    verdict = check_prompt(text)
    again = check_prompt(verdict.prompt)
    if verdict.ok:
        assert again.prompt == verdict.prompt
