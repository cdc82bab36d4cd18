"""Fair share: one server flooding the queue shared by all servers fills only its share, and the others still get in."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from bot.admission import Requester
from bot.config import Config, GenerationConfig, QueueConfig
from bot.engine.executor import Progress
from bot.engine.types import ImageSpec, RenderedImage, Settings
from bot.errors import JobCancelled, QueueFull, Refused
from bot.scheduler import Scheduler
from bot.service import ImageService, Queued, open_service
from bot.storage import Database
from tests.cogs.conftest import Harness, all_delivered, final_message
from tests.cogs.test_moderation import answer

FLOODER, OTHER = 1, 2
SPEC = ImageSpec(prompt="species:seal", negative_prompt="", seed=1, settings=Settings(width=64, height=64))


class HeldRender:
    """Renders only once the test lets it, so jobs stay queued."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def __call__(self, specs: Sequence[ImageSpec], progress: Progress | None = None, /) -> list[RenderedImage]:
        self.gate.wait(10)
        return [RenderedImage(png=b"png", seed=spec.seed) for spec in specs]


def config(**queue: float) -> Config:
    return Config(
        token="unused",
        generation=GenerationConfig(sizes=("64x64",), max_steps=50, max_count=4),
        queue=QueueConfig(**{"max_queue": 32, "max_per_user": 3, "server_share": 0.5, **queue}),  # type: ignore[arg-type]
    )


async def request(service: ImageService, user_id: int, guild_id: int | None) -> Queued | str:
    """Do what /imagine does: admit without awaiting, then store and queue the job."""
    try:
        admission = service.admit(Requester(user_id=user_id, guild_id=guild_id, channel_id=3), prompt="species:seal")
    except (QueueFull, Refused) as exc:
        return str(exc)
    await asyncio.sleep(0)
    return await service.enqueue(admission)


async def test_a_flood_of_200_requests_from_one_server_leaves_room_for_the_others(tmp_path: Path) -> None:
    held = HeldRender()
    async with (
        await Database.open(tmp_path / "sygil.db") as db,
        Scheduler(held, max_queue=32, server_share=0.5) as scheduler,
    ):
        service = await open_service(config(), db=db, scheduler=scheduler, model="tiny")
        # 200 requests in the same moment, from 100 members of one server (2 each, within their own limits).
        outcomes = await asyncio.gather(*(request(service, 1000 + n % 100, FLOODER) for n in range(200)))
        accepted = [outcome for outcome in outcomes if isinstance(outcome, Queued)]
        refused = [outcome for outcome in outcomes if isinstance(outcome, str)]
        assert len(accepted) == 16  # half of the 32 places
        assert set(refused) == {
            "This server already has 16 jobs in the queue shared by all servers (the share of one server is 16 of "
            "32). Try again when some have finished."
        }
        assert scheduler.jobs_of_server(FLOODER) == 16

        # Another server's member, and someone in direct messages, still get in at once.
        other = await request(service, 7, OTHER)
        direct = await request(service, 8, None)
        assert isinstance(other, Queued) and isinstance(direct, Queued)
        assert len(await db.unfinished_jobs()) == 18

        held.gate.set()
        for queued in [*accepted, other, direct]:
            await service.wait(queued)
            await service.complete(queued, message_id=None)
        assert scheduler.jobs_of_server(FLOODER) == 0
        assert isinstance(await request(service, 1000, FLOODER), Queued)  # its share is free again


async def test_a_share_of_one_is_no_cap_and_a_tiny_share_still_lets_one_job_in() -> None:
    async with Scheduler(HeldRender(), max_queue=4, server_share=1.0) as scheduler:
        for user in range(4):
            scheduler.reserve(user_id=user, guild_id=FLOODER, max_queued=1)
        assert scheduler.server_cap is None
        with pytest.raises(QueueFull, match="The queue is full"):
            scheduler.reserve(user_id=9, guild_id=OTHER, max_queued=1)
    async with Scheduler(HeldRender(), max_queue=4, server_share=0.01) as scheduler:
        assert scheduler.server_cap == 1  # 0.04 of a job rounds up to one
        scheduler.reserve(user_id=1, guild_id=FLOODER, max_queued=3)
        with pytest.raises(QueueFull, match=r"This server already has 1 job in the queue .* is 1 of 4\)"):
            scheduler.reserve(user_id=2, guild_id=FLOODER, max_queued=3)
        scheduler.reserve(user_id=3, guild_id=None, max_queued=3)
        with pytest.raises(QueueFull, match="Direct messages already have 1 job in the queue"):
            scheduler.reserve(user_id=4, guild_id=None, max_queued=3)
    for share in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="server_share must be in"):
            Scheduler(HeldRender(), server_share=share)


async def test_a_server_gets_its_places_back_when_its_jobs_are_released_cancelled_or_done() -> None:
    held = HeldRender()
    async with Scheduler(held, max_queue=4, server_share=0.5) as scheduler:
        place = scheduler.reserve(user_id=1, guild_id=FLOODER, max_queued=3)
        scheduler.release(place)  # never stored
        first = scheduler.submit(
            job_id=1,
            user_id=1,
            guild_id=FLOODER,
            specs=[SPEC],
            place=scheduler.reserve(user_id=1, guild_id=FLOODER, max_queued=3),
        )
        second = scheduler.submit(job_id=2, user_id=2, guild_id=FLOODER, specs=[SPEC])  # restored after a restart
        with pytest.raises(QueueFull, match="share of one server is 2 of 4"):
            scheduler.reserve(user_id=3, guild_id=FLOODER, max_queued=3)
        assert scheduler.cancel(2, "cancelled") is False
        with pytest.raises(JobCancelled):
            await second.result
        third = scheduler.reserve(user_id=3, guild_id=FLOODER, max_queued=3)
        assert scheduler.jobs_of_server(FLOODER) == 2
        held.gate.set()
        await first.result
        assert scheduler.jobs_of_server(FLOODER) == 1  # the place taken for the third job
        scheduler.release(third)
        assert scheduler.jobs_of_server(FLOODER) == 0


async def test_over_discord_a_server_past_its_share_is_refused_privately(harness: Harness) -> None:
    server = harness.server
    harness.queue = QueueConfig(max_queue=4, max_batch=8, max_per_user=3, server_share=0.5)
    users = [server.add_user(f"user{i}") for i in range(3)]
    async with harness.bot() as bot:
        harness.render.open.clear()
        first = await server.slash("imagine", {"prompt": "species:seal"}, user_id=users[0])
        await server.wait_for_message(lambda m: m.interaction_id == first.id and "Rendering" in m.content)
        second = await server.slash("imagine", {"prompt": "species:cat"}, user_id=users[1])
        await server.wait_for_message(lambda m: m.interaction_id == second.id and "Queued" in m.content)
        text = await answer(await server.slash("imagine", {"prompt": "species:dog"}, user_id=users[2]))
        assert text.startswith("This server already has 2 jobs in the queue shared by all servers")
        assert "(the share of one server is 2 of 4)" in text
        harness.render.open.set()
        await final_message(server, first)
        await final_message(server, second)
        await all_delivered(bot.db)
        await final_message(server, await server.slash("imagine", {"prompt": "species:dog"}, user_id=users[2]))
    public = [message for message in server.messages(server.channel_id) if not message.ephemeral]
    assert len(public) == 3 and all(message.attachments for message in public)
