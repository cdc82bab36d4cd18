"""The blind A/B arena through the real discord.py client on the fake Discord: production on the tiny model and a
candidate on a copy of it with one weight changed, each on its own worker thread."""

from __future__ import annotations

import shutil
import sys
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from bot.config import ArenaConfig
from bot.engine import Engine
from bot.engine.executor import Progress
from bot.engine.types import ImageSpec, RenderedImage
from bot.errors import RenderFailed
from bot.jobs import JobStatus
from bot.limits import standard_images
from tests.bot.engine.test_revision import retrain
from tests.cogs.conftest import GatedRender, Harness, all_delivered, fail_on_our_errors, pngs
from tests.fakediscord import FakeDiscord, FakeInteraction, Message

MANAGE_GUILD = 1 << 5
CHOICES = ("left", "right", "tie", "both_bad")


@pytest.fixture(scope="module")
def candidate_engine(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """The tiny model with one weight changed: a new checkpoint to compare with production."""
    folder = shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("candidate") / "model")
    retrain(folder)
    return Engine.load(str(folder), device="cpu", dtype="float32", scheduler="dpm++")


@pytest.fixture
async def arena(engine: Engine, candidate_engine: Engine, tmp_path: Path) -> AsyncIterator[Harness]:
    with fail_on_our_errors():
        async with FakeDiscord() as server:
            yield Harness(
                server=server,
                database=tmp_path / "sygil.db",
                render=GatedRender(engine),
                candidate=GatedRender(candidate_engine),
            )
            assert server.violations == []


async def pair_message(server: FakeDiscord, interaction: FakeInteraction) -> Message:
    return await server.wait_for_message(lambda m: m.interaction_id == interaction.id and bool(m.attachments), 60)


def pair_id_of(message: Message) -> int:
    return int(message.custom_ids[0].split(":")[2])


async def private(interaction: FakeInteraction) -> str:
    """Return the text of a private answer (and fail if it was public)."""
    response = await interaction.wait_response()
    assert response["type"] == 4, response
    assert interaction.ephemeral, f"public answer: {response}"
    assert response["data"].get("allowed_mentions") == {"parse": []}
    return response["data"]["content"]


async def test_compare_posts_one_blind_pair_rendered_by_each_revision(
    arena: Harness, engine: Engine, candidate_engine: Engine
) -> None:
    server = arena.server
    assert engine.revision is not None and candidate_engine.revision is not None
    async with arena.bot() as bot:
        interaction = await server.slash("imagine", {"prompt": "species:seal", "seed": 7, "compare": True})
        message = await pair_message(server, interaction)
        await all_delivered(bot.db)

        # One message for the pair, none for its two jobs, and nothing in it names a revision.
        shown = [m for m in server.messages(server.channel_id) if m.attachments]
        assert shown == [message]
        assert [attachment.filename for attachment in message.attachments] == ["left.png", "right.png"]
        for text in (engine.revision, candidate_engine.revision, arena.candidate_name, "production"):
            assert text not in message.content
        for image in pngs(message):
            assert image.size == (64, 64)
            assert not image.info, image.info  # no text chunks: the engine's name the revision
        assert message.allowed_mentions == {"parse": []}
        pair_id = pair_id_of(message)
        assert message.custom_ids == [f"arena:vote:{pair_id}:{choice}" for choice in CHOICES]

        # Each side was rendered by its own revision, from the same prompt and seed.
        pair = await bot.db.arena_pair(pair_id=pair_id)
        assert pair is not None and pair.message_id == message.id and pair.requester_id == server.user_id
        assert {pair.left_revision, pair.right_revision} == {engine.revision, candidate_engine.revision}
        assert pair.production_side in ("left", "right")
        production_revision = pair.left_revision if pair.production_side == "left" else pair.right_revision
        assert production_revision == engine.revision
        jobs = [await bot.db.get_job(job_id=side[0]) for side in (pair.left, pair.right)]
        assert all(job is not None and job.status is JobStatus.DONE and job.message_id == message.id for job in jobs)
        assert {job.revision for job in jobs if job} == {None, arena.candidate_name}
        assert len({(job.prompt, job.seed, job.settings) for job in jobs if job}) == 1
        for job_id, _ in (pair.left, pair.right):
            [record] = await bot.db.job_images(job_id=job_id)
            assert record.provenance is not None
        left, right = pngs(message)
        assert left.tobytes() != right.tobytes()

        # The requester paid for one image; the candidate's is the server's.
        production_job = next(job for job in jobs if job and job.revision is None)
        used = bot.service.usage.used(guild_id=server.guild_id, user_id=server.user_id)
        assert used == standard_images(production_job.settings, 1)


