"""/tags through the real discord.py client, logged in to the fake Discord."""

from __future__ import annotations

from bot.prompts.guide import NamespaceGuide
from bot.prompts.namespaces import DESCRIPTIONS
from bot.prompts.vocabulary import NAMESPACE_ORDER, Vocabulary
from cogs.tags import MAX_MESSAGE, listing, overview
from tests.cogs.conftest import Harness
from tests.fakediscord import FakeInteraction

VOCABULARY = Vocabulary.load()


async def answer(interaction: FakeInteraction) -> str:
    """Return the text of a private answer that pings no one (and fail if it was public)."""
    response = await interaction.wait_response()
    assert response["type"] == 4, response
    assert interaction.ephemeral, f"public answer: {response}"
    assert response["data"].get("allowed_mentions") == {"parse": []}
    return response["data"]["content"]


async def test_tags_describes_every_namespace_with_its_most_used_tags(harness: Harness) -> None:
    server = harness.server
    async with harness.bot():
        options = server.commands["tags"]["options"]
        assert [(option["name"], option.get("required", False), option["autocomplete"]) for option in options] == [
            ("namespace", False, True)
        ]
        text = await answer(await server.slash("tags"))
    assert len(text) <= 2000
    lines = text.splitlines()
    for name in NAMESPACE_ORDER:
        (line,) = [line for line in lines if line.startswith(f"• `{name}:`")]
        assert DESCRIPTIONS[name] in line
        assert ", ".join(entry.tag for entry in VOCABULARY.tags(name)[:3]) in line, line
    assert "human, cat, dog" in text and "`/tags namespace:species`" in text


async def test_tags_of_one_namespace_fill_one_message_and_say_how_many_are_left(harness: Harness) -> None:
    server = harness.server
    async with harness.bot():
        species = await answer(await server.slash("tags", {"namespace": "species"}))
        series = await answer(await server.slash("tags", {"namespace": "Series:"}))
        rating = await answer(await server.slash("tags", {"namespace": "rating"}))
    assert species.startswith(f"**`species:`** {DESCRIPTIONS['species']}.")
    assert "150 tags known to the autocomplete, most used first:\nhuman, cat, dog, fox, wolf, dragon," in species
    assert "more:" not in species  # all of them fit
    assert 1900 < len(series) <= 2000
    shown = series.splitlines()[2].split(", ")
    assert shown == [entry.tag for entry in VOCABULARY.tags("series")[: len(shown)]]
    assert series.endswith(
        f"…and {150 - len(shown)} more: type `series:` and a few letters in `/imagine` to find them."
    )
    assert rating.endswith("\nsafe, questionable, explicit")


async def test_an_unknown_namespace_gets_a_private_suggestion(harness: Harness) -> None:
    server = harness.server
    async with harness.bot():
        typo = await answer(await server.slash("tags", {"namespace": "speces"}))
        far = await answer(await server.slash("tags", {"namespace": "@everyone"}))
    assert typo == "`speces` is not a namespace Sygil knows. Did you mean `species`? Try `/tags namespace:species`."
    assert "`@everyone` is not a namespace Sygil knows. The namespaces are: `species`, `studio`," in far


async def test_the_namespace_option_autocompletes(harness: Harness) -> None:
    server = harness.server
    async with harness.bot():
        everything = await server.autocomplete("tags", {"namespace": ""}, focused="namespace")
        typed = await server.autocomplete("tags", {"namespace": "st"}, focused="namespace")
        alias = await server.autocomplete("tags", {"namespace": "artist"}, focused="namespace")
    assert [choice["value"] for choice in everything] == list(NAMESPACE_ORDER)
    assert [choice["value"] for choice in typed] == ["studio"]
    assert alias == [{"name": "creator: " + DESCRIPTIONS["creator"].replace("`", ""), "value": "creator"}]
    assert all(len(choice["name"]) <= 100 for choice in everything)


def test_long_lists_are_cut_to_one_message() -> None:
    many = NamespaceGuide("species", "creatures", tuple(f"tag number {i}" for i in range(1000)))
    text = listing(many)
    shown = text.splitlines()[2].split(", ")
    assert len(text) <= MAX_MESSAGE and shown == list(many.tags[: len(shown)])
    assert text.endswith(
        f"…and {1000 - len(shown)} more: type `species:` and a few letters in `/imagine` to find them."
    )
    wordy = [NamespaceGuide(f"n{i}", "x" * 85, ("some tag", "another tag")) for i in range(16)]
    text = overview(wordy)
    assert len(text) <= MAX_MESSAGE and text.count("some tag") == 16 and "another tag" not in text
    assert listing(NamespaceGuide("meme", "memes", ("x*y_z",))).endswith("\nx\\*y\\_z")
