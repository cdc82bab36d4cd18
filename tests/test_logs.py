"""What an operator reads in the log of ``sygil-bot run`` and ``sygil-bot worker``: one line per event, no noise."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import pytest

from tests.fakediscord import FakeDiscord
from tests.redis_server import RedisServer
from tests.test_run import bot_process, stop, write_config
from tests.waiting import until

# Each test runs the bot (or a worker) as its own process: `pytest -m "not e2e"` leaves them out.
pytestmark = pytest.mark.e2e


def assert_quiet(log: str) -> None:
    """No warnings about voice, which the bot never uses, and no progress bars (carriage returns, escape codes)."""
    for noise in ("PyNaCl", "davey", "\x1b[", "\r", "Loading pipeline components", "Loading weights"):
        assert noise not in log, f"{noise!r} in the log:\n{log}"


def ready_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if re.search(r"\bready\b", line)]


async def test_the_bots_log_says_once_that_its_cpu_worker_is_ready(tiny_model_dir: Path, tmp_path: Path) -> None:
    config, log = tmp_path / "config.toml", tmp_path / "bot.log"
    async with FakeDiscord() as server:
        write_config(config, server, tiny_model_dir, tmp_path / "sygil.db")
        async with bot_process(config, server, log):
            pass
    text = log.read_bytes().decode()  # as written: read_text would turn carriage returns into newlines
    assert_quiet(text)
    (ready,) = ready_lines(text)
    assert re.search(r"INFO    bot\.engine\.process: CPU worker cpu ready: pid \d+ on cpu ", ready), ready


async def test_a_remote_workers_log_says_once_that_its_device_is_ready(
    tiny_model_dir: Path, tmp_path: Path, redis_server: RedisServer
) -> None:
    config, log = tmp_path / "worker.toml", tmp_path / "worker.log"
    config.write_text(
        f'[model]\nid = "{tiny_model_dir}"\ndevices = ["cpu"]\n[generation]\nsizes = ["64x64"]\n'
        f'[engine]\nwarmup_batches = [1]\n[cluster]\nbroker = "{redis_server.url}"\nname = "w1"\n',
        "utf-8",
    )
    environ = {key: value for key, value in os.environ.items() if key != "DISCORD_TOKEN"} | {"HF_HUB_OFFLINE": "1"}
    with log.open("ab") as output:
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "worker", "--config", str(config), env=environ, stdout=output, stderr=output
        )
    try:
        await until(lambda: "Waiting for the bot" in log.read_text(), 120, "the worker waiting for the bot")
    finally:
        await stop(worker, log, "the worker")
    text = log.read_bytes().decode()  # as written: read_text would turn carriage returns into newlines
    assert_quiet(text)
    (ready,) = ready_lines(text)
    assert "INFO    bot.cluster.remote: Cluster worker w1/cpu ready on cpu (cpu)" in ready, ready