async def test_votes_count_once_per_member_and_the_reveal_is_private(arena: Harness, engine: Engine) -> None:
    server = arena.server
    other = server.add_user("other")
    async with arena.bot() as bot:
        interaction = await server.slash("imagine", {"prompt": "species:seal", "compare": True})
        message = await pair_message(server, interaction)
        pair_id = pair_id_of(message)
        pair = await bot.db.arena_pair(pair_id=pair_id)
        assert pair is not None and engine.revision is not None

        first = await private(await server.click(message.id, f"arena:vote:{pair_id}:left"))
        assert "You voted **Left**" in first
        production = "left" if pair.production_side == "left" else "right"
        assert f"**{production.capitalize()}**: production `{engine.revision}`" in first
        assert f"candidate `{pair.right_revision if production == 'left' else pair.left_revision}`" in first
        assert "⬅️ 1 · ➡️ 0 · 🤝 0 · 👎 0" in first

        # The requester changes their vote: it replaces the first.
        changed = await private(await server.click(message.id, f"arena:vote:{pair_id}:right"))
        assert "⬅️ 0 · ➡️ 1 · 🤝 0 · 👎 0" in changed
        again = await private(await server.click(message.id, f"arena:vote:{pair_id}:right"))
        assert "⬅️ 0 · ➡️ 1 · 🤝 0 · 👎 0" in again
        # Another member's vote counts like the requester's.
        theirs = await private(await server.click(message.id, f"arena:vote:{pair_id}:both_bad", user_id=other))
        assert "⬅️ 0 · ➡️ 1 · 🤝 0 · 👎 1" in theirs

        # The public message still names no revision.
        shown = server.message(message.id)
        assert engine.revision not in shown.content and shown.attachments == message.attachments


async def test_a_forged_vote_for_another_pair_does_nothing(arena: Harness) -> None:
    server = arena.server
    async with arena.bot() as bot:
        first = await pair_message(server, await server.slash("imagine", {"prompt": "species:seal", "compare": True}))
        second = await pair_message(server, await server.slash("imagine", {"prompt": "studio:dc", "compare": True}))
        first_id, second_id = pair_id_of(first), pair_id_of(second)
        for forged in (f"arena:vote:{second_id}:left", f"arena:vote:{second_id + 100}:tie"):
            text = await private(await server.click(first.id, forged, forged=True))
            assert text == "That comparison is not the one on this message, so no vote was recorded."
        assert first_id != second_id
        assert await bot.db.arena_voters(guild_id=server.guild_id) == []  # no vote stored on either pair


async def test_moderators_turn_the_arena_off_and_compare_is_refused_privately(arena: Harness) -> None:
    server = arena.server
    admin = server.add_user("admin", roles=[server.add_role("Admins", MANAGE_GUILD)])
    async with arena.bot() as bot:
        off = await private(await server.slash("mod arena", {"state": "off"}, user_id=admin))
        assert "The arena is off" in off
        assert "already off" in await private(await server.slash("mod arena", {"state": "off"}, user_id=admin))
        refused = await private(await server.slash("imagine", {"prompt": "species:seal", "compare": True}))
        assert refused == "The moderators turned the arena off in this server, so there is nothing to compare."
        assert await bot.db.get_job(job_id=1) is None  # nothing stored, nothing charged
        assert bot.service.usage.used(guild_id=server.guild_id, user_id=server.user_id) == 0
        [entry, *_] = await bot.service.moderation.audit_log(server.guild_id)
        assert (entry.action, entry.old, entry.new, entry.moderator_id) == ("arena", "on", "off", admin)

        denied = await private(await server.slash("mod arena", {"state": "on"}))
        assert denied.startswith("Only moderators can use /mod")
    # Stored: still off after a restart, until a moderator turns it on.
    async with arena.bot():
        refused = await private(await server.slash("imagine", {"prompt": "species:seal", "compare": True}))
        assert "turned the arena off" in refused
        assert "The arena is on" in await private(await server.slash("mod arena", {"state": "on"}, user_id=admin))
        message = await pair_message(server, await server.slash("imagine", {"prompt": "species:seal", "compare": True}))
        assert [attachment.filename for attachment in message.attachments] == ["left.png", "right.png"]


async def test_compare_without_a_candidate_is_refused_privately(harness: Harness) -> None:
    server = harness.server
    async with harness.bot():
        refused = await private(await server.slash("imagine", {"prompt": "species:seal", "compare": True}))
        assert refused == ("The arena is not set up here: this bot serves no candidate model revision to compare with.")


async def test_at_arena_rate_one_an_ordinary_imagine_becomes_a_pair(arena: Harness) -> None:
    server = arena.server
    admin = server.add_user("admin", roles=[server.add_role("Admins", MANAGE_GUILD)])
    arena.arena = ArenaConfig(rate=1.0)
    async with arena.bot() as bot:
        message = await pair_message(server, await server.slash("imagine", {"prompt": "species:seal"}))
        assert [attachment.filename for attachment in message.attachments] == ["left.png", "right.png"]
        assert await bot.db.arena_pair(pair_id=pair_id_of(message)) is not None
        # Several images are an ordinary request: the arena compares one image each.
        several = await server.slash("imagine", {"prompt": "species:seal", "count": 2})
        shown = await pair_message(server, several)
        assert shown.attachments[0].filename.startswith("sygil_") and len(shown.attachments) == 2
        # Where the moderators turned the arena off, every request is an ordinary one.
        await private(await server.slash("mod arena", {"state": "off"}, user_id=admin))
        plain = await pair_message(server, await server.slash("imagine", {"prompt": "studio:dc"}))
        assert [attachment.filename.startswith("sygil_") for attachment in plain.attachments] == [True]
        await all_delivered(bot.db)
        job = await bot.db.get_job(job_id=4)  # jobs 1 and 2 were the first pair, 3 the two images
        assert job is not None and job.revision is None and await bot.db.get_job(job_id=5) is None


