"""/stats through the real discord.py client, logged in to the fake Discord, after real images and votes."""

from __future__ import annotations

import pytest

from bot.engine.revision import short
from tests import _arena as plant
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
        assert [choice["value"] for choice in option["choices"]] == ["server", "me", "arena"]
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


PRODUCTION, CANDIDATE, OTHER = "a" * 40, "b" * 40, "sha256:<@&1>`@everyone"  # the last as a hostile worker names it


async def test_stats_for_the_arena(harness: Harness) -> None:
    server = harness.server
    async with harness.bot() as bot:
        db, guild = bot.service.db, server.guild_id
        assert (await answer(await server.slash("stats", {"for": "arena"}))).startswith("No arena votes yet")
        # Planted at strengths production 1, candidate 2, other 4 (the hand-computed set of tests/bot/test_arena.py).
        one = await plant.pair(db, left=PRODUCTION, right=CANDIDATE, production=PRODUCTION, guild_id=guild)
        two = await plant.pair(
            db, left=OTHER, right=PRODUCTION, production=PRODUCTION, tags=(("studio", "dc"),), guild_id=guild
        )
        three = await plant.pair(db, left=CANDIDATE, right=OTHER, guild_id=guild)
        member = await plant.votes(db, one.id, {"right": 18, "left": 8, "tie": 4})
        member = await plant.votes(db, two.id, {"left": 24, "right": 6, "both_bad": 3}, first_member=member)
        await plant.votes(db, three.id, {"left": 8, "right": 18, "tie": 4}, first_member=member)
        for number in range(20):  # one member always votes left, each on a new pair
            shown = await plant.pair(db, left=PRODUCTION, right=CANDIDATE, production=PRODUCTION, guild_id=guild)
            await db.record_arena_vote(pair_id=shown.id, user_id=7, choice="left", seconds=2.0 + number)

        text = await answer(await server.slash("stats", {"for": "arena"}))
    lines = text.splitlines()
    production, candidate, other = "`aaaaaaaaaaaa`", "`bbbbbbbbbbbb`", "`sha256:<@&1>'@every`"
    assert lines[:4] == [
        "**Arena: blind A/B votes here**",
        f"Production: {production}. Win rates count a tie as half.",
        # 18 wins, 4 ties, 8 + 20 losses: 20 of 50; Wilson 95% of 0.4 in 50 is 27.6%-53.8%.
        f"• {candidate} vs {production}: **40%** (95%: 28%–54%), 46 decisive votes, 4 ties, 0 both bad",
        f"• {other} vs {production}: **80%** (95%: 63%–90%), 30 decisive votes, 0 ties, 3 both bad",
    ]
    assert lines[4] == "**Ratings** (Bradley–Terry as Elo, production 1000; 95% bootstrap interval):"
    # Best first; production anchored at 1000; the always-left member's 20 losses pull the candidate under it.
    assert lines[5].startswith(f"• {other}: **") and lines[5].endswith(", 60 votes")
    assert lines[6] == f"• {production}: **1000** (1000–1000), 80 votes"
    assert lines[7].startswith(f"• {candidate}: **9") and lines[7].endswith(", 80 votes")
    assert lines[8:11] == [
        "**By namespace** of the prompt's tags:",
        f"• species: {candidate} 40% (28%–54%, 50 votes)",
        f"• studio: {other} 80% (63%–90%, 30 votes)",
    ]
    assert lines[11:] == [
        "Suspicious voters: **1** of 94 (nearly every vote the same, or most within a second).",
        "-# 3 “both bad” votes (in no rate).",
    ]
