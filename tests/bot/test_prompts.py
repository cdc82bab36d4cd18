from __future__ import annotations

import logging
import string
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.engine._tokenizer import write_clip_tokenizer
from bot.errors import PromptRejected
from bot.prompts import Blocklist, Rules, Tag, Tokenizer, check_prompt, load_tokenizer, nearest_namespace, normalise
from bot.prompts.tokens import count_tokens


def codes(text: str, **kwargs: object) -> list[str]:
    return [error.code for error in check_prompt(text, **kwargs).errors]  # type: ignore[arg-type]


# Normalising


def test_tags_are_parsed_and_normalised_to_the_ine_form() -> None:
    verdict = check_prompt("  Species:Seal ,studio:DC,  cloudy_sky, creator:chris   rallis,,\tSpecies:Red_Panda ")
    assert verdict.ok
    assert verdict.prompt == "species:seal, studio:dc, cloudy sky, creator:chris rallis, species:red panda"
    assert verdict.tags == (
        Tag("species", "seal"),
        Tag("studio", "dc"),
        Tag("creator", "chris rallis"),
        Tag("species", "red panda"),
    )


def test_free_text_in_any_language_is_kept() -> None:
    verdict = check_prompt("una foca en la playa, 海豹, アザラシ, Mona Lisa")
    assert verdict.ok and verdict.prompt == "una foca en la playa, 海豹, アザラシ, Mona Lisa"
    assert verdict.tags == ()


def test_line_breaks_separate_items_and_fullwidth_forms_fold() -> None:
    assert check_prompt("species:seal\nｓｔｕｄｉｏ：ｄｃ").prompt == "species:seal, studio:dc"


def test_normalising_is_idempotent_on_examples() -> None:
    for text in [
        "(Species:Seal:1.2) ,  a__b",
        "artist:X_Y",
        "re:zero,16:9",
        "ＳＰＥＣＩＥＳ：ＳＥＡＬ",
        "İstanbul_sky",
    ]:
        once = normalise(text)
        assert normalise(once) == once


# Namespaces


@pytest.mark.parametrize(
    ("typo", "suggestion"),
    [
        ("speces:seal", "species:"),
        ("studoi:dc", "studio:"),
        ("charcter:link", "character:"),
        ("Specie:seal", "species:"),
    ],
)
def test_unknown_namespace_names_it_and_suggests_the_nearest(typo: str, suggestion: str) -> None:
    (error,) = check_prompt(typo).errors
    assert error.code == "unknown_namespace"
    assert error.suggestion == suggestion
    assert f"`{typo.split(':')[0].lower()}:`" in error.message and suggestion in error.message


def test_unknown_namespace_far_from_any_gets_no_suggestion() -> None:
    (error,) = check_prompt("style:anime").errors
    assert error.code == "unknown_namespace" and error.suggestion is None
    assert "`style:`" in error.message and "without the colon" in error.message


@pytest.mark.parametrize(
    "text",
    [
        "a poster, 16:9",
        "meeting at 12:30",
        "https://example.com/a:b",
        "http://x.y/z",
        "re:zero",
        "(cat:1.2), dog",
        "cat:1.2",
        "ratio 4:3",
        "note: remember the sea",
        "monster hunter:world",
        "日本語:テキスト",
        ":3, :d",
    ],
)
def test_colons_that_are_not_namespaces_are_text(text: str) -> None:
    verdict = check_prompt(text)
    assert verdict.ok, verdict.errors
    assert verdict.tags == ()


def test_tag_values_keep_their_colons_and_brackets() -> None:
    verdict = check_prompt("series:monster hunter:world, species:star (sky)")
    assert verdict.tags == (Tag("series", "monster hunter:world"), Tag("species", "star (sky)"))


def test_aliases_are_rewritten_with_a_note() -> None:
    verdict = check_prompt("artist:chris rallis, franchise:star wars, copyright:dc")
    assert verdict.ok
    assert verdict.prompt == "creator:chris rallis, series:star wars, series:dc"
    assert len(verdict.warnings) == 3
    assert "`artist:` became `creator:`" in verdict.warnings[0]