async def test_a_pair_queued_at_shutdown_is_delivered_as_a_plain_result_after_a_restart(arena: Harness) -> None:
    server = arena.server
    assert arena.candidate is not None
    async with arena.bot():
        arena.render.open.clear()
        arena.candidate.open.clear()
        interaction = await server.slash("imagine", {"prompt": "species:seal", "compare": True})
        assert (await interaction.wait_response())["type"] == 5
        # While the pair waits, its message shows where it is, and still names no revision.
        status = await server.wait_for_message(
            lambda m: m.interaction_id == interaction.id and m.content.startswith("⚖️ Blind comparison\n🎨 Rendering")
        )
        assert arena.candidate_name not in status.content and not status.attachments
        # Shutting down waits for the batches on the GPUs: let them finish soon after the bot has stopped.
        threading.Timer(0.5, arena.render.open.set).start()
        threading.Timer(0.5, arena.candidate.open.set).start()
    assert not any(m.attachments for m in server.messages(server.channel_id))

    async with arena.bot() as bot:
        # The production image comes as an ordinary result; the candidate's, half a pair, is not shown.
        delivered = await server.wait_for_message(lambda m: "species:seal" in m.content and bool(m.attachments), 60)
        await all_delivered(bot.db)
        assert delivered.attachments[0].filename.startswith("sygil_") and len(delivered.attachments) == 1
        jobs = [await bot.db.get_job(job_id=job_id) for job_id in (1, 2)]
        assert [(job.revision, job.status) for job in jobs if job] == [
            (None, JobStatus.DONE),
            (arena.candidate_name, JobStatus.CANCELLED),
        ]
        # Read back after the restart, the requester's usage is the one image they asked for.
        used = bot.service.usage.used(guild_id=server.guild_id, user_id=server.user_id)
        assert jobs[0] is not None and used == standard_images(jobs[0].settings, 1)


class BrokenRender(GatedRender):
    """A candidate whose GPU fails every batch."""

    def __call__(self, specs: Sequence[ImageSpec], progress: Progress | None = None, /) -> list[RenderedImage]:
        raise RenderFailed("the candidate's GPU fell over")


async def test_when_half_a_pair_fails_the_requester_is_told_and_not_charged(arena: Harness) -> None:
    server = arena.server
    assert arena.candidate is not None
    arena.candidate = BrokenRender(arena.candidate.engine)
    async with arena.bot() as bot:
        interaction = await server.slash("imagine", {"prompt": "species:seal", "compare": True})
        failed = await server.wait_for_message(lambda m: m.interaction_id == interaction.id and "❌" in m.content)
        assert "the candidate's GPU fell over" in failed.content and not failed.attachments
        await all_delivered(bot.db)
        assert not any(m.attachments for m in server.messages(server.channel_id))
        assert bot.service.usage.used(guild_id=server.guild_id, user_id=server.user_id) == 0
        jobs = [await bot.db.get_job(job_id=job_id) for job_id in (1, 2)]
        assert [job.status for job in jobs if job] == [JobStatus.FAILED, JobStatus.FAILED]


async def test_vote_buttons_keep_working_after_a_restart(arena: Harness) -> None:
    server = arena.server
    async with arena.bot() as bot:
        message = await pair_message(server, await server.slash("imagine", {"prompt": "species:seal", "compare": True}))
        await all_delivered(bot.db)
    async with arena.bot():
        text = await private(await server.click(message.id, f"arena:vote:{pair_id_of(message)}:tie"))
        assert "You voted **Tie**" in text and "⬅️ 0 · ➡️ 0 · 🤝 1 · 👎 0" in text


async def test_a_pair_whose_token_expired_is_posted_in_the_channel(
    arena: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = arena.server
    assert arena.candidate is not None
    async with arena.bot() as bot:
        arena.render.open.clear()
        interaction = await server.slash("imagine", {"prompt": "species:seal", "compare": True})
        assert (await interaction.wait_response())["type"] == 5
        # The wait outlasted the interaction's token (discord.py loads the extension as a module of its own).
        monkeypatch.setattr(sys.modules["cogs.arena"], "_TOKEN_LIFETIME", 0.0)
        arena.render.open.set()
        message = await server.wait_for_message(lambda m: bool(m.attachments) and m.interaction_id is None, 60)
        await all_delivered(bot.db)
        assert [attachment.filename for attachment in message.attachments] == ["left.png", "right.png"]
        pair_id = pair_id_of(message)
        pair = await bot.db.arena_pair(pair_id=pair_id)
        assert pair is not None and pair.message_id == message.id
        text = await private(await server.click(message.id, f"arena:vote:{pair_id}:left"))
        assert "You voted **Left**" in text
