"""The cog tests' harness: the real bot, with the tiny model behind a gate, logged in to the fake Discord."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image

from bot.client import SygilBot
from bot.config import (
    ArenaConfig,
    Config,
    GenerationConfig,
    ModerationConfig,
    PreviewConfig,
    PromptsConfig,
    QueueConfig,
)
from bot.engine import Engine
from bot.engine.executor import Progress, ThreadWorker, Worker
from bot.engine.types import ImageSpec, RenderedImage
from bot.jobs import Job, JobStatus
from bot.scheduler import Scheduler
from bot.service import open_service
from bot.storage import Database
from cogs.imagine._text import PREVIEW_FILENAME
from tests.fakediscord import FakeDiscord, FakeInteraction, Message, point_discord_at, run_bot

GENERATION = GenerationConfig(default_steps=3, max_steps=8, sizes=("64x64", "64x96"), max_count=4)


class GatedRender:
    """The real engine behind a gate, so a test can hold the GPU while a queue builds up."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.open = threading.Event()
        self.open.set()
        self.batches: list[int] = []

    def __call__(self, specs: Sequence[ImageSpec], progress: Progress | None = None, /) -> list[RenderedImage]:
        self.open.wait(30)
        self.batches.append(len(specs))
        return self.engine.render(specs, progress)


@dataclass
class Harness:
    server: FakeDiscord
    database: Path
    render: GatedRender
    generation: GenerationConfig = GENERATION
    prompts: PromptsConfig = field(default_factory=lambda: PromptsConfig(blocklist=("forbidden",)))
    # The fake has one guild: the whole queue is its share.
    queue: QueueConfig = field(
        default_factory=lambda: QueueConfig(max_queue=8, max_batch=8, max_per_user=3, server_share=1.0)
    )
    moderation: ModerationConfig = field(default_factory=ModerationConfig)
    arena: ArenaConfig = field(default_factory=ArenaConfig)
    # A candidate revision served beside production by a second worker thread (model.candidates), named so.
    candidate: GatedRender | None = None
    candidate_name: str = "candidate"
    generation: GenerationConfig = GENERATION
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    # A worker the test started (a worker process, to draw previews and hold batches mid-render) instead of the
    # gated thread; the test closes it.
    worker: Worker | None = None

    @contextlib.asynccontextmanager
    async def bot(self) -> AsyncIterator[SygilBot]:
        """Start a fresh bot process-alike (new client, scheduler and connection, same database file)."""
        config = Config(
            token=self.server.token,
            discord=self.server.bot_settings(),
            generation=self.generation,
            prompts=self.prompts,
            queue=self.queue,
            moderation=self.moderation,
            arena=self.arena,
            preview=self.preview,
        )
        engine = self.render.engine
        facts = {"revision": engine.revision, "dtype": "float32", "compiled": False}
        threads = [ThreadWorker(self.render, name="cpu", facts=facts)] if self.worker is None else []
        workers: list[Worker] = [*threads] if self.worker is None else [self.worker]
        if self.candidate is not None:
            facts = {"revision": self.candidate.engine.revision, "dtype": "float32", "compiled": False}
            threads.append(ThreadWorker(self.candidate, name="cpu+candidate", facts=facts, serves=self.candidate_name))
            workers.append(threads[-1])
        async with (
            await Database.open(self.database) as db,
            contextlib.AsyncExitStack() as stack,  # closes the workers after the scheduler stops handing them batches
            Scheduler(
                workers=workers,
                max_batch=self.queue.max_batch,
                max_queue=self.queue.max_queue,
                server_share=self.queue.server_share,
            ) as scheduler,
        ):
            for worker in threads:
                stack.push_async_callback(worker.close)
            service = await open_service(
                config, db=db, scheduler=scheduler, model="tiny", tokenizer=self.render.engine.tokenizer
            )
            with point_discord_at(self.server):
                bot = SygilBot(config=config, service=service)
                async with run_bot(bot, self.server):
                    yield bot


@contextlib.contextmanager
def fail_on_our_errors() -> Iterator[None]:
    """Fail the test if the bot or a cog logged an error (discord.py's own are caught by run_bot)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append  # type: ignore[method-assign]
    loggers = [logging.getLogger("bot"), logging.getLogger("cogs")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert not records, [record.getMessage() for record in records]


@pytest.fixture
async def harness(engine: Engine, tmp_path: Path) -> AsyncIterator[Harness]:
    with fail_on_our_errors():
        async with FakeDiscord() as server:
            yield Harness(server=server, database=tmp_path / "sygil.db", render=GatedRender(engine))
            assert server.violations == []


async def final_message(server: FakeDiscord, interaction: FakeInteraction, within: float = 60) -> Message:
    """Return the message holding an interaction's images (a preview frame in its status message is not one)."""
    return await server.wait_for_message(
        lambda m: m.interaction_id == interaction.id and any(a.filename != PREVIEW_FILENAME for a in m.attachments),
        within,
    )


async def remix_result(server: FakeDiscord, interaction: FakeInteraction, within: float = 60) -> Message:
    """Return the images a reroll or variation posted in the channel, through the link its private status shows."""
    status = await server.wait_for_message(
        lambda m: m.interaction_id == interaction.id and m.content.startswith("➡️ Posted:"), within
    )
    assert status.ephemeral, status.content
    return server.message(int(status.content.rsplit("/", 1)[1]))


def job_id_of(message: Message) -> int:
    return int(message.attachments[0].filename.split("_")[1])


def pngs(message: Message) -> list[Image.Image]:
    return [Image.open(io.BytesIO(attachment.data)) for attachment in message.attachments]


_POLL = 0.02


async def job_when(db: Database, job_id: int, status: JobStatus, within: float = 10) -> Job:
    """Return the job once it has the status (the database records a delivery just after it is posted)."""
    for _ in range(int(within / _POLL)):
        job = await db.get_job(job_id=job_id)
        if job is not None and job.status is status:
            return job
        await asyncio.sleep(_POLL)
    raise AssertionError(f"job {job_id} did not become {status} within {within} s")


async def all_delivered(db: Database, within: float = 10) -> None:
    """Wait until no job is left unfinished in the database."""
    for _ in range(int(within / _POLL)):
        if not await db.unfinished_jobs():
            return
        await asyncio.sleep(_POLL)
    raise AssertionError(f"jobs still unfinished after {within} s: {await db.unfinished_jobs()}")
