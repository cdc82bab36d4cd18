"""The cluster mode end to end: a real Redis, the real bot against the fake Discord, and `sygil-bot worker` processes
with the tiny model on the CPU."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from tests.bot.engine.test_revision import retrain
from tests.fakediscord import FakeDiscord, FakeInteraction
from tests.redis_server import RedisServer
from tests.test_run import attachment_jobs, bot_process, logged, status, stop, write_config

# Short beats, so that a dead worker's batch is taken over within seconds.
CLUSTER = "heartbeat = 0.3\nlease = 3.0"
SLOW = {"size": "512x512", "steps": 8}  # a few seconds on a CPU: long enough to catch a batch in hand


def cluster_config(path: Path, server: FakeDiscord, model: Path, database: Path, redis: RedisServer) -> None:
    """The bot's config: batches of two images at most, so a dozen jobs make batches for every worker."""
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
sizes = ["512x512"]
max_count = 2

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
async def worker_process(config: Path, log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run `sygil-bot worker`, with no Discord token in its environment; stop it with SIGTERM at the end."""
    env = {k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"} | {"HF_HUB_OFFLINE": "1"}
    with log.open("ab") as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "worker", "--config", str(config), env=env, stdout=output, stderr=output
        )
    try:
        yield process
    finally:
        await stop(process, log, "the worker")


async def delivered(server: FakeDiscord, interactions: list[FakeInteraction], within: float = 240) -> None:
    for interaction in interactions:
        await server.wait_for_message(lambda m, i=interaction: m.interaction_id == i.id and bool(m.attachments), within)


async def test_two_workers_serve_everyone_and_a_killed_ones_batch_is_run_by_the_other(
    tiny_model_dir: Path, tmp_path: Path, redis_server: RedisServer
) -> None:
    database, config, log = tmp_path / "sygil.db", tmp_path / "config.toml", tmp_path / "bot.log"
    logs = {name: tmp_path / f"{name}.log" for name in ("alpha", "beta")}
    async with FakeDiscord() as server, contextlib.AsyncExitStack() as stack:
        users = [server.add_user(f"user{i}") for i in range(6)]
        cluster_config(config, server, tiny_model_dir, database, redis_server)
        workers = {
            name: await stack.enter_async_context(
                worker_process(worker_config(tmp_path / f"{name}.toml", tiny_model_dir, redis_server, name), path)
            )
            for name, path in logs.items()
        }
        process = await stack.enter_async_context(bot_process(config, server, log))
        await logged(log, "Worker alpha-cpu joined", within=120)
        await logged(log, "Worker beta-cpu joined", within=120)
        queue = await server.slash("queue", {})
        assert "2 up" in (await queue.wait_response())["data"]["content"]

        interactions = [
            await server.slash("imagine", {"prompt": f"species:seal, {n}", "count": 1, **SLOW}, user_id=users[n % 6])
            for n in range(12)
        ]
        # Both serve the users' batches...
        for path in logs.values():
            await logged(path, "Rendered batch", within=120)
        # ...then alpha, holding a batch (one on its CPU, maybe one more beside it), is killed outright.
        client = redis_server.client()
        for _ in range(600):
            if client.xpending_range("sygil:batches", "workers", "-", "+", 10, consumername="alpha-cpu"):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("alpha never took a batch")
        client.close()
        workers["alpha"].kill()
        await workers["alpha"].wait()
        await delivered(server, interactions)
        await logged(log, "Worker alpha-cpu left")
        assert process.returncode is None
        await asyncio.sleep(1)  # nothing more arrives
        counts = attachment_jobs(server)
        assert len(counts) == 12 and set(counts.values()) == {1}, counts
        assert server.violations == []
    assert "Traceback" not in log.read_text()


async def test_redis_down_for_ten_seconds_loses_nothing_and_a_worker_of_other_weights_is_refused(
    tiny_model_dir: Path, tmp_path: Path, redis_server: RedisServer
) -> None:
    database, config, log = tmp_path / "sygil.db", tmp_path / "config.toml", tmp_path / "bot.log"
    other_weights = Path(shutil.copytree(tiny_model_dir, tmp_path / "retrained"))
    retrain(other_weights)
    async with FakeDiscord() as server, contextlib.AsyncExitStack() as stack:
        users = [server.add_user(f"user{i}") for i in range(4)]
        cluster_config(config, server, tiny_model_dir, database, redis_server)
        worker_log = tmp_path / "worker.log"
        await stack.enter_async_context(
            worker_process(worker_config(tmp_path / "worker.toml", tiny_model_dir, redis_server, "gamma"), worker_log)
        )
        await stack.enter_async_context(bot_process(config, server, log))
        await logged(log, "Worker gamma-cpu joined", within=120)

        # A worker with other weights than the pinned ones is refused, and says which.
        stray_log = tmp_path / "stray.log"
        stray = await stack.enter_async_context(
            worker_process(worker_config(tmp_path / "stray.toml", other_weights, redis_server, "stray"), stray_log)
        )
        async with asyncio.timeout(120):
            assert await stray.wait() == 3
        # It checks the pin before it announces itself, so it never takes a batch.
        assert "Refused by the bot: this worker serves revision sha256:" in stray_log.read_text()
        assert "the bot is pinned to sha256:" in stray_log.read_text()

        before = [
            await server.slash("imagine", {"prompt": f"species:seal, {n}", **SLOW}, user_id=users[n % 4])
            for n in range(4)
        ]
        await status(server, before[0], "Rendering")
        redis_server.stop()
        # The bot keeps accepting while the broker is gone, and /queue says why nothing moves.
        during = [
            await server.slash("imagine", {"prompt": f"species:cat, {n}"}, user_id=users[n % 4]) for n in range(2)
        ]
        for interaction in during:
            assert (await interaction.wait_response())["type"] == 5
        queue = await server.slash("queue", {}, user_id=users[0])
        assert "unreachable" in (await queue.wait_response())["data"]["content"]
        await asyncio.sleep(10)
        redis_server.start()
        await delivered(server, before + during)
        await asyncio.sleep(2)  # nothing more arrives
        counts = attachment_jobs(server)
        assert len(counts) == 6 and set(counts.values()) == {1}, counts
        assert server.violations == []
    text = log.read_text()
    assert "Traceback" not in text and "Traceback" not in worker_log.read_text()
