"""The attacks of a hostile cluster worker, replayed against the real bot side, the real worker host of an honest
worker, and a real Redis with ACL users: each is refused or harmless, and the honest worker keeps rendering.

Mallory holds a worker's Redis user of her own, as anyone who donates a GPU does, and talks to Redis directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from redis.exceptions import NoPermissionError

from bot.client import SygilBot
from bot.cluster.broker import connect
from bot.cluster.pool import ClusterPool
from bot.cluster.remote import Executor, Served, WorkerHost
from bot.cluster.wire import GROUP, BotInfo, Keys, pack, unpack
from bot.config import ClusterConfig, Config, GenerationConfig, PreviewConfig, QueueConfig
from bot.engine.executor import ThreadWorker
from bot.engine.protocol import Failed, FailureKind, Message, Preview, RenderBatch, Rendered, Started
from bot.engine.types import ImageSpec, RenderedImage, Settings
from bot.errors import RenderFailed
from bot.prompts import Tokenizer
from bot.scheduler import Scheduler
from bot.scheduler.line import Ticket
from bot.service import open_service
from bot.storage import Database
from tests.fakediscord import FakeDiscord, FakeInteraction, point_discord_at, run_bot
from tests.fakediscord import Message as Posted
from tests.redis_server import RedisServer

MODEL = "Sygil/Sygil-Diffusion"
REVISION = "a" * 40
KEYS = Keys("sygil")
HEARTBEAT, LEASE = 0.2, 1.0
SMALL = Settings(steps=3, width=64, height=64)
MALLORY = "mallory/cuda:0"
HTML = b"<html><script>alert(document.cookie)</script></html>"
PHISHING = "[Claim your Nitro](https://evil.example/claim) @everyone"


def honest_png(spec: ImageSpec) -> bytes:
    """What the honest worker renders: a real PNG of the size asked for, labelled with its prompt and seed."""
    info = PngInfo()
    info.add_text("label", f"honest|{spec.prompt}|{spec.seed}")
    out = io.BytesIO()
    Image.new("RGB", (spec.settings.width, spec.settings.height), (spec.seed % 256, 90, 160)).save(
        out, format="PNG", pnginfo=info
    )
    return out.getvalue()


def label(png: bytes) -> str:
    with Image.open(io.BytesIO(png)) as image:
        return image.text["label"]  # pyright: ignore[reportAttributeAccessIssue] (PngImageFile)


@dataclass
class Cluster:
    server: RedisServer
    bot_url: str
    honest_url: str
    mallory_url: str


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """A Redis with ACLs on: the bot's user, an honest worker's and Mallory's."""
    with RedisServer(tmp_path / "redis", acl=True) as server:
        yield Cluster(
            server, await server.bot_url(), await server.add_worker("honest"), await server.add_worker("mallory")
        )


def config(url: str, **overrides: Any) -> ClusterConfig:
    # A generous deadline unless a test asks for another: the honest worker may be held by the test.
    settings: dict[str, Any] = {"seconds_per_step": 500.0} | overrides
    return ClusterConfig(broker=url, prefix=KEYS.prefix, lease=LEASE, heartbeat=HEARTBEAT, **settings)


@contextlib.asynccontextmanager
async def honest_worker(url: str, gate: threading.Event | None = None) -> AsyncIterator[list[int]]:
    """The real worker host with an honest executor (no model: plain PNGs); yields the batch sizes it rendered."""
    rendered: list[int] = []

    def render(specs: Sequence[ImageSpec], progress: object = None) -> list[RenderedImage]:
        if gate is not None:
            gate.wait(60)
        rendered.append(len(specs))
        return [RenderedImage(honest_png(spec), spec.seed) for spec in specs]

    executor = Executor(ThreadWorker(render), lambda: Served("cuda:0", "NVIDIA H100", REVISION, "float16"))
    async with connect(url) as broker:
        host = WorkerHost(broker, config(url), model=MODEL, executors=[executor], grace=2.0)
        assert host.names == ["honest/cuda:0"], "named after its Redis user"
        task = asyncio.create_task(host.run())
        try:
            yield rendered
        finally:
            if gate is not None:
                gate.set()
            host.stop()
            await asyncio.wait_for(task, 30)


