"""``sygil-bot run`` as a real process, logged in to the fake Discord: serve, stop, start again, click old buttons."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from PIL import Image

from bot.storage import Database
from tests.fakediscord import FakeDiscord


def write_config(path: Path, server: FakeDiscord, model: Path, database: Path) -> None:
    path.write_text(
        f"""
[discord]
api_base_url = "{server.api_base_url}"
gateway_url = "{server.gateway_url}"
guild_ids = [{server.guild_id}]
guild_ready_timeout = 0.1

[model]
id = "{model}"
device = "cpu"

[generation]
default_steps = 3
sizes = ["64x64", "64x96"]

[storage]
path = "{database}"
""",
        "utf-8",
    )


@contextlib.asynccontextmanager
async def bot_process(config: Path, server: FakeDiscord, log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    # PYTHONFAULTHANDLER: a hung bot dumps every thread's stack into the log when it is aborted below.
    env = os.environ | {"DISCORD_TOKEN": server.token, "HF_HUB_OFFLINE": "1", "PYTHONFAULTHANDLER": "1"}
    with log.open("ab") as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "run", "--config", str(config), env=env, stdout=output, stderr=output
        )
    try:
        syncs = server.command_syncs
        async with asyncio.timeout(120):
            while server.command_syncs == syncs:
                if process.returncode is not None:
                    raise AssertionError(f"the bot exited early:\n{log.read_text()}")
                await asyncio.sleep(0.1)
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(30):
                    await process.wait()
            except TimeoutError:
                process.send_signal(signal.SIGABRT)
                await process.wait()
                raise AssertionError(f"the bot did not stop on SIGTERM:\n{log.read_text()[-6000:]}") from None


async def test_run_serves_imagine_and_old_buttons_work_after_a_restart(tiny_model_dir: Path, tmp_path: Path) -> None:
    database = tmp_path / "sygil.db"
    config = tmp_path / "config.toml"
    log = tmp_path / "bot.log"
    async with FakeDiscord() as server:
        write_config(config, server, tiny_model_dir, database)

        async with bot_process(config, server, log) as process:
            assert "imagine" in server.commands
            interaction = await server.slash("imagine", {"prompt": "species:seal, @everyone", "count": 2})
            await interaction.wait_response()
            assert interaction.response_type == 5 and interaction.response_delay is not None
            assert interaction.response_delay < 3
            message = await server.wait_for_message(
                lambda m: m.interaction_id == interaction.id and bool(m.attachments), timeout=120
            )
            assert [Image.open(io.BytesIO(a.data)).size for a in message.attachments] == [(64, 64), (64, 64)]
            assert message.allowed_mentions == {"parse": []}
            job_id = int(message.attachments[0].filename.split("_")[1])
            vote = await server.click(message.id, f"imagine:vote:{job_id}:0:up")
            assert (await vote.wait_response())["type"] == 7
            await server.wait_for_message(lambda m: m.interaction_id == vote.id and m.ephemeral)
        assert process.returncode == 0, log.read_text()

        async with bot_process(config, server, log) as process:
            reroll = await server.click(message.id, f"imagine:reroll:{job_id}:1")
            rerolled = await server.wait_for_message(
                lambda m: m.interaction_id == reroll.id and bool(m.attachments), timeout=120
            )
            assert "Reroll of image 2" in rerolled.content
            vote = await server.click(message.id, f"imagine:vote:{job_id}:1:down")
            assert (await vote.wait_response())["type"] == 7
            await server.wait_for_message(lambda m: m.interaction_id == vote.id and m.ephemeral)
        assert process.returncode == 0, log.read_text()
        assert server.violations == []

    async with await Database.open(database) as db:
        first = await db.vote_tally(job_id=job_id, index=0)
        second = await db.vote_tally(job_id=job_id, index=1)
    assert (first.up, first.down, second.up, second.down) == (1, 0, 0, 1)
    assert "Traceback" not in log.read_text()