@pytest.mark.parametrize("namespace", ["title", "subreddit", "uploader", "booru", "category", "text", "pixiv work"])
def test_provenance_namespaces_are_refused_with_the_reason(namespace: str) -> None:
    (error,) = check_prompt(f"species:seal, {namespace}:something").errors
    assert error.code == "provenance_namespace"
    assert f"`{namespace}:`" in error.message and "where a training image came from" in error.message


def test_mature_ratings_need_a_channel_that_allows_them() -> None:
    (error,) = check_prompt("species:seal, rating:explicit").errors
    assert error.code == "rating_not_allowed" and "age-restricted" in error.message
    assert check_prompt("species:seal, rating:explicit", rules=Rules(allow_rating=True)).ok
    assert check_prompt("species:seal, rating:safe").ok


def test_empty_prompt_and_empty_tag() -> None:
    assert codes(" , ,") == ["empty"]
    assert codes("species:") == ["empty_tag"]
    assert check_prompt("", allow_empty=True).ok


# Weights


def test_weighted_tags_keep_their_namespace_and_weight() -> None:
    verdict = check_prompt("(species:seal:1.2), (Studio:DC), species:cat:0.8")
    assert verdict.ok
    assert verdict.tags == (Tag("species", "seal"), Tag("studio", "dc"), Tag("species", "cat"))
    assert verdict.prompt == "(species:seal:1.2), (studio:dc), species:cat:0.8"
    assert any("not applied" in warning for warning in verdict.warnings)


def test_a_weight_never_hides_a_bad_namespace() -> None:
    assert codes("(speces:seal:1.2)") == ["unknown_namespace"]
    assert codes("(title:x:1.1)") == ["provenance_namespace"]


def test_year_tags_are_numbers_not_weights() -> None:
    assert check_prompt("year:1999").tags == (Tag("year", "1999"),)


# Blocklist


@pytest.mark.parametrize(
    "text",
    [
        "species:seal, Forbidden",
        "FORBIDDEN fruit",
        "for\u200bbidden",  # zero-width space
        "ｆｏｒｂｉｄｄｅｎ",  # fullwidth
        "f\u043erbidd\u0435n",  # Cyrillic o and e
        "f0rb1dden",  # digits for letters
        "f o r b i d d e n",
        "fórbídden",
        "a very bad thing",
        "very-bad",
    ],
)
def test_blocked_terms_are_refused_without_repeating_them(text: str) -> None:
    rules = Rules(blocklist=Blocklist(["forbidden", "Very Bad"]))
    (error,) = check_prompt(text, rules=rules).errors
    assert error.code == "blocked_term"
    assert "forbidden" not in error.message.lower() and "bad" not in error.message.lower()


@pytest.mark.parametrize("text", ["forbiddenness", "unforbidden", "very good, bad", "species:seal"])
def test_blocked_terms_match_whole_words_only(text: str) -> None:
    assert check_prompt(text, rules=Rules(blocklist=Blocklist(["forbidden", "very bad"]))).ok


# Token budget


def test_token_count_is_the_clip_tokenizers(clip_tokenizer: Tokenizer) -> None:
    verdict = check_prompt("species:seal", tokenizer=clip_tokenizer)
    assert verdict.tokens == 3 and verdict.max_tokens == 75
    assert check_prompt("a photo of a cat", tokenizer=clip_tokenizer).tokens == 5
    prompt = "species:seal, studio:dc, cloudy sky, star (sky), medium:oil painting"
    assert check_prompt(prompt, tokenizer=clip_tokenizer).tokens == len(
        clip_tokenizer.encode(prompt, add_special_tokens=False)
    )


