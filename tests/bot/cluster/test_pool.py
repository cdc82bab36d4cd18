"""The bot's side of the cluster against a real Redis: the test plays the remote workers with a plain client."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TypeVar

import pytest
import redis
import redis.asyncio
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from bot.cli.run import start_cluster
from bot.cluster.pool import ClusterPool
from bot.cluster.wire import GROUP, BotInfo, Keys, WorkerInfo, consumer, pack, unpack
from bot.config import ClusterConfig, Config, ModelConfig
from bot.engine.protocol import Failed, FailureKind, Message, Progress, RenderBatch, Rendered, Started
from bot.engine.types import ImageSpec, RenderedImage, Settings
from bot.errors import JobCancelled, OutOfMemory
from bot.scheduler import Scheduler
from bot.scheduler.batches import Batch
from bot.scheduler.line import Ticket
from tests.redis_server import RedisServer

MODEL = "Sygil/Sygil-Diffusion"
EXACT = "a" * 40
OTHER = "b" * 40
GUILD = 10
HEARTBEAT = 0.2
LEASE = 1.0
SMALL = Settings(steps=4, width=64, height=64)
KEYS = Keys("test")
T = TypeVar("T")

Taken = tuple[bytes, RenderBatch, str]  # entry id, batch, session


def cluster(url: str) -> ClusterConfig:
    # The test plays slow workers: a deadline (lease + 8 s for a 64x64 image of 4 steps) they do not reach.
    return ClusterConfig(broker=url, prefix=KEYS.prefix, lease=LEASE, heartbeat=HEARTBEAT, seconds_per_step=500.0)


def specs(prompt: str, count: int = 1, seed: int = 1) -> list[ImageSpec]:
    return [ImageSpec(prompt=prompt, negative_prompt="", seed=seed + i, settings=SMALL) for i in range(count)]


async def soon(awaitable: Awaitable[T], within: float = 5.0) -> T:
    return await asyncio.wait_for(awaitable, within)


async def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "not within the time given"
        await asyncio.sleep(0.02)


class FakeWorker:
    """A remote worker played by the test: it beats, takes batches from the group and answers with events."""

    def __init__(
        self,
        url: str,
        name: str,
        *,
        revision: str = EXACT,
        depth: int = 2,
        device_name: str = "NVIDIA H200",
        host: str = "host-b",
    ) -> None:
        self.redis = redis.asyncio.Redis.from_url(url)
        self.name = name
        self.consumer = consumer(name, "cuda:0")
        self.nonces: dict[int, str] = {}  # batch id → the nonce of the entry taken
        self.info = WorkerInfo(name, host, "cuda:0", device_name, MODEL, revision, "float16", depth, 0, time.time())
        self._beating: asyncio.Task[None] | None = None
        self._alive = True

    async def __aenter__(self) -> FakeWorker:
        self._beating = asyncio.create_task(self._beat())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.die()
        await self.redis.aclose()

    async def die(self) -> None:
        """Stop beating (the key expires by itself, as when a worker's host goes away)."""
        # Not by cancelling: redis-py can swallow a cancellation (see bot.cluster.pool._kept).
        self._alive = False
        if self._beating is not None:
            await self._beating
            self._beating = None

    async def _beat(self) -> None:
        while self._alive:
            with contextlib.suppress(RedisConnectionError):  # the broker is down: beat again when it is back
                await self.redis.set(KEYS.beat(self.name, "cuda:0"), self.info.dump(), px=int(3000 * HEARTBEAT))
            await asyncio.sleep(HEARTBEAT)

    async def take(self, count: int = 1, within: float = 5.0) -> list[Taken]:
        """Read ``count`` new batches of the group, waiting for them; return them in the order the bot numbered
        them (batches sent at the same moment may reach the stream in either order)."""
        deadline = time.monotonic() + within
        taken: list[Taken] = []
        while len(taken) < count:
            assert time.monotonic() < deadline, f"{len(taken)} of {count} batches came"
            try:
                reply = await self.redis.xreadgroup(
                    GROUP, self.consumer, {KEYS.batches: ">"}, count=count - len(taken), block=100
                )
            except (ResponseError, RedisConnectionError):  # no group yet: the bot has not (re)connected
                reply = []
            assert isinstance(reply, list)
            for _stream, entries in reply:
                for entry_id, fields in entries:
                    message, plain = unpack(fields)
                    assert isinstance(message, RenderBatch)
                    self.nonces[message.batch_id] = plain["nonce"]
                    taken.append((entry_id, message, plain["session"]))
        return sorted(taken, key=lambda item: item[1].batch_id)

    async def send(self, session: str, message: Message) -> None:
        """Add an event to this worker's stream, with the nonce of the batch's entry (if this worker took it)."""
        assert isinstance(message, Started | Progress | Rendered | Failed)
        nonce = self.nonces.get(message.batch_id, "")
        fields = pack(message, worker=self.consumer, nonce=nonce)
        await self.redis.xadd(KEYS.events(self.name, session), fields)  # type: ignore[arg-type]

    async def render(self, taken: Taken, *, mark: str = "") -> None:
        """Start, report progress, and send images whose bytes name the prompt and seed (plus ``mark``)."""
        entry_id, batch, session = taken
        await self.send(session, Started(batch.batch_id))
        for step in range(1, 5):
            await self.send(session, Progress(batch.batch_id, step, 4))
        await self.send(session, rendered(batch, mark))
        assert entry_id  # the bot acknowledges and deletes the entry once it took the outcome


def rendered(batch: RenderBatch, mark: str = "") -> Rendered:
    """Images whose label names the prompt and seed (plus ``mark``): PNGs of the size asked for, as the bot checks."""
    images = tuple(
        RenderedImage(png(f"{spec.prompt}|{spec.seed}{mark}", spec.settings.width, spec.settings.height), spec.seed)
        for spec in batch.specs
    )
    return Rendered(batch.batch_id, images, 0.1, compiled=True)


def png(label: str, width: int = 64, height: int = 64) -> bytes:
    info = PngInfo()
    info.add_text("label", label)
    out = io.BytesIO()
    Image.new("RGB", (width, height)).save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def labels(images: list[RenderedImage]) -> list[str]:
    found: list[str] = []
    for image in images:
        with Image.open(io.BytesIO(image.png)) as opened:
            found.append(opened.text["label"])  # pyright: ignore[reportAttributeAccessIssue] (PngImageFile)
    return found


@contextlib.asynccontextmanager
async def running(
    url: str, *, revision: str = EXACT, max_batch: int = 8, on_batch: Callable[[Batch], None] | None = None
) -> AsyncIterator[tuple[ClusterPool, Scheduler]]:
    pool = ClusterPool(cluster(url), model=MODEL, revision=revision)
    async with pool, Scheduler(workers=[pool], max_batch=max_batch, on_batch=on_batch) as scheduler:
        yield pool, scheduler


async def bot_info(server: RedisServer) -> BotInfo | None:
    client = redis.asyncio.Redis.from_url(server.url)
    try:
        raw = await client.get(KEYS.bot)
    finally:
        await client.aclose()
    return BotInfo.load(raw) if raw is not None else None


async def length(server: RedisServer, key: str) -> int:
    client = redis.asyncio.Redis.from_url(server.url)
    try:
        return await client.xlen(key)
    finally:
        await client.aclose()


@pytest.fixture
def broker(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A plain client to look at what the pool wrote."""
    client = redis_server.client()
    yield client
    client.close()


def submit(scheduler: Scheduler, job_id: int, prompt: str, count: int = 1) -> Ticket:
    return scheduler.submit(job_id=job_id, user_id=job_id, guild_id=GUILD, specs=specs(prompt, count, seed=job_id))


async def test_batches_go_out_only_while_a_worker_has_room(
    redis_server: RedisServer, broker: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bot")
    async with running(redis_server.url, max_batch=1) as (pool, scheduler):
        tickets = [submit(scheduler, job_id, prompt) for job_id, prompt in enumerate(["a", "b", "c"], 1)]
        await eventually(lambda: pool.up)
        info = await bot_info(redis_server)
        assert info is not None and info.revision == EXACT and info.model == MODEL and info.lease == LEASE
        await asyncio.sleep(3 * HEARTBEAT)
        assert await length(redis_server, KEYS.batches) == 0, "no worker, so no batch went out"
        assert pool.describe() == "⚠️ No GPU worker is up: your jobs keep their place and run when one joins."
        assert scheduler.worker_notes() == [pool.describe()]

        async with FakeWorker(redis_server.url, "gpu-b", depth=2) as worker:
            first, second = await worker.take(count=2)
            await asyncio.sleep(3 * HEARTBEAT)
            assert await length(redis_server, KEYS.batches) == 2, "as many batches as the worker takes at once"
            assert pool.describe() == "Workers: 1 up — NVIDIA H200 on host-b"
            assert [batch.specs for _, batch, _ in (first, second)] == [
                tuple(specs("a", seed=1)),
                tuple(specs("b", seed=2)),
            ]
            assert first[2] == info.session

            _, batch, session = first
            await worker.send(session, Started(batch.batch_id))
            await worker.send(session, Progress(batch.batch_id, 2, 4))
            await eventually(lambda: tickets[0].step == 2)
            assert scheduler.position(1) == 0 and scheduler.position(2) == 1
            await worker.send(session, rendered(batch))
            assert labels(await soon(tickets[0].result)) == ["a|1"]
            (rendering,) = tickets[0].renders
            assert (rendering.worker, rendering.revision, rendering.dtype, rendering.compiled) == (
                "gpu-b/cuda:0",
                EXACT,
                "float16",
                True,
            )

            (third,) = await worker.take()  # the room the first batch left
            await worker.render(second)
            await worker.render(third)
            assert [labels(await soon(ticket.result))[0] for ticket in tickets] == ["a|1", "b|2", "c|3"]
            await eventually(lambda: broker.xlen(KEYS.events("gpu-b", session)) == 0)  # read events are deleted
        await eventually(lambda: not pool.workers, within=3)
    log = caplog.text
    assert (
        "Worker gpu-b/cuda:0 joined: device NVIDIA H200 (cuda:0) on host-b, model Sygil/Sygil-Diffusion, revision "
        in log
    )
    assert "Worker gpu-b/cuda:0 left: its heartbeat stopped (device NVIDIA H200 on host-b)" in log


async def test_out_of_memory_splits_the_batch(redis_server: RedisServer) -> None:
    async with running(redis_server.url) as (_pool, scheduler), FakeWorker(redis_server.url, "gpu-b") as worker:
        ticket = submit(scheduler, 1, "a", count=4)
        ((_, batch, session),) = await worker.take()
        assert len(batch.specs) == 4
        await worker.send(session, Started(batch.batch_id))
        await worker.send(session, Failed(batch.batch_id, FailureKind.OUT_OF_MEMORY, "CUDA out of memory"))
        halves = []
        for _ in range(2):
            (taken,) = await worker.take()
            halves.append(len(taken[1].specs))
            await worker.render(taken)
        assert halves == [2, 2]
        assert labels(await soon(ticket.result)) == ["a|1", "a|2", "a|3", "a|4"]

        # One image that does not fit alone fails its job, with the worker's words.
        lone = submit(scheduler, 2, "b")
        ((_, batch, session),) = await worker.take()
        await worker.send(session, Failed(batch.batch_id, FailureKind.OUT_OF_MEMORY, "CUDA out of memory"))
        with pytest.raises(OutOfMemory, match="does not fit in the GPU's free memory even alone"):
            await soon(lone.result)


async def test_a_late_duplicate_result_is_dropped(redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="bot.cluster")
    batches: list[Batch] = []
    async with (
        running(redis_server.url, on_batch=batches.append) as (_pool, scheduler),
        FakeWorker(redis_server.url, "gpu-b") as worker,
        FakeWorker(redis_server.url, "gpu-c") as other,
    ):
        ticket = submit(scheduler, 1, "a")
        (taken,) = await worker.take()
        await worker.render(taken)
        # A second worker that claimed the same batch after its lease sends its own result: dropped.
        await other.send(taken[2], rendered(taken[1], mark="-again"))
        assert labels(await soon(ticket.result)) == ["a|1"]
        later = submit(scheduler, 2, "b")
        await other.render((await other.take())[0])
        assert labels(await soon(later.result)) == ["b|2"]
    assert [batch.job_ids for batch in batches] == [(1,), (2,)]
    assert f"Dropped Rendered of batch {taken[1].batch_id} from worker gpu-c: nobody awaits it" in caplog.text


async def test_a_worker_serving_another_revision_is_refused(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bot")
    async with running(redis_server.url) as (pool, scheduler):
        ticket = submit(scheduler, 1, "a")
        async with FakeWorker(redis_server.url, "old", revision=OTHER):
            await asyncio.sleep(5 * HEARTBEAT)
            assert await length(redis_server, KEYS.batches) == 0
            assert not pool.workers
            async with FakeWorker(redis_server.url, "gpu-b") as good:
                await good.render((await good.take())[0])
                await soon(ticket.result)
    refusals = [record for record in caplog.records if record.getMessage().startswith("Refused worker")]
    assert [(record.levelno, record.getMessage()) for record in refusals] == [
        (logging.WARNING, f"Refused worker old/cuda:0: it serves revision {OTHER}; the bot is pinned to {EXACT}")
    ]
    assert "Worker old/cuda:0 joined" not in caplog.text


async def test_the_first_worker_pins_a_branch(redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bot")
    async with running(redis_server.url, revision="main") as (pool, scheduler):
        await eventually(lambda: pool.up)
        info = await bot_info(redis_server)
        assert info is not None and info.revision is None  # workers wait until a revision is pinned
        async with FakeWorker(redis_server.url, "first", revision=OTHER) as first:
            await eventually(lambda: pool.revision == OTHER)
            info = await bot_info(redis_server)
            assert info is not None and info.revision == OTHER
            async with FakeWorker(redis_server.url, "second", revision=EXACT):
                ticket = submit(scheduler, 1, "a")
                await first.render((await first.take())[0])
                await soon(ticket.result)
                await eventually(lambda: "Refused worker second" in caplog.text)
                assert [info.name for info in pool.workers] == ["first/cuda:0"]
        assert [rendering.revision for rendering in ticket.renders] == [OTHER]
    assert f"Pinned revision {OTHER} of {MODEL}, served by worker first/cuda:0 (model.revision is main)" in caplog.text


async def test_jobs_wait_out_a_broker_outage_and_run_once(
    redis_server: RedisServer, broker: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bot")
    batches: list[Batch] = []
    async with (
        running(redis_server.url, max_batch=1, on_batch=batches.append) as (pool, scheduler),
        FakeWorker(redis_server.url, "gpu-b", depth=1) as worker,
    ):
        ticket = submit(scheduler, 1, "a")
        ((_, lost, session),) = await worker.take()
        await worker.send(session, Started(lost.batch_id))
        await soon(ticket.started.wait())

        redis_server.stop()
        await eventually(lambda: not pool.up and not ticket.started.is_set())
        assert scheduler.position(1) == 1 and ticket.attempts == 0  # back at the front, no attempt counted
        assert pool.describe() == (
            "⚠️ The GPU cluster's broker is unreachable: your jobs keep their place and run when it is back."
        )
        waiting = submit(scheduler, 2, "b")  # accepted while the broker is away
        await asyncio.sleep(2.0)  # several reconnection attempts
        assert not ticket.result.done() and not waiting.result.done()

        redis_server.start()  # empty, as after a crash
        await eventually(lambda: pool.up)
        for _ in range(2):
            (taken,) = await worker.take()
            await worker.render(taken)
        assert labels(await soon(ticket.result)) == ["a|1"]
        assert labels(await soon(waiting.result)) == ["b|2"]
        # The batch given up is stopped for any worker still holding it; its late result is dropped.
        assert broker.exists(KEYS.stop(session, lost.batch_id))
        await worker.send(session, rendered(lost, mark="-late"))
        await asyncio.sleep(3 * HEARTBEAT)
        assert ticket.attempts == 0
    assert [batch.job_ids for batch in batches] == [(1,), (2,)], "each job delivered exactly once"
    warnings = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING and warnings[0].exc_info is None
    assert f"The cluster's broker at {redis_server.url} is back after" in caplog.text


async def test_with_no_worker_left_its_batches_go_back_in_line(redis_server: RedisServer, broker: redis.Redis) -> None:
    async with running(redis_server.url, max_batch=1) as (pool, scheduler):
        started, sent = submit(scheduler, 1, "a"), submit(scheduler, 2, "b")
        async with FakeWorker(redis_server.url, "gpu-b") as worker:
            (first, second) = await worker.take(count=2)
            await worker.send(first[2], Started(first[1].batch_id))
            await soon(started.started.wait())
            await worker.die()
            await eventually(lambda: scheduler.position(1) == 1 and scheduler.position(2) == 2, within=2 + LEASE)
            assert pool.describe().startswith("⚠️ No GPU worker is up")
            # The one on a GPU counts an attempt (it may have brought its worker down); the other does not.
            assert (started.attempts, sent.attempts) == (1, 0)
            assert broker.exists(KEYS.stop(first[2], first[1].batch_id), KEYS.stop(first[2], second[1].batch_id)) == 2
        async with FakeWorker(redis_server.url, "gpu-c") as back:
            again = await back.take(count=2)  # sent again; the batches given up were deleted from the stream
            assert [batch.specs[0].prompt for _, batch, _ in again] == ["a", "b"]
            for taken in again:
                await back.render(taken)
            assert [labels(await soon(ticket.result))[0] for ticket in (started, sent)] == ["a|1", "b|2"]


async def test_a_stopped_batch_no_worker_took_ends_at_once(redis_server: RedisServer, broker: redis.Redis) -> None:
    pool = ClusterPool(cluster(redis_server.url), model=MODEL, revision=EXACT)
    async with pool, FakeWorker(redis_server.url, "gpu-b") as worker:
        async with Scheduler(workers=[pool]) as scheduler:
            ticket = submit(scheduler, 1, "a")
            await eventually(lambda: broker.xlen(KEYS.batches) == 1)
            scheduler.drain()  # the bot is shutting down: the batch not started goes after the restart
            await asyncio.wait_for(scheduler.wait_idle(), 1)
            assert ticket.result.cancelled()
            await eventually(lambda: broker.xlen(KEYS.batches) == 0)  # deleted: no worker renders it
            assert broker.exists(KEYS.stop(pool.session, 1))

        # A started batch stops when its worker says so.
        async with Scheduler(workers=[pool]) as scheduler:
            cancelled = submit(scheduler, 2, "b")
            ((_, batch, session),) = await worker.take()
            await worker.send(session, Started(batch.batch_id))
            await soon(cancelled.started.wait())
            assert scheduler.cancel(2, "Cancelled by its author.") is True
            await eventually(lambda: bool(broker.exists(KEYS.stop(session, batch.batch_id))))
            await worker.send(session, Failed(batch.batch_id, FailureKind.STOPPED, "stopped"))
            await asyncio.wait_for(scheduler.wait_idle(), 2)
            with pytest.raises(JobCancelled, match="Cancelled by its author"):
                await soon(cancelled.result)


async def test_the_broker_password_never_reaches_the_log(
    redis_server: RedisServer, broker: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    broker.config_set("requirepass", "hunter2")
    url = redis_server.url.replace("redis://", "redis://:hunter2@")
    config = Config(token="t", model=ModelConfig(revision=EXACT), cluster=cluster(url))
    async with contextlib.AsyncExitStack() as stack:
        (pool,) = await start_cluster(config, stack)
        assert isinstance(pool, ClusterPool)
        async with Scheduler(workers=[pool]) as scheduler, FakeWorker(url, "gpu-b") as worker:
            ticket = submit(scheduler, 1, "a")
            await worker.render((await worker.take())[0])
            await soon(ticket.result)
    wrong = ClusterPool(cluster(url.replace("hunter2", "swordfish")), model=MODEL, revision=EXACT)
    async with wrong:
        await eventually(lambda: "is unreachable" in caplog.text)
        assert not wrong.up
    text = caplog.text
    assert "hunter2" not in text and "swordfish" not in text
    redacted = redis_server.url.replace("redis://", "redis://:***@")
    assert f"Cluster mode: broker {redacted}, prefix test" in text
    assert f"Connected to the cluster's broker at {redacted}" in text
    assert f"The cluster's broker at {redacted} is unreachable" in text