@contextlib.asynccontextmanager
async def bot_side(url: str, **overrides: Any) -> AsyncIterator[tuple[ClusterPool, Scheduler]]:
    pool = ClusterPool(config(url, **overrides), model=MODEL, revision=REVISION)
    async with pool, Scheduler(workers=[pool], max_batch=1) as scheduler:
        yield pool, scheduler


class Mallory:
    """A worker's Redis user in hostile hands."""

    def __init__(self, url: str) -> None:
        self.redis = connect(url)
        self.session = ""  # the bot's, once known

    async def beat(self, **changes: Any) -> None:
        info = {
            "name": "mallory", "host": "h", "device": "cuda:0", "device_name": "NVIDIA H100", "model": MODEL,
            "revision": REVISION, "dtype": "float16", "depth": 2, "busy": 0, "started_at": time.time(),
        } | changes  # fmt: skip
        await self.redis.set(KEYS.beat("mallory", "cuda:0"), json.dumps(info), px=3000)

    async def send(self, session: str, fields: dict[Any, Any]) -> None:
        await self.redis.xadd(KEYS.events("mallory", session), fields)

    async def event(self, session: str, message: Message, nonce: str = "") -> None:
        await self.send(session, {**pack(message, worker=MALLORY, nonce=nonce)})

    async def take(self, within: float = 10.0) -> tuple[bytes, RenderBatch, dict[str, str]]:
        """Read a new batch as a consumer, as any worker may."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            reply: Any = await self.redis.xreadgroup(GROUP, MALLORY, {KEYS.batches: ">"}, count=1, block=100)
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    message, plain = unpack(fields)
                    assert isinstance(message, RenderBatch)
                    return entry_id, message, plain
        raise AssertionError("no batch came")

    async def steal(self, entry_id: bytes) -> tuple[RenderBatch, dict[str, str]]:
        """Claim an entry another worker holds (XCLAIM needs no idle time): Redis cannot tell who may."""
        claimed: Any = await self.redis.xclaim(KEYS.batches, GROUP, MALLORY, 0, [entry_id])
        message, plain = unpack(claimed[0][1])
        assert isinstance(message, RenderBatch)
        return message, plain

    async def close(self) -> None:
        await self.redis.aclose()


@contextlib.asynccontextmanager
async def mallory(url: str) -> AsyncIterator[Mallory]:
    attacker = Mallory(url)
    try:
        yield attacker
    finally:
        await attacker.close()


async def until(check: Callable[[], object], within: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        await asyncio.sleep(0.02)


async def held_by(admin: Any, consumer: str, within: float = 10.0, *, after: bytes | None = None) -> bytes:
    """Return the entry the consumer holds, once it holds one; with ``after``, one newer than that entry (the bot
    acknowledges a finished batch's entry a moment after posting its images)."""
    found: list[bytes] = []
    start = "-" if after is None else b"(" + after

    def check() -> bool:
        pending = admin.xpending_range(KEYS.batches, GROUP, start, "+", 10, consumername=consumer)
        found[:] = [item["message_id"] for item in pending]
        return bool(found)

    await until(check, within, f"{consumer} holds a batch")
    return found[0]


def submit(scheduler: Scheduler, job_id: int, prompt: str) -> Ticket:
    spec = ImageSpec(prompt=prompt, negative_prompt="", seed=job_id, settings=SMALL)
    return scheduler.submit(job_id=job_id, user_id=job_id, guild_id=1, specs=[spec])


async def result(ticket: Ticket, within: float = 20.0) -> list[RenderedImage]:
    return await asyncio.wait_for(asyncio.shield(ticket.result), within)


# Through the fake Discord: what users would see


@contextlib.asynccontextmanager
async def discord_bot(
    server: FakeDiscord, url: str, database: Path, tokenizer: Tokenizer
) -> AsyncIterator[tuple[SygilBot, ClusterPool]]:
    """The bot in the cluster mode, talking to the fake Discord: what ``sygil-bot run`` assembles."""
    settings = Config(
        token=server.token,
        discord=server.bot_settings(),
        generation=GenerationConfig(default_steps=3, max_steps=8, sizes=("64x64",), max_count=2),
        queue=QueueConfig(max_queue=8, max_batch=1, max_per_user=3, server_share=1.0),
        cluster=config(url),
    )
    pool = ClusterPool(settings.cluster, model=MODEL, revision=REVISION)
    async with (
        pool,
        await Database.open(database) as db,
        Scheduler(workers=[pool], max_batch=1, max_queue=8) as scheduler,
    ):
        service = await open_service(settings, db=db, scheduler=scheduler, model=MODEL, tokenizer=tokenizer)
        with point_discord_at(server):
            bot = SygilBot(config=settings, service=service)
            async with run_bot(bot, server):
                yield bot, pool


async def outcome(server: FakeDiscord, interaction: FakeInteraction) -> Posted:
    """The message a job ends with: its images, or its failure."""
    return await server.wait_for_message(
        lambda m: m.interaction_id == interaction.id and (bool(m.attachments) or m.content.startswith("❌")), 30
    )


async def test_forged_stolen_and_poisoned_results_never_reach_discord(
    cluster: Cluster, clip_tokenizer: Tokenizer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bot")
    admin = cluster.server.client()
    gate = threading.Event()
    async with (
        FakeDiscord() as server,
        discord_bot(server, cluster.bot_url, tmp_path / "sygil.db", clip_tokenizer) as (_bot, pool),
        honest_worker(cluster.honest_url, gate) as rendered,
        mallory(cluster.mallory_url) as attacker,
    ):
        session = pool.session
        await attacker.beat()  # she joins as a worker like any other
        await until(lambda: len(pool.workers) == 2, what="both workers joined")

        # 1. Forged results: a Rendered of HTML for batch ids she was never given, in her stream and (refused) in
        # the honest worker's; while the honest worker holds the real batch.
        first = await server.slash("imagine", {"prompt": "species:seal", "seed": 1})
        entry = await held_by(admin, "honest/cuda:0")
        for batch_id in range(1, 4):
            forged = Rendered(batch_id, (RenderedImage(HTML, 1),), 0.1)
            await attacker.event(session, forged)
            await attacker.event(session, forged, nonce="0" * 32)
            with pytest.raises(NoPermissionError):
                await attacker.redis.xadd(KEYS.events("honest", session), {**pack(forged, worker="honest/cuda:0")})
        # 2. Poison entries in her stream: not a message, and a batch id that is a list.
        await attacker.send(session, {"data": "[]"})
        await attacker.send(session, {"data": json.dumps({"type": "started", "batch_id": [1]})})
        await attacker.send(session, {"nodata": "x"})
        await until(lambda: admin.xlen(KEYS.events("mallory", session)) == 0, what="her entries read and deleted")
        # 3. Redis admin: every command beyond a worker's is refused.
        for command in (("FLUSHALL",), ("SET", KEYS.bot, "{}"), ("XADD", KEYS.batches, "*", "data", "{}"),
                        ("XDEL", KEYS.batches, entry), ("XRANGE", KEYS.batches, "-", "+"), ("ACL", "WHOAMI"),
                        ("KEYS", "*"), ("CONFIG", "GET", "*")):  # fmt: skip
            with pytest.raises(NoPermissionError):
                await attacker.redis.execute_command(*command)
        pin = BotInfo.read(admin.get(KEYS.bot))
        assert pin is not None and pin.revision == REVISION and pin.session == session

        gate.set()
        message = await outcome(server, first)
        assert [label(attachment.data) for attachment in message.attachments] == ["honest|species:seal|1"]
        assert message.attachments[0].data.startswith(b"\x89PNG")

        # 4. A stolen batch: she claims the entry the honest worker holds, so she holds it, and answers with HTML.
        gate.clear()
        second = await server.slash("imagine", {"prompt": "species:owl", "seed": 2})
        entry = await held_by(admin, "honest/cuda:0", after=entry)
        batch, plain = await attacker.steal(entry)
        await attacker.event(session, Started(batch.batch_id), plain["nonce"])
        await attacker.event(
            session, Rendered(batch.batch_id, (RenderedImage(HTML, 2, nsfw=False),), 0.1), plain["nonce"]
        )
        failed = await outcome(server, second)
        assert not failed.attachments and "A GPU worker sent back a broken image" in failed.content
        gate.set()

        # 5. Another stolen batch, answered with a failure whose text is a phishing link: users see fixed words.
        gate.clear()
        third = await server.slash("imagine", {"prompt": "species:fox", "seed": 3})
        entry = await held_by(admin, "honest/cuda:0", after=entry)
        batch, plain = await attacker.steal(entry)
        await attacker.event(session, Failed(batch.batch_id, FailureKind.ERROR, PHISHING), plain["nonce"])
        failed = await outcome(server, third)
        assert "evil.example" not in failed.content and "Nitro" not in failed.content
        assert "A GPU worker could not render this job" in failed.content
        gate.set()

        # The honest worker rendered throughout; nothing of hers was ever posted.
        fourth = await server.slash("imagine", {"prompt": "species:cat", "seed": 4})
        message = await outcome(server, fourth)
        assert [label(attachment.data) for attachment in message.attachments] == ["honest|species:cat|4"]
        assert len(rendered) == 4
        posted = [m for m in server.messages(server.channel_id, include_ephemeral=True)]
        assert all(attachment.data.startswith(b"\x89PNG") for m in posted for attachment in m.attachments)
        assert not any("evil.example" in m.content or "<html" in m.content for m in posted)
    log = caplog.text
    assert log.count("Dropped events of worker mallory for batches it was not given") == 1, "said once per worker"
    assert "Worker mallory: batch" in log and "not a PNG (strike 1 of 3)" in log
    assert "Dropped a malformed event of worker mallory" in log


async def test_a_300_mib_payload_leaves_the_bots_memory_flat(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bot")
    admin = cluster.server.client()
    async with bot_side(cluster.bot_url) as (pool, scheduler), honest_worker(cluster.honest_url):
        async with mallory(cluster.mallory_url) as attacker:
            await attacker.beat()
        await until(lambda: len(pool.workers) == 2, what="both workers joined")
        assert [label(image.png) for image in await result(submit(scheduler, 1, "before"))] == ["honest|before|1"]
        before = psutil.Process().memory_info().rss
        # Another process sends the payload: this one must not hold 300 MiB itself. An event of 300 MiB, and a
        # heartbeat of 300 MiB.
        script = (
            "import sys, redis; from bot.cluster.broker import parse; u = parse(sys.argv[1]); "
            "r = redis.Redis(host=u.host, port=u.port, username=u.username, password=u.password); "
            "big = b'\\x89PNG' + bytes(300 * 2**20); "
            f"r.xadd('{KEYS.events('mallory', pool.session)}', {{'data': big}}); "
            f"r.set('{KEYS.beat('mallory', 'cuda:0')}', big, px=60000)"
        )
        sender = await asyncio.create_subprocess_exec(sys.executable, "-c", script, cluster.mallory_url)
        assert await asyncio.wait_for(sender.wait(), 120) == 0
        await until(lambda: admin.xlen(KEYS.events("mallory", pool.session)) == 0, within=60, what="payload dropped")
        await asyncio.sleep(3 * HEARTBEAT)  # several heartbeat scans with the 300 MiB heartbeat in place
        grown = psutil.Process().memory_info().rss - before
        assert grown < 32 * 2**20, f"the bot's memory grew by {grown / 2**20:.0f} MiB"
        assert [label(image.png) for image in await result(submit(scheduler, 2, "after"))] == ["honest|after|2"]
    assert "over the limits (dropped unread)" in caplog.text
    assert "Ignoring a heartbeat of worker mallory" in caplog.text


async def test_a_worker_that_takes_batches_and_never_finishes_loses_them_and_is_refused(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bot")
    admin = cluster.server.client()
    # Deadlines of about a lease: the lease, plus 0.01 s per step and megapixel.
    async with (
        bot_side(cluster.bot_url, seconds_per_step=0.01, strikes=3) as (pool, scheduler),
        mallory(cluster.mallory_url) as attacker,
    ):
        await attacker.beat(depth=10_000)  # what she claims to take at once
        await until(lambda: [info.name for info in pool.workers] == [MALLORY])
        assert pool.workers[0].depth == 2, "a declared depth is capped"
        tickets = [submit(scheduler, job_id, f"job{job_id}") for job_id in range(1, 6)]
        await until(lambda: admin.xlen(KEYS.batches) == 2, what="two batches for her two places")
        await asyncio.sleep(3 * HEARTBEAT)
        assert admin.xlen(KEYS.batches) == 2, "no more than her capped depth went out"
        # She takes them, and every batch that comes, and holds them by renewing them, never answering.
        held: set[bytes] = set()

        async def renew() -> None:
            for turn in itertools.count():
                await attacker.beat(depth=10_000)
                reply: Any = await attacker.redis.xreadgroup(GROUP, MALLORY, {KEYS.batches: ">"}, count=10)
                held.update(entry_id for _stream, entries in reply or [] for entry_id, _ in entries)
                if held:  # passed between her own consumers, as if that were a new holder each time
                    consumer = f"mallory/cuda:{turn % 2}"
                    await attacker.redis.xclaim(KEYS.batches, GROUP, consumer, 0, list(held), justid=True)
                await asyncio.sleep(HEARTBEAT)

        renewing = asyncio.create_task(renew())
        try:
            await until(lambda: "Refused worker mallory" in caplog.text, within=30, what="she is refused")
            assert not pool.workers
            async with honest_worker(cluster.honest_url) as rendered:
                for ticket in tickets:
                    images = await result(ticket, within=30)
                    assert label(images[0].png).startswith("honest|")
                assert sum(rendered) == 5
        finally:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewing
        assert all(ticket.attempts == 0 for ticket in tickets), "a slow worker costs the jobs no attempt"
    assert "held batch 1 past its deadline" in caplog.text or "held batch 2 past its deadline" in caplog.text


@contextlib.asynccontextmanager
async def mallory_holds(cluster: Cluster, prompt: str) -> AsyncIterator[tuple[Mallory, Ticket, RenderBatch, str]]:
    """The bot with Mallory as its only worker, holding the batch of one job: yield her, the job, its batch and its
    nonce (which she read with it)."""
    async with bot_side(cluster.bot_url) as (pool, scheduler), mallory(cluster.mallory_url) as attacker:
        await attacker.beat()
        await until(lambda: bool(pool.workers))
        ticket = submit(scheduler, 1, prompt)
        _, batch, plain = await attacker.take()
        attacker.session = pool.session
        yield attacker, ticket, batch, plain["nonce"]


async def test_a_batch_that_stops_three_workers_fails_with_a_message(cluster: Cluster) -> None:
    admin = cluster.server.client()
    async with mallory_holds(cluster, "crash") as (attacker, ticket, batch, nonce):
        await attacker.event(attacker.session, Started(batch.batch_id), nonce)
        await until(ticket.started.is_set, what="started")
        # Each worker holding it dies, and the next takes it over after the lease (XAUTOCLAIM counts a delivery).
        for device in ("cuda:1", "cuda:2", "cuda:3"):
            consumer = f"mallory/{device}"
            await until(lambda: admin.xpending_range(KEYS.batches, GROUP, "-", "+", 1)[0]["time_since_delivered"] != 0)
            await attacker.redis.xautoclaim(KEYS.batches, GROUP, consumer, 0, count=1)
            await attacker.send(attacker.session, {**pack(Started(batch.batch_id), worker=consumer, nonce=nonce)})
        with pytest.raises(RenderFailed, match="stopped GPU workers 3 times, so it was given up"):
            await result(ticket)
        assert admin.xlen(KEYS.batches) == 0, "its entry is deleted: it circles no more"


async def test_a_claimed_start_time_does_not_win_a_branch_pin(cluster: Cluster) -> None:
    async with ClusterPool(config(cluster.bot_url), model=MODEL, revision="main") as pool:
        async with honest_worker(cluster.honest_url):
            await until(lambda: pool.revision == REVISION, what="the first worker pins the branch")
            async with mallory(cluster.mallory_url) as attacker:
                await attacker.beat(revision="b" * 40, started_at=0.0)  # "I was here first"
                await asyncio.sleep(5 * HEARTBEAT)
                assert pool.revision == REVISION and [info.name for info in pool.workers] == ["honest/cuda:0"]


async def test_only_the_holder_with_the_nonce_may_answer(cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    """The pool alone: an event for a batch counts only from the worker whose consumer holds it, with its nonce."""
    caplog.set_level(logging.INFO, logger="bot")
    admin = cluster.server.client()
    async with mallory_holds(cluster, "a") as (attacker, ticket, batch, nonce):
        session = attacker.session
        good = Rendered(batch.batch_id, (RenderedImage(honest_png(batch.specs[0]), 99),), 0.1)
        # Her own stream but another consumer's name; the right consumer but a wrong nonce: both dropped.
        await attacker.send(session, {**pack(good, worker="honest/cuda:0", nonce=nonce)})
        await attacker.event(session, good, nonce="f" * 32)
        await asyncio.sleep(5 * HEARTBEAT)
        assert not ticket.result.done()
        await attacker.event(session, good, nonce=nonce)
        images = await result(ticket)
        assert images[0].seed == 1, "the seed is the bot's, not what the worker says"
        await until(lambda: admin.xlen(KEYS.batches) == 0, what="the bot acknowledged and deleted the entry")


def jpeg(size: int, colour: str = "red") -> bytes:
    output = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(output, format="JPEG")
    return output.getvalue()


async def test_preview_frames_count_only_from_the_holder_small_real_and_seldom(cluster: Cluster) -> None:
    """A worker's preview frames reach the job only from the worker holding the batch, as small JPEGs that decode,
    of the image asked for, and a few a second at most; the rest are dropped and the batch goes on."""
    preview = PreviewConfig(min_interval=60.0, max_side=64)
    pool = ClusterPool(config(cluster.bot_url), model=MODEL, revision=REVISION, preview=preview)
    async with (
        pool,
        Scheduler(workers=[pool], max_batch=1) as scheduler,
        mallory(cluster.mallory_url) as attacker,
    ):
        await attacker.beat()
        await until(lambda: bool(pool.workers))
        ticket = submit(scheduler, 1, "a")
        _, batch, plain = await attacker.take()
        assert batch.previews == (0,), "the bot asks for each job's first image"
        session, nonce = pool.session, plain["nonce"]
        await attacker.event(session, Preview(batch.batch_id, 0, 20, 25, jpeg(32)), nonce)  # before Started: no holder
        await attacker.event(session, Started(batch.batch_id), nonce)
        await until(ticket.started.is_set, what="started")
        bad = [
            Preview(batch.batch_id, 0, 21, 25, jpeg(128)),  # larger than preview.max_side
            Preview(batch.batch_id, 0, 22, 25, b"\xff\xd8\xff" + HTML),  # a JPEG's first bytes, then anything
            Preview(batch.batch_id, 3, 23, 25, jpeg(32)),  # an image nobody asked for
        ]
        for frame in bad:
            await attacker.event(session, frame, nonce)
        forged = Preview(batch.batch_id, 0, 24, 25, jpeg(32))
        await attacker.send(session, {**pack(forged, worker="mallory/cuda:1", nonce=nonce)})  # not the holder
        good = jpeg(32, "blue")
        await attacker.event(session, Preview(batch.batch_id, 0, 5, 25, good), nonce)
        await attacker.event(session, Preview(batch.batch_id, 0, 10, 25, jpeg(32)), nonce)  # too soon after it
        await until(lambda: ticket.preview is not None, what="a frame shown")
        await asyncio.sleep(5 * HEARTBEAT)  # every event above has been read
        assert ticket.preview is not None and (ticket.preview.step, ticket.preview.jpeg) == (5, good)
        done = Rendered(batch.batch_id, (RenderedImage(honest_png(batch.specs[0]), 1),), 0.1)
        await attacker.event(session, done, nonce)
        assert len(await result(ticket)) == 1
