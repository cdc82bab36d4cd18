"""The cluster mode end to end: a real Redis, the real bot against the fake Discord, and `sygil-bot worker` processes
with the tiny model on the CPU."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import pytest

from tests.bot.engine.test_revision import retrain
from tests.fakediscord import FakeDiscord, FakeInteraction
from tests.holds import Holds
from tests.redis_server import RedisServer
from tests.test_run import all_delivered, attachment_jobs, bot_process, logged, stop, write_config
from tests.waiting import until

# Each test runs the bot (or a worker) as its own process: `pytest -m "not e2e"` leaves them out.
pytestmark = pytest.mark.e2e

# Short beats, so that a dead worker's batch is taken over within seconds.
CLUSTER = "heartbeat = 0.3\nlease = 3.0"


def cluster_config(path: Path, server: FakeDiscord, model: Path, database: Path, redis: RedisServer) -> None:
    """The bot's config: batches of two images at most, so a handful of jobs make batches for every worker."""
    extra = f'[queue]\nmax_batch = 2\n\n[cluster]\nbroker = "{redis.url}"\n{CLUSTER}\n'
    write_config(path, server, model, database, extra=extra)
    text = path.read_text().replace("[generation]\n", "[generation]\nmax_count = 2\n")
    path.write_text(text)


def worker_config(path: Path, model: Path, redis: RedisServer, name: str) -> Path:
    path.write_text(
        f"""
[model]
id = "{model}"
devices = ["cpu"]

[generation]
sizes = ["64x64"]
max_count = 2

[engine]
warmup_batches = [1]

[queue]
max_batch = 2
shutdown_grace = 5

[cluster]
broker = "{redis.url}"
name = "{name}"
{CLUSTER}
""",
        "utf-8",
    )
    return path


@contextlib.asynccontextmanager
async def worker_process(
    folder: Path, model: Path, redis: RedisServer, name: str, holds: Holds
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run `sygil-bot worker` (config and log NAME.toml, NAME.log in ``folder``), with no Discord token in its
    environment; stop it with SIGTERM at the end."""
    config, log = worker_config(folder / f"{name}.toml", model, redis, name), folder / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"} | {"HF_HUB_OFFLINE": "1"} | holds.environ
    with log.open("ab") as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "worker", "--config", str(config), env=env, stdout=output, stderr=output
        )
    try:
        yield process
    finally:
        await stop(process, log, "the worker")


async def delivered(server: FakeDiscord, interactions: list[FakeInteraction], within: float = 120) -> None:
    for interaction in interactions:
        await server.wait_for_message(lambda m, i=interaction: m.interaction_id == i.id and bool(m.attachments), within)


async def test_two_workers_serve_everyone_a_killed_ones_batch_goes_to_the_other_and_a_redis_outage_loses_nothing(
    tiny_model_dir: Path, tmp_path: Path, redis_server: RedisServer
) -> None:
    database, config, log = tmp_path / "sygil.db", tmp_path / "config.toml", tmp_path / "bot.log"
    holds = Holds(tmp_path / "holds")
    other_weights = Path(shutil.copytree(tiny_model_dir, tmp_path / "retrained"))
    retrain(other_weights)
    logs = {name: tmp_path / f"{name}.log" for name in ("alpha", "beta")}
    async with FakeDiscord() as server, contextlib.AsyncExitStack() as stack:
        users = [server.add_user(f"user{i}") for i in range(6)]
        cluster_config(config, server, tiny_model_dir, database, redis_server)
        workers = {
            name: await stack.enter_async_context(worker_process(tmp_path, tiny_model_dir, redis_server, name, holds))
            for name in logs
        }
        process = await stack.enter_async_context(bot_process(config, server, log))
        await logged(log, "Worker alpha/cpu joined", within=120)
        await logged(log, "Worker beta/cpu joined", within=120)
        queue = await server.slash("queue", {})
        assert "2 up" in (await queue.wait_response())["data"]["content"]

        # A worker with other weights than the pinned ones is refused, and says which.
        stray_log = tmp_path / "stray.log"
        stray = await stack.enter_async_context(worker_process(tmp_path, other_weights, redis_server, "stray", holds))
        async with asyncio.timeout(120):
            assert await stray.wait() == 3
        # It checks the pin before it announces itself, so it never takes a batch.
        assert "Refused by the bot: this worker serves revision sha256:" in stray_log.read_text()
        assert "the bot is pinned to sha256:" in stray_log.read_text()

        def imagine(round_: str, count: int) -> list[Awaitable[FakeInteraction]]:
            prompt = f"species:seal, {round_} {{}} {holds.word(round_)}"
            return [
                server.slash("imagine", {"prompt": prompt.format(n), "count": 1}, user_id=users[n % 6])
                for n in range(count)
            ]

        # Both serve the users' batches: each holds one mid-render (a worker takes two at most, so the third of
        # the batches these six jobs make at least goes to the other).
        first = [await request for request in imagine("first", 6)]
        held = await holds.wait("first", count=2)
        assert {entry.parent for entry in held} == {workers["alpha"].pid, workers["beta"].pid}
        holds.release("first")
        await delivered(server, first)
        for path in logs.values():
            await logged(path, "Rendered batch")

        # Alpha, holding a batch mid-render (maybe one more beside it), is killed outright; beta takes its batches.
        second = [await request for request in imagine("second", 6)]
        alpha = workers["alpha"].pid
        await until(lambda: any(entry.parent == alpha for entry in holds.held("second")), 120, "alpha holds one")
        workers["alpha"].kill()
        await workers["alpha"].wait()
        holds.release("second")
        await delivered(server, second)
        await logged(log, "Worker alpha/cpu left")

        # Redis goes away while beta renders, for longer than the lease: beta cannot publish what it rendered, and
        # the bot keeps accepting jobs and says why nothing moves. When Redis comes back empty, all are delivered.
        third = [await request for request in imagine("third", 2)]
        await holds.wait("third")
        redis_server.stop()
        await logged(log, "is unreachable (")  # the bot notices at its next read of the events (10 to 100 ms)
        during = [await server.slash("imagine", {"prompt": f"species:cat, {n}"}, user_id=users[n]) for n in range(2)]
        for interaction in during:
            assert (await interaction.wait_response())["type"] == 5
        queue = await server.slash("queue", {}, user_id=users[0])
        assert "unreachable" in (await queue.wait_response())["data"]["content"]
        holds.release("third")
        await logged(logs["beta"], "Dropped the outcome of batch", within=60)  # it tried for a whole lease
        redis_server.start()
        await delivered(server, third + during)

        assert process.returncode is None and workers["beta"].returncode is None, "nothing was restarted"
        await all_delivered(database)
        await stop(process, log, "the bot")
        counts = attachment_jobs(server)
        assert len(counts) == 6 + 6 + 2 + 2 and set(counts.values()) == {1}, counts
        assert server.violations == []
    text = log.read_text()
    assert "Traceback" not in text and "Traceback" not in logs["beta"].read_text()