def test_a_model_out_of_reach_counts_with_the_bundled_clip_tokenizer_and_says_so(
    empty_hf_home: Path, clip_tokenizer: Tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="bot.prompts")
    tokenizer = load_tokenizer("Sygil/Sygil-Diffusion")
    prompt = "species:seal, studio:dc"
    clip = len(clip_tokenizer.encode(prompt, add_special_tokens=False))
    assert count_tokens(tokenizer, prompt).tokens == clip
    assert count_tokens(tokenizer, "cat " * 76).tokens == 76
    assert caplog.messages == [
        "Counting tokens with the bundled CLIP ViT-L/14 tokenizer: Sygil/Sygil-Diffusion: cannot reach the Hugging "
        f"Face hub and the model is not in the cache (HF_HOME={empty_hf_home})"
    ]


def test_a_cached_hub_model_counts_with_its_own_tokenizer_offline(
    empty_hf_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from transformers import CLIPTokenizer

    # The hub cache's layout: the branch names a commit, whose snapshot holds the model's files.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_hf_home / "hub" / "models--Sygil--Sygil-Diffusion"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    folder = repo / "snapshots" / commit / "tokenizer"
    write_clip_tokenizer(folder)
    own = CLIPTokenizer.from_pretrained(str(folder))
    own.add_tokens(["<sygil-style>"])  # what a textual inversion adds: one token where CLIP reads several
    own.save_pretrained(str(folder))
    caplog.set_level(logging.WARNING, logger="bot.prompts")
    tokenizer = load_tokenizer("Sygil/Sygil-Diffusion")
    assert tokenizer.encode("<sygil-style>", add_special_tokens=False) == [49408]
    assert caplog.messages == []


def test_too_long_prompts_are_refused_showing_what_would_be_cut(clip_tokenizer: Tokenizer) -> None:
    prompt = ", ".join(["species:seal"] * 20) + ", final words here"
    verdict = check_prompt(prompt, tokenizer=clip_tokenizer)
    (error,) = verdict.errors
    assert error.code == "too_many_tokens"
    assert verdict.tokens == 20 * 4 - 1 + 4
    assert f"{verdict.tokens} tokens" in error.message and "only 75" in error.message
    assert "final words here" in error.message


def test_truncation_setting_turns_the_refusal_into_a_warning(clip_tokenizer: Tokenizer) -> None:
    prompt = ", ".join(["species:seal"] * 20) + ", final words here"
    verdict = check_prompt(prompt, tokenizer=clip_tokenizer, rules=Rules(allow_truncation=True))
    assert verdict.ok
    assert any("final words here" in warning and "left out" in warning for warning in verdict.warnings)


def test_exactly_75_tokens_fit(clip_tokenizer: Tokenizer) -> None:
    assert check_prompt("cat " * 75, tokenizer=clip_tokenizer).ok
    assert not check_prompt("cat " * 76, tokenizer=clip_tokenizer).ok


def test_the_negative_prompt_is_named_in_its_errors(clip_tokenizer: Tokenizer) -> None:
    verdict = check_prompt("cat " * 80, field_name="negative prompt", tokenizer=clip_tokenizer)
    assert "The negative prompt is 80 tokens" in verdict.errors[0].message


def test_raise_for_errors_names_the_problem() -> None:
    with pytest.raises(PromptRejected, match="Did you mean `species:`"):
        check_prompt("speces:seal").raise_for_errors()


def test_mentions_are_kept_as_text() -> None:
    verdict = check_prompt("@everyone species:seal, <@123>")
    assert verdict.ok and "@everyone" in verdict.prompt


def test_nearest_namespace() -> None:
    assert nearest_namespace("re") is None
    assert nearest_namespace("banana") is None
    assert nearest_namespace("artst") == "creator"
    assert nearest_namespace("SPECIE") == "species"


def test_verdict_as_dict_is_the_json_format() -> None:
    data = check_prompt("speces:seal").as_dict()
    assert data == {
        "ok": False,
        "prompt": "speces:seal",
        "tags": [],
        "tokens": None,
        "max_tokens": 75,
        "errors": [
            {
                "code": "unknown_namespace",
                "message": "`speces:` is not a namespace Sygil knows. Did you mean `species:`?",
                "suggestion": "species:",
            }
        ],
        "warnings": [],
    }


# Any input at all

_nasty = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",))
    | st.sampled_from(["\u202e", "\u200b", "\u200d", "\x00", "\x1b", ":", ",", "(", ")", "_", " ", "🦭", "ｓ", "ا"]),
    max_size=400,
)


