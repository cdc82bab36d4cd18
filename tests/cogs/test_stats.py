"""/stats through the real discord.py client, logged in to the fake Discord, after real images and votes."""

from __future__ import annotations

import pytest

from bot.engine.revision import short
from tests.cogs.conftest import Harness, final_message, job_id_of
from tests.fakediscord import FakeDiscord, FakeInteraction


async def answer(interaction: FakeInteraction) -> str:
    """Return the text of a private answer that pings no one (and fail if it was public)."""
    await interaction.wait_response()
    assert interaction.deferred and interaction.ephemeral
    message = await interaction.wait_message()
    assert message.ephemeral and message.allowed_mentions == {"parse": []}
    return message.content


async def vote(server: FakeDiscord, message_id: int, custom_id: str, user_id: int) -> None:
    click = await server.click(message_id, custom_id, user_id=user_id)
    assert (await click.wait_response())["type"] == 7  # the tally on the buttons: the vote is stored


async def test_stats_for_the_server_and_for_me(harness: Harness) -> None:
    server = harness.server
    me = server.user_id
    other, third = server.add_user("other"), server.add_user("third")
    async with harness.bot():
        (option,) = server.commands["stats"]["options"]
        assert (option["name"], option.get("required", False)) == ("for", False)
        assert [choice["value"] for choice in option["choices"]] == ["server", "me"]
        assert await answer(await server.slash("stats")) == (
            "No images yet in this server: make the first with `/imagine`."
        )

        asked = await server.slash("imagine", {"prompt": "species:seal, studio:dc", "count": 2})
        mine = await final_message(server, asked)
        theirs = await final_message(server, await server.slash("imagine", {"prompt": "species:cat"}, user_id=other))
        for voter in (other, third, me):  # my first image: three up, my second one down; theirs: 1 up, 2 down
            await vote(server, mine.id, f"imagine:vote:{job_id_of(mine)}:0:up", voter)
        await vote(server, mine.id, f"imagine:vote:{job_id_of(mine)}:1:down", third)
        for voter, way in ((me, "up"), (third, "down"), (other, "down")):
            await vote(server, theirs.id, f"imagine:vote:{job_id_of(theirs)}:0:{way}", voter)

        text = await answer(await server.slash("stats"))
        lines = text.splitlines()
        assert lines[:2] == ["**Stats for this server**", "**3** images made; **7** votes, **57%** 👍."]
        # Ranked from stats.min_votes (3) votes; a job counts once in a namespace.
        assert "**Best namespaces:** studio 75% 👍 (4 votes)" in lines
        assert "**Worst namespaces:** species 57% 👍 (7 votes)" in lines
        assert "**Best tags:** species:seal 75% 👍 (4 votes) · studio:dc 75% 👍 (4 votes)" in lines
        assert "**Worst tags:** species:cat 33% 👍 (3 votes)" in lines
        assert any(line.startswith("**Busiest hours (UTC, images):** ") and line.endswith(" (3)") for line in lines)
        made_by = harness.render.engine.revision
        assert made_by is not None and f"• `{short(made_by)}`: 3 images, 7 votes, 57% 👍" in lines, text

        mine_text = await answer(await server.slash("stats", {"for": "me"}))
        assert mine_text.splitlines()[:3] == [
            "**Your stats here**",
            "You made **2** images; they got **4** votes, **75%** 👍.",
            "You cast **2** votes here, **100%** of them 👍.",
        ]
        assert "**Best tags:** species:seal 75% 👍 (4 votes)" in mine_text.splitlines()
        assert "**Worst tags:** studio:dc 75% 👍 (4 votes)" in mine_text.splitlines()
        assert "species:cat" not in mine_text
        third_text = await answer(await server.slash("stats", {"for": "me"}, user_id=third))
        assert third_text == (
            "**Your stats here**\nYou have made no images here yet: try `/imagine`.\n"
            "You cast **3** votes here, **33%** of them 👍."
        )


async def test_queue_says_how_the_gpu_cluster_is(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    note = "Workers: 2 up — cpu on host-a, NVIDIA H200 on host-b"
    async with harness.bot() as bot:
        monkeypatch.setattr(bot.service.scheduler, "worker_notes", lambda: [note])
        response = await (await harness.server.slash("queue")).wait_response()
    assert response["data"]["content"].splitlines()[:3] == [
        "**Queue:** 0 jobs waiting, 0 rendering.",
        note,
        "You have no jobs in the queue.",
    ]
