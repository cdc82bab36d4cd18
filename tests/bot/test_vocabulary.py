from __future__ import annotations

import importlib.util
from importlib import resources
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot.prompts.namespaces import ALIASES, CONTENT, PROVENANCE
from bot.prompts.vocabulary import MAX_CHOICE_LENGTH, MAX_CHOICES, NAMESPACE_ORDER, Entry, Vocabulary, normalise_tag

ROOT = Path(__file__).resolve().parents[2]
VOCABULARY = Vocabulary.load()


@pytest.fixture(scope="module")
def build_script() -> ModuleType:
    """Import scripts/build_vocabulary.py, which is a script and not part of the package."""
    spec = importlib.util.spec_from_file_location("build_vocabulary", ROOT / "scripts" / "build_vocabulary.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _packaged_lines() -> list[list[str]]:
    text = resources.files("bot.prompts").joinpath("vocabulary.tsv").read_text("utf-8")
    header, *lines = text.splitlines()
    assert header == "namespace\ttag\tweight"
    return [line.split("\t") for line in lines]


def test_every_content_namespace_is_offered_once() -> None:
    assert sorted(NAMESPACE_ORDER) == sorted(CONTENT)
    assert VOCABULARY.complete("") == [f"{namespace}:" for namespace in NAMESPACE_ORDER]


def test_packaged_vocabulary_loads_with_every_content_namespace() -> None:
    assert 800 <= len(VOCABULARY) <= 2000
    for namespace in CONTENT:
        assert VOCABULARY.tags(namespace), namespace
    assert VOCABULARY.tags("")
    assert [entry.tag for entry in VOCABULARY.tags("rating")] == ["safe", "questionable", "explicit"]
    assert {entry.tag for entry in VOCABULARY.tags("year")} >= {str(year) for year in range(1990, 2024)}


def test_packaged_lines_are_normalised_content_tags() -> None:
    lines = _packaged_lines()
    assert len(lines) == len(VOCABULARY)  # no duplicates
    for fields in lines:
        assert len(fields) == 3, fields
        namespace, tag, weight = fields
        assert namespace == "" or namespace in CONTENT, fields
        assert namespace not in PROVENANCE and namespace not in ALIASES
        assert tag == normalise_tag(tag) and tag == " ".join(tag.split()) and "_" not in tag, fields
        assert "," not in tag and int(weight) >= 0, fields


def test_entries_print_as_prompt_tags() -> None:
    assert str(Entry("species", "seal", 3)) == "species:seal"
    assert str(Entry("", "star (sky)", 3)) == "star (sky)"
    assert "species:seal" in VOCABULARY
    assert "Species:Seal" in VOCABULARY
    assert "artist:chris rallis" in VOCABULARY  # the alias names the same tag as creator:
    assert "series:monster hunter:world" in VOCABULARY  # a colon inside a tag value
    assert "cloudy_sky" in VOCABULARY
    assert "species:chris rallis" not in VOCABULARY
    assert 3 not in VOCABULARY


def test_tags_are_commonest_first() -> None:
    weights = [entry.weight for entry in VOCABULARY.tags("species")]
    assert weights == sorted(weights, reverse=True)
    assert VOCABULARY.tags("artist") == VOCABULARY.tags("creator")
    assert VOCABULARY.tags("title") == []


@pytest.mark.parametrize(
    ("text", "first"),
    [
        ("spe", "species:"),
        ("Spe", "species:"),
        ("stu", "studio:"),
        ("arti", "creator:"),
        ("copy", "series:"),
        ("", "species:"),
        ("species:se", "species:seal"),
        ("studio:DC", "studio:dc"),
        ("creator:chris_ral", "creator:chris rallis"),
        ("artist:chris ral", "creator:chris rallis"),
        ("series:monster hunter:", "series:monster hunter:world"),
        ("a beach,species:se", "a beach, species:seal"),
        ("(species:sea", "(species:seal"),
    ],
)
def test_completion_examples(text: str, first: str) -> None:
    assert VOCABULARY.complete(text)[0] == first


def test_bare_words_complete_namespaces_then_tags_of_any_namespace() -> None:
    choices = VOCABULARY.complete("sea")
    assert "species:seal" in choices and "person:seal" in choices
    choices = VOCABULARY.complete("st")
    assert choices[0] == "studio:"
    assert {"series:star wars", "stars", "action:standing"} <= set(choices)
    assert "star (sky)" in VOCABULARY.complete("star (")


def test_whole_value_is_returned_with_earlier_items_kept() -> None:
    choices = VOCABULARY.complete("a beach,  cloudy sky ,species:se")
    assert choices
    assert all(choice.startswith("a beach, cloudy sky, species:") for choice in choices)
    assert "a beach, cloudy sky, species:seal" in choices


@pytest.mark.parametrize(
    "text",
    ["speces:", "speces:se", "title:", "subreddit:aww", "source:x", "s", "a beach,", "a beach, ", "species:zzzz"],
)
def test_nothing_to_suggest(text: str) -> None:
    assert VOCABULARY.complete(text) == []


def test_provenance_namespaces_are_never_suggested() -> None:
    for prefix in ("ti", "sub", "up", "boo", "cat", "te", "pix", "web", "sou"):
        for choice in VOCABULARY.complete(prefix):
            assert choice.partition(":")[0] not in PROVENANCE, choice


def test_namespaces_restrict_suggestions() -> None:
    assert VOCABULARY.complete("", namespaces=["species", "medium"]) == ["species:", "medium:"]
    choices = VOCABULARY.complete("sp", namespaces=["species"])
    assert choices[0] == "species:" and all(choice.startswith("species:") for choice in choices)
    assert VOCABULARY.complete("sea", namespaces=["species"])[0] == "species:seal"
    assert VOCABULARY.complete("studio:dc", namespaces=["species"]) == []
    assert "sunset" in VOCABULARY.complete("sun", namespaces=[""])


def test_ranking_is_by_weight_then_alphabetical() -> None:
    vocabulary = Vocabulary(
        [
            Entry("species", "seal", 5),
            Entry("species", "sea lion", 5),
            Entry("species", "seahorse", 9),
            Entry("", "sea", 7),
            Entry("species", "seal", 1),  # a duplicate keeps the higher weight
        ]
    )
    assert len(vocabulary) == 4
    assert vocabulary.complete("species:se") == ["species:seahorse", "species:sea lion", "species:seal"]
    assert vocabulary.complete("sea") == ["species:seahorse", "sea", "species:sea lion", "species:seal"]
    assert vocabulary.complete("species:") == ["species:seahorse", "species:sea lion", "species:seal"]


def test_limit_and_length() -> None:
    assert len(VOCABULARY.complete("species:")) == MAX_CHOICES
    assert len(VOCABULARY.complete("species:", limit=3)) == 3
    head = "x" * 85 + ", "
    choices = VOCABULARY.complete(head + "species:")
    assert choices and all(len(choice) <= MAX_CHOICE_LENGTH for choice in choices)
    assert VOCABULARY.complete("x" * 120 + ", species:") == []
    assert all(len(choice) <= 20 for choice in VOCABULARY.complete("species:", max_length=20))


_TYPED = st.one_of(
    st.text(max_size=30),
    st.sampled_from([str(entry) for entry in VOCABULARY.tags("")] + [f"{ns}:" for ns in CONTENT]).flatmap(
        lambda tag: st.integers(0, len(tag)).map(lambda end: tag[:end])
    ),
    st.sampled_from([f"{ns}:{entry.tag}" for ns in sorted(CONTENT) for entry in VOCABULARY.tags(ns)[:20]]).flatmap(
        lambda tag: st.integers(0, len(tag)).map(lambda end: tag[:end])
    ),
)


@given(head=st.lists(st.text(alphabet="abc xyz_:(", max_size=40), max_size=4), last=_TYPED)
def test_completion_limits_hold_for_any_input(head: list[str], last: str) -> None:
    text = ",".join([*head, last])
    choices = VOCABULARY.complete(text)
    assert len(choices) <= MAX_CHOICES
    assert len(set(choices)) == len(choices)
    earlier = ", ".join(item.strip() for item in head if item.strip())
    for choice in choices:
        assert len(choice) <= MAX_CHOICE_LENGTH
        assert choice.startswith(earlier)
        namespace = choice[len(earlier) :].lstrip(", (").partition(":")[0]
        assert namespace not in PROVENANCE


def test_constructor_and_load_refuse_bad_entries(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="content namespace"):
        Vocabulary([Entry("title", "a seal", 1)])
    with pytest.raises(ValueError, match="normalised"):
        Vocabulary([Entry("species", "Sea_Lion", 1)])
    with pytest.raises(ValueError, match="starts with a namespace"):
        Vocabulary([Entry("", "species:seal", 1)])
    path = tmp_path / "vocabulary.tsv"
    path.write_text("namespace\ttag\tweight\nspecies\tseal\t3\nspecies\tseal\n", "utf-8")
    with pytest.raises(ValueError, match=r"vocabulary\.tsv:3"):
        Vocabulary.load(path)


def test_build_script_round_trip(build_script: ModuleType, tmp_path: Path) -> None:
    export = tmp_path / "export.csv"
    export.write_text(
        "tag,count\n"
        "Species:Seal,40\n"
        "species:cat,90\n"
        "species:sea_lion,30\n"
        "species:dog,10\n"
        "artist:Chris_Rallis,7\n"
        "creator:chris rallis,5\n"
        "franchise:star wars,12\n"
        "copyright:monster hunter:world,6\n"
        "title:my seal photo,500\n"
        "subreddit:aww,400\n"
        "pixiv work:12345,300\n"
        "cloudy_sky,50\n"
        "re:zero,4\n"
        "  star   (sky) ,8\n",
        "utf-8",
    )
    output = tmp_path / "vocabulary.tsv"
    assert build_script.main([str(export), "-o", str(output), "--per-namespace", "2"]) == 0
    vocabulary = Vocabulary.load(output)
    assert [str(entry) for entry in vocabulary.tags("species")] == ["species:cat", "species:seal"]  # top 2
    assert [(entry.tag, entry.weight) for entry in vocabulary.tags("creator")] == [("chris rallis", 12)]
    assert {str(entry) for entry in vocabulary.tags("series")} == {"series:star wars", "series:monster hunter:world"}
    assert [str(entry) for entry in vocabulary.tags("")] == ["cloudy sky", "star (sky)"]
    text = output.read_text("utf-8")
    for word in ("title", "subreddit", "pixiv", "artist", "franchise", "copyright", "_"):
        assert word not in text
    assert vocabulary.complete("species:s") == ["species:seal"]


def test_build_script_reads_tsv_without_header(build_script: ModuleType, tmp_path: Path) -> None:
    export = tmp_path / "export.tsv"
    export.write_text("species:seal\t3\nre:zero\t2\nwebsite:example.com\t9\n", "utf-8")
    entries = build_script.build(build_script.read_counts(export))
    assert entries == [Entry("", "re:zero", 2), Entry("species", "seal", 3)]