@settings(max_examples=300, deadline=None)
@given(_nasty)
def test_any_text_gets_a_verdict_and_normalising_twice_changes_nothing(text: str) -> None:
    verdict = check_prompt(text, rules=Rules(blocklist=Blocklist(["forbidden"])))
    assert isinstance(verdict.ok, bool)
    assert normalise(verdict.prompt) == verdict.prompt


@settings(max_examples=20, deadline=None)
@given(_nasty.filter(bool).map(lambda part: (part * (10_000 // len(part) + 1))[:10_000]))
def test_ten_thousand_characters_get_a_verdict(clip_tokenizer: Tokenizer, text: str) -> None:
    verdict = check_prompt(text, tokenizer=clip_tokenizer)
    assert len(text) == 10_000
    assert verdict.ok is (not verdict.errors)


@settings(max_examples=100, deadline=None)
@given(_nasty)
def test_any_text_gets_a_token_count(clip_tokenizer: Tokenizer, text: str) -> None:
    verdict = check_prompt(text, tokenizer=clip_tokenizer)
    if verdict.prompt:
        assert verdict.tokens is not None and verdict.tokens >= 1


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet=st.sampled_from(string.printable[:-5]), max_size=300)
    | st.lists(st.sampled_from(["species:seal", "Don't", "'S", "a1b2", "<|endoftext|>", "(x:1.2)", ",,", "!!?"])).map(
        " ".join
    )
    | _nasty
)
def test_token_counts_equal_the_tokenizers_own(clip_tokenizer: Tokenizer, text: str) -> None:
    assert count_tokens(clip_tokenizer, text).tokens == len(clip_tokenizer.encode(text, add_special_tokens=False))


def test_two_tags_without_a_comma_get_a_note() -> None:
    verdict = check_prompt("species:seal species:cat")
    assert verdict.ok and verdict.tags == (Tag("species", "seal species:cat"),)
    assert verdict.warnings == (
        "`species:seal species:cat` is read as one tag; put a comma before `species:` if you meant two.",
    )
    assert check_prompt("series:monster hunter:world").warnings == ()


def test_an_empty_tag_gets_an_example_from_its_namespace() -> None:
    assert "`creator:chris rallis`" in check_prompt("artist:").errors[0].message


# Tags inside free text


@pytest.mark.parametrize(
    ("text", "prompt", "tags"),
    [
        ("a photo of species:seal", "a photo of species:seal", (Tag("species", "seal"),)),
        ("A photo of Species:Seal on a beach", "A photo of species:seal on a beach", (Tag("species", "seal"),)),
        ("a species:seal", "a species:seal", (Tag("species", "seal"),)),
        (
            "a seal by studio:dc, species:cat",
            "a seal by studio:dc, species:cat",
            (Tag("studio", "dc"), Tag("species", "cat")),
        ),
        ("at 10:30 year:1999 re:zero", "at 10:30 year:1999 re:zero", (Tag("year", "1999"),)),
        ("a photo (species:seal:1.2)", "a photo (species:seal:1.2)", (Tag("species", "seal"),)),
        ("a_photo_of_species:seal", "a photo of species:seal", (Tag("species", "seal"),)),
    ],
)
def test_a_namespace_word_inside_free_text_is_a_tag(text: str, prompt: str, tags: tuple[Tag, ...]) -> None:
    verdict = check_prompt(text)
    assert verdict.ok, verdict.errors
    assert verdict.prompt == prompt and verdict.tags == tags
    assert check_prompt(verdict.prompt).tags == tags


def test_a_tag_inside_free_text_is_that_one_word() -> None:
    # A multi-word tag needs its own item; mid-item, it ends at its first space (underscores are spaces).
    assert check_prompt("a painting by creator:chris rallis").tags == (Tag("creator", "chris"),)
    assert check_prompt("a painting, creator:chris rallis").tags == (Tag("creator", "chris rallis"),)
    # Whole items keep their reading: a tag from the first colon to the end of the item.
    assert check_prompt("species:seal on a beach").tags == (Tag("species", "seal on a beach"),)


@pytest.mark.parametrize(
    ("text", "suggestions"),
    [
        ("a photo of speces:seal", ["species:"]),
        ("A Photo Of Speces:Seal", ["species:"]),
        ("a speces:seal and a studoi:dc", ["species:", "studio:"]),
        ("a seal, drawn by artst:someone", ["creator:"]),
    ],
)
def test_a_namespace_typo_inside_free_text_gets_the_suggestion(text: str, suggestions: list[str]) -> None:
    verdict = check_prompt(text)
    assert [error.code for error in verdict.errors] == ["unknown_namespace"] * len(suggestions)
    assert [error.suggestion for error in verdict.errors] == suggestions
    assert "`speces:` is not a namespace Sygil knows. Did you mean `species:`?" in [
        error.message for error in check_prompt("a photo of speces:seal").errors
    ]


def test_a_tag_inside_free_text_gets_the_checks_of_a_whole_item() -> None:
    verdict = check_prompt("a painting by artist:chris_rallis")
    assert verdict.ok and verdict.prompt == "a painting by creator:chris rallis"
    assert verdict.tags == (Tag("creator", "chris"),)
    assert "`artist:` became `creator:`" in verdict.warnings[0]
    assert codes("a photo of rating:explicit") == ["rating_not_allowed"]
    assert check_prompt("a photo of rating:explicit", rules=Rules(allow_rating=True)).ok
    # Provenance names steer nothing; mid-item they stay text, as they always were (alone they are refused).
    verdict = check_prompt("a photo from subreddit:pics")
    assert verdict.ok and verdict.tags == () and verdict.prompt == "a photo from subreddit:pics"


@pytest.mark.parametrize(
    "text",
    [
        "meeting at 12:30 on the beach",
        "a poster in 16:9 format",
        "see https://example.com/a:b for the pose",
        "a poster of monster hunter:world",
        "a poster of monster hunter:world 2",
        "cover art of re:zero season two",
        "a smiling seal :3 so cute",
        "a seal :D",
        "a custom emoji <:seal:123456> here",
        "a timestamp <t:1700000000:R> here",
        "a photo of hunter:world",
        "a note: remember the sea",
        "a list of genres: fantasy",
        "a photo of species: seal",
        "a photo of species:",
        "a b:c d",
        "a (cat:1.2) and a dog",
        "日本語 テキスト:テキスト",
    ],
)
def test_colons_inside_free_text_that_are_not_namespaces_stay_text(text: str) -> None:
    verdict = check_prompt(text)
    assert verdict.ok, verdict.errors
    assert verdict.tags == () and verdict.prompt == normalise(verdict.prompt)


_WORDS = (
    "a photo of species:seal Speces:Seal artist:chris_rallis (species:seal:1.2) 10:30 https://x.y/a:b :3 re:zero "
    "hunter:world x_studio:dc note: species: cat:1.2 _"
).split()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_WORDS), min_size=1, max_size=8).map(lambda words: "a " + " ".join(words)))
def test_tags_inside_free_text_are_read_the_same_from_the_normalised_prompt(text: str) -> None:
    verdict = check_prompt(text)
    assert normalise(verdict.prompt) == verdict.prompt
    again = check_prompt(verdict.prompt)
    assert again.tags == verdict.tags and again.errors == verdict.errors
