"""The remote worker against a real Redis, the test playing the bot with plain Redis commands.

One CPU worker process with the tiny model serves the module's hosts (loading a model is what costs); the command
line tests start their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from PIL import Image
from redis.asyncio import Redis

from bot.cluster.broker import connect, create_group
from bot.cluster.remote import Executor, PinRefused, Served, WorkerHost, process_executor
from bot.cluster.wire import GROUP, BotInfo, Keys, WorkerInfo, pack, unpack
from bot.config import ClusterConfig
from bot.engine import EngineOptions, ImageSpec, RenderedImage, Settings
from bot.engine.executor import ThreadWorker
from bot.engine.process import WorkerProcess
from bot.engine.protocol import (
    Failed,
    FailureKind,
    Message,
    Preview,
    PreviewOptions,
    Progress,
    RenderBatch,
    Rendered,
    Started,
    WorkerSettings,
)
from bot.engine.revision import folder_revision
from bot.errors import ConfigError
from tests.holds import Holds
from tests.redis_server import RedisServer

pytestmark = pytest.mark.asyncio(loop_scope="module")

FAST = Settings(steps=3, width=64, height=64)
HEARTBEAT, LEASE = 0.2, 1.0
KEYS = Keys("test")
OTHER_REVISION = "sha256:" + "0" * 64
_POLL = 0.05


def _spec(prompt: str, seed: int, settings: Settings = FAST) -> ImageSpec:
    return ImageSpec(prompt=prompt, negative_prompt="", seed=seed, settings=settings)


@pytest.fixture(scope="module")
def holds(tmp_path_factory: pytest.TempPathFactory) -> Holds:
    """Batches whose prompt says ``hold-NAME`` wait mid-render in the module's worker process until released."""
    return Holds(tmp_path_factory.mktemp("holds"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def process(tiny_model_dir: Path, holds: Holds) -> AsyncIterator[WorkerProcess]:
    settings = WorkerSettings(
        model_id=str(tiny_model_dir),
        device="cpu",
        threads=1,
        options=EngineOptions(warmup_batches=(1,), warmup_sizes=((64, 64),)),
        environ=holds.environ,
    )
    async with WorkerProcess(settings) as worker:
        yield worker


@pytest.fixture
def revision(tiny_model_dir: Path) -> str:
    return folder_revision(tiny_model_dir)


@pytest_asyncio.fixture(loop_scope="module")
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    async with Redis.from_url(redis_server.url) as client:  # pyright: ignore[reportUnknownMemberType]
        yield client


class FakeBot:
    """The bot's side of the wire: announce, send batches, read events."""

    def __init__(self, client: Redis, session: str = "s1") -> None:
        self.client = client
        self.session = session
        self.events: dict[int, list[tuple[Message, dict[str, str]]]] = {}
        self.entries: dict[int, str] = {}  # batch id → its entry, acknowledged and deleted with its outcome
        self._last: dict[bytes, bytes] = {}

    async def announce(self, revision: str | None, *, session: str | None = None) -> None:
        """Announce the bot, and make the workers' group as the bot does when it connects (a worker may not)."""
        await create_group(self.client, KEYS.batches)
        await self.client.set(KEYS.bot, BotInfo(session or self.session, "tiny", revision, LEASE).dump())

    async def send(
        self, batch_id: int, specs: Sequence[ImageSpec], *, session: str | None = None, previews: tuple[int, ...] = ()
    ) -> str:
        batch = RenderBatch(batch_id, tuple(specs), previews)
        fields: dict[Any, Any] = pack(batch, session=session or self.session)
        entry = await self.client.xadd(KEYS.batches, fields)
        self.entries[batch_id] = entry.decode() if isinstance(entry, bytes) else entry
        return self.entries[batch_id]

    async def read(self, session: str | None = None) -> None:
        """Read every worker's events stream of the session, and take outcomes as the bot does."""
        keys = await _keys(self.client, KEYS.events("*", session or self.session))
        if not keys:
            await asyncio.sleep(0.1)
            return
        reply: Any = await self.client.xread({key: self._last.get(key, b"0-0") for key in keys}, block=100)
        for stream, entries in reply or []:
            for entry, fields in entries:
                self._last[stream] = entry
                message, plain = unpack(fields)
                self.events.setdefault(getattr(message, "batch_id", -1), []).append((message, plain))
                taken = self.entries.get(getattr(message, "batch_id", -1))
                if isinstance(message, Rendered | Failed) and taken is not None:
                    await self.client.xack(KEYS.batches, GROUP, taken)
                    await self.client.xdel(KEYS.batches, taken)

    async def until(self, done: Callable[[], bool], *, session: str | None = None, within: float = 60.0) -> None:
        async with asyncio.timeout(within):
            while not done():
                await self.read(session)

    def outcome(self, batch_id: int) -> Message | None:
        events = self.events.get(batch_id, [])
        return next((message for message, _ in events if isinstance(message, Rendered | Failed)), None)

    def progressed(self, batch_id: int) -> bool:
        return any(isinstance(message, Progress) for message, _ in self.events.get(batch_id, []))

    async def finished(
        self, batch_id: int, *, session: str | None = None, within: float = 60.0
    ) -> list[tuple[Message, dict[str, str]]]:
        await self.until(lambda: self.outcome(batch_id) is not None, session=session, within=within)
        return self.events[batch_id]

    async def settled(self) -> None:
        """Wait until every batch entry is acknowledged (by the worker for one it dropped, else by the bot)."""

        async def empty() -> bool:
            pending: Any = await self.client.xpending(KEYS.batches, GROUP)
            return pending["pending"] == 0

        await eventually(empty)


async def _keys(client: Redis, pattern: str) -> list[bytes]:
    return [key async for key in client.scan_iter(match=pattern)]


def beat(consumer: str) -> str:
    """The heartbeat key of a consumer named ``worker/device``."""
    worker, _, device = consumer.partition("/")
    return KEYS.beat(worker, device)


async def eventually(check: Callable[[], Awaitable[object]], within: float = 15.0) -> None:
    for _ in range(int(within / _POLL)):
        if await check():
            return
        await asyncio.sleep(_POLL)
    raise AssertionError(f"not so within {within} s")


@contextlib.asynccontextmanager
async def serving(
    server: RedisServer, executor: Executor, *, name: str | None = None, grace: float = 5.0
) -> AsyncIterator[tuple[WorkerHost, asyncio.Task[None]]]:
    cluster = ClusterConfig(broker=server.url, prefix="test", lease=LEASE, heartbeat=HEARTBEAT)
    async with connect(server.url) as broker:
        host = WorkerHost(broker, cluster, model="tiny", executors=[executor], grace=grace, name=name)
        task = asyncio.create_task(host.run())
        try:
            yield host, task
        finally:
            host.stop()
            with contextlib.suppress(PinRefused, ConfigError):
                await asyncio.wait_for(task, 30)


def fake_executor(revision: str = OTHER_REVISION) -> Executor:
    """An executor without a model, for what needs no rendering."""

    def render(specs: Sequence[ImageSpec], progress: object = None) -> list[RenderedImage]:
        return [RenderedImage(b"png", spec.seed) for spec in specs]

    return Executor(ThreadWorker(render), lambda: Served("cpu", "fake", revision, "float32"))


def _logged(caplog: pytest.LogCaptureFixture, text: str) -> Awaitable[bool]:
    async def check() -> bool:
        return any(record.getMessage().startswith(text) for record in caplog.records)

    return check()


def _pngs(rendered: Rendered) -> list[tuple[int, int]]:
    sizes: list[tuple[int, int]] = []
    for image in rendered.images:
        with Image.open(io.BytesIO(image.png)) as png:
            assert png.format == "PNG"
            png.load()
            sizes.append(png.size)
    return sizes


async def test_a_pinned_worker_announces_itself_renders_and_acknowledges(
    redis_server: RedisServer, client: Redis, process: WorkerProcess, revision: str
) -> None:
    bot = FakeBot(client)
    async with serving(redis_server, process_executor(process)) as (host, _):
        [name] = host.names
        assert name == f"{socket.gethostname()}-{os.getpid()}/cpu"
        await eventually(lambda: client.exists(beat(name)))
        info = WorkerInfo.load(await client.get(beat(name)) or b"")
        host_name = socket.gethostname()
        assert info == WorkerInfo(name, host_name, "cpu", "cpu", "tiny", revision, "float32", 2, 0, info.started_at)
        assert abs(info.started_at - time.time()) < 60
        assert 0 < await client.ttl(beat(name)) <= 1  # three heartbeats of 0.2 s, rounded up

        await bot.announce(revision)
        await bot.send(1, [_spec("species:seal, beach", 7), _spec("studio:dc", 8)])
        events = await bot.finished(1)
        messages = [message for message, _ in events]
        assert isinstance(messages[0], Started) and isinstance(messages[-1], Rendered)
        assert [message.step for message in messages if isinstance(message, Progress)][-1] == 3
        rendered = messages[-1]
        assert [image.seed for image in rendered.images] == [7, 8]
        assert _pngs(rendered) == [(64, 64), (64, 64)]
        assert rendered.seconds > 0 and not rendered.compiled
        assert {plain["worker"] for _, plain in events} == {name}
        await bot.settled()
    assert not await client.exists(beat(name)), "a clean stop deletes the heartbeat"


async def test_preview_frames_of_the_images_asked_for_go_through_redis_before_the_images(
    redis_server: RedisServer, client: Redis, tiny_model_dir: Path, revision: str
) -> None:
    settings = WorkerSettings(
        model_id=str(tiny_model_dir),
        device="cpu",
        threads=1,
        options=EngineOptions(warmup_batches=(1,), warmup_sizes=((64, 64),), warmup_steps=1),
        preview=PreviewOptions(decoder="latent2rgb", every=1, min_interval=0),
    )
    bot = FakeBot(client)
    async with WorkerProcess(settings) as drawing, serving(redis_server, process_executor(drawing)) as (host, _):
        await bot.announce(revision)
        await bot.send(1, [_spec("species:seal", 7), _spec("studio:dc", 8)], previews=(1,))
        messages = [message for message, _ in await bot.finished(1)]
        frames = [(m.index, m.step, m.jpeg[:3]) for m in messages if isinstance(m, Preview)]
        assert frames == [(1, 1, b"\xff\xd8\xff"), (1, 2, b"\xff\xd8\xff")]  # none at the last step
        assert isinstance(messages[-1], Rendered)
        await bot.settled()
        assert host.names


async def test_a_worker_waits_for_the_bot_and_its_pin_then_pulls(
    redis_server: RedisServer,
    client: Redis,
    process: WorkerProcess,
    revision: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="bot.cluster.remote")
    bot = FakeBot(client)
    async with serving(redis_server, process_executor(process)):
        await bot.send(2, [_spec("species:owl", 2)])
        await eventually(lambda: _logged(caplog, "Waiting for the bot: it has not announced itself"))
        await bot.announce(None)
        await eventually(lambda: _logged(caplog, "Waiting for the bot to pin a model revision"))
        assert not await _keys(client, KEYS.events("*", bot.session))
        groups: Any = await client.xinfo_groups(KEYS.batches) if await client.exists(KEYS.batches) else []
        assert all(group["pending"] == 0 for group in groups), "nothing was pulled"
        await bot.announce(revision)
        events = await bot.finished(2)
        assert isinstance(events[-1][0], Rendered)


async def test_a_batch_of_an_earlier_bot_session_is_dropped_unrendered(
    redis_server: RedisServer, client: Redis, process: WorkerProcess, revision: str
) -> None:
    bot = FakeBot(client, session="s2")
    async with serving(redis_server, process_executor(process)):
        await bot.announce(revision)
        await bot.send(3, [_spec("species:cat", 3)], session="s1")
        await bot.send(4, [_spec("species:cat", 4)])
        assert isinstance((await bot.finished(4))[-1][0], Rendered)
        await bot.settled()
    assert not await _keys(client, KEYS.events("*", "s1")), "the old batch was neither started nor answered"


async def test_a_stop_key_stops_a_batch_before_it_starts_and_while_it_renders(
    redis_server: RedisServer, client: Redis, process: WorkerProcess, revision: str, holds: Holds
) -> None:
    bot = FakeBot(client)
    async with serving(redis_server, process_executor(process)):
        await bot.announce(revision)
        # Held mid-render and never released: only the stop can end it.
        await bot.send(5, [_spec(f"species:whale, {holds.word('stopkey')}", 5)])
        await client.set(KEYS.stop(bot.session, 6), 1)
        await bot.send(6, [_spec("species:whale", 6)])
        before = [message for message, _ in await bot.finished(6)]
        assert before == [Failed(6, FailureKind.STOPPED, "stopped before it started")]

        await holds.wait("stopkey")
        await client.set(KEYS.stop(bot.session, 5), 1)
        events = await bot.finished(5)
        outcome = events[-1][0]
        assert isinstance(outcome, Failed) and outcome.kind is FailureKind.STOPPED
        assert not any(isinstance(message, Rendered) for message, _ in events)
        await bot.settled()


async def test_an_entry_held_by_a_dead_worker_is_taken_over_after_its_lease(
    redis_server: RedisServer, client: Redis, process: WorkerProcess, revision: str
) -> None:
    bot = FakeBot(client)
    await bot.announce(revision)
    await bot.send(7, [_spec("species:fox", 7)])
    # A worker reads the entry and dies: it never renews, publishes or acknowledges.
    taken: Any = await client.xreadgroup(GROUP, "dead-worker", {KEYS.batches: ">"}, count=1)
    assert taken
    dead_at = time.monotonic()
    async with serving(redis_server, process_executor(process)) as (host, _):
        events = await bot.finished(7)
        assert time.monotonic() - dead_at >= LEASE
        assert isinstance(events[-1][0], Rendered) and events[-1][1]["worker"] == host.names[0]
        assert [image.seed for image in events[-1][0].images] == [7]
        await bot.settled()


async def test_the_worker_recovers_by_itself_when_redis_comes_back_empty(
    redis_server: RedisServer,
    client: Redis,
    process: WorkerProcess,
    revision: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="bot.cluster.remote")
    bot = FakeBot(client)
    async with serving(redis_server, process_executor(process)) as (host, _):
        await bot.announce(revision)
        await bot.send(8, [_spec("species:seal", 8)])
        assert isinstance((await bot.finished(8))[-1][0], Rendered)
        redis_server.stop()
        await eventually(lambda: _logged(caplog, "Lost the broker"))
        redis_server.start()
        await client.connection_pool.disconnect()  # the test's own connections died with the server
        await eventually(lambda: client.exists(beat(host.names[0])))  # the heartbeat is back
        await bot.announce(revision)  # as the bot does every heartbeat
        await bot.send(9, [_spec("species:seal", 9)])
        events = await bot.finished(9, within=30)
        assert isinstance(events[-1][0], Rendered)
    lost = [record for record in caplog.records if record.getMessage().startswith("Lost the broker")]
    assert len(lost) == 1, "one warning, not one per retry"
    assert lost[0].levelno == logging.WARNING and not lost[0].exc_info
    assert any("is back" in record.getMessage() for record in caplog.records)


async def test_a_batch_lost_with_the_local_process_is_given_back_and_rendered_once(
    redis_server: RedisServer, client: Redis, process: WorkerProcess, revision: str, holds: Holds
) -> None:
    bot = FakeBot(client)
    restarts = process.restarts
    async with serving(redis_server, process_executor(process)):
        await bot.announce(revision)
        await bot.send(10, [_spec(f"species:fox, {holds.word('lost')}", 10)])
        await holds.wait("lost")
        process.kill()  # mid-render; the new process renders it through
        holds.release("lost")
        events = await bot.finished(10, within=90)
        await bot.settled()
    messages = [message for message, _ in events]
    assert process.restarts == restarts + 1
    assert sum(isinstance(message, Started) for message in messages) == 2  # once per attempt
    assert [type(message) for message in messages if isinstance(message, Rendered | Failed)] == [Rendered]


async def test_a_stopping_worker_gives_back_what_it_cannot_finish_and_another_takes_it_at_once(
    redis_server: RedisServer, client: Redis, process: WorkerProcess, revision: str, holds: Holds
) -> None:
    bot = FakeBot(client)
    async with serving(redis_server, process_executor(process), name="first", grace=0.1) as (first, task):
        await bot.announce(revision)
        await bot.send(11, [_spec(f"species:fox, {holds.word('giveback')}", 11)])
        await holds.wait("giveback")  # it cannot finish within the grace
        first.stop()
        await asyncio.wait_for(task, 10)
    assert not await client.exists(beat("first/cpu"))
    assert bot.outcome(11) is None, "nothing published for a batch given back"
    pending: Any = await client.xpending_range(KEYS.batches, GROUP, "-", "+", 10)
    assert [item["consumer"] for item in pending] == [b"first/cpu"]
    assert pending[0]["time_since_delivered"] >= LEASE * 1000, "claimable now, not after a lease"
    holds.release("giveback")
    async with serving(redis_server, process_executor(process), name="second"):
        events = await bot.finished(11)
        assert events[-1][1]["worker"] == "second/cpu" and isinstance(events[-1][0], Rendered)


async def test_a_worker_of_another_revision_is_refused(redis_server: RedisServer, client: Redis) -> None:
    await FakeBot(client).announce("sha256:" + "1" * 64)
    async with serving(redis_server, fake_executor()) as (host, task):
        with pytest.raises(PinRefused, match=f"serves revision {OTHER_REVISION}, the bot is pinned to sha256:1111"):
            await asyncio.wait_for(task, 10)
        assert not await client.exists(beat(host.names[0]))


async def test_two_workers_cannot_share_a_name(redis_server: RedisServer, client: Redis) -> None:
    async with serving(redis_server, fake_executor(), name="twin") as (first, _):
        await eventually(lambda: client.exists(beat("twin/cpu")))
        async with serving(redis_server, fake_executor(), name="twin") as (_, task):
            with pytest.raises(ConfigError, match="Another worker named twin/cpu is running"):
                await asyncio.wait_for(task, 10)
        assert await client.exists(beat("twin/cpu")), "the first keeps its heartbeat"
        assert first.names == ["twin/cpu"]


async def test_a_wrong_password_is_one_clear_error_without_the_password(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis", password="hunter2") as server:
        wrong = server.url.replace("hunter2", "swordfish")
        cluster = ClusterConfig(broker=wrong, prefix="test", lease=LEASE, heartbeat=HEARTBEAT)
        async with connect(wrong) as broker:
            host = WorkerHost(broker, cluster, model="tiny", executors=[fake_executor()])
            with pytest.raises(ConfigError, match=r"refused this worker") as raised:
                await asyncio.wait_for(host.run(), 10)
    assert "swordfish" not in str(raised.value) and "redis://:***@127.0.0.1" in str(raised.value)


# The command line, as an operator runs it


def _write_config(path: Path, model: Path, broker: str | None) -> None:
    cluster = f'broker = "{broker}"\n' if broker else ""
    path.write_text(
        f'[model]\nid = "{model}"\ndevices = ["cpu"]\n[generation]\nsizes = ["64x64"]\n'
        "[engine]\nwarmup_batches = [1]\n"
        f'[storage]\npath = "{path.parent / "sygil.db"}"\n'
        f'[cluster]\n{cluster}prefix = "test"\nheartbeat = {HEARTBEAT}\nlease = {LEASE}\n',
        "utf-8",
    )


async def _start_cli(config: Path, log: Path, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    environ = {k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"} | {"HF_HUB_OFFLINE": "1"}
    with log.open("ab") as output:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "worker", "--config", str(config),
            env=environ | (env or {}), stdout=output, stderr=output,
        )  # fmt: skip


async def _heartbeats(client: Redis) -> list[bytes]:
    return await _keys(client, KEYS.beats)


@pytest.mark.e2e
async def test_the_worker_command_needs_a_broker(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = tmp_path / "worker.toml"
    _write_config(config, tiny_model_dir, broker=None)
    log = tmp_path / "worker.log"
    cli = await _start_cli(config, log)
    assert await asyncio.wait_for(cli.wait(), 60) == 2
    text = log.read_text()
    assert "sygil-bot worker needs cluster.broker (or SYGIL_BROKER)" in text and "Traceback" not in text


@pytest.mark.e2e
async def test_the_worker_command_renders_and_stops_cleanly_on_sigterm(
    tmp_path: Path, tiny_model_dir: Path, revision: str
) -> None:
    with RedisServer(tmp_path / "redis", password="hunter2") as server:
        async with Redis.from_url(server.url) as client:  # pyright: ignore[reportUnknownMemberType]
            config, log = tmp_path / "worker.toml", tmp_path / "worker.log"
            _write_config(config, tiny_model_dir, broker=None)
            cli = await _start_cli(config, log, env={"SYGIL_BROKER": server.url})  # the password stays out of files
            try:
                await eventually(lambda: _heartbeats(client), within=120)
                bot = FakeBot(client)
                await bot.announce(revision)
                await bot.send(1, [_spec("species:seal", 1)])
                assert isinstance((await bot.finished(1))[-1][0], Rendered)
                cli.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(cli.wait(), 60) == 0
            finally:
                if cli.returncode is None:
                    cli.kill()
                    await cli.wait()
            assert await _heartbeats(client) == []
    text = log.read_text()
    assert "Cluster worker" in text and "ready on cpu" in text and "redis://:***@127.0.0.1" in text
    assert "hunter2" not in text and "Traceback" not in text


@pytest.mark.e2e
async def test_the_worker_command_exits_3_when_the_bot_is_pinned_to_another_revision(
    tmp_path: Path, tiny_model_dir: Path, revision: str
) -> None:
    with RedisServer(tmp_path / "redis", password="hunter2") as server:
        async with Redis.from_url(server.url) as client:  # pyright: ignore[reportUnknownMemberType]
            config, log = tmp_path / "worker.toml", tmp_path / "worker.log"
            _write_config(config, tiny_model_dir, broker=server.url)
            cli = await _start_cli(config, log)
            try:
                await eventually(lambda: _heartbeats(client), within=120)
                await FakeBot(client).announce(OTHER_REVISION)
                assert await asyncio.wait_for(cli.wait(), 60) == 3
            finally:
                if cli.returncode is None:
                    cli.kill()
                    await cli.wait()
            assert await _heartbeats(client) == []
    text = log.read_text()
    assert f"Refused by the bot: this worker serves revision {revision}, the bot is pinned to {OTHER_REVISION}" in text
    assert "hunter2" not in text and "Traceback" not in text
