"""``sygil-bot run`` as a real process, logged in to the fake Discord: serve, stop, start again, click old buttons."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from PIL import Image

from bot.storage import Database
from tests.cogs.conftest import remix_result
from tests.fakediscord import FakeDiscord, FakeInteraction, Message
from tests.holds import Holds
from tests.waiting import until

# Each test runs the bot (or a worker) as its own process: `pytest -m "not e2e"` leaves them out.
pytestmark = pytest.mark.e2e


def write_config(
    path: Path, server: FakeDiscord, model: Path, database: Path, *, extra: str = "", devices: str = '["cpu"]'
) -> None:
    path.write_text(
        f"""
[discord]
api_base_url = "{server.api_base_url}"
gateway_url = "{server.gateway_url}"
guild_ids = [{server.guild_id}]
guild_ready_timeout = 0.1

[model]
id = "{model}"
devices = {devices}

[generation]
default_steps = 3
sizes = ["64x64", "64x96", "512x512"]

[engine]
warmup_batches = [1]

[storage]
path = "{database}"
{extra}
""",
        "utf-8",
    )


@contextlib.asynccontextmanager
async def bot_process(
    config: Path, server: FakeDiscord, log: Path, *, holds: Holds | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run `sygil-bot run` logged in to the fake Discord; its worker processes read ``holds``."""
    # PYTHONFAULTHANDLER: a hung bot dumps every thread's stack into the log when it is aborted below.
    env = os.environ | {"DISCORD_TOKEN": server.token, "HF_HUB_OFFLINE": "1", "PYTHONFAULTHANDLER": "1"}
    env |= holds.environ if holds is not None else {}
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
        # Commands are synced before the gateway session opens: wait for it too, or a slash finds no bot.
        await server.wait_until_connected(60)
        yield process
    finally:
        # SIGABRT: the faulthandler dumps every thread's stack into the log.
        await stop(process, log, "the bot", abort=signal.SIGABRT)


async def stop(process: asyncio.subprocess.Process, log: Path, what: str, *, abort: int = signal.SIGKILL) -> None:
    """Stop a process with SIGTERM as its operator would; one still there after 30 s is aborted and fails the test."""
    if process.returncode is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(30):
            await process.wait()
    except TimeoutError:
        process.send_signal(abort)
        await process.wait()
        raise AssertionError(f"{what} did not stop on SIGTERM:\n{log.read_text()[-6000:]}") from None


MANAGE_GUILD = 1 << 5


def attachment_jobs(server: FakeDiscord) -> dict[int, int]:
    """Count, per job, the messages in the channel carrying its images."""
    counts: dict[int, int] = {}
    for message in server.messages(server.channel_id):
        jobs = {int(attachment.filename.split("_")[1]) for attachment in message.attachments}
        for job_id in jobs:
            counts[job_id] = counts.get(job_id, 0) + 1
    return counts


async def status(server: FakeDiscord, interaction: FakeInteraction, text: str) -> Message:
    return await server.wait_for_message(lambda m: m.interaction_id == interaction.id and text in m.content, 60)


async def logged(log: Path, text: str, within: float = 10) -> None:
    """Wait until the bot's log says ``text``."""
    for _ in range(int(within / 0.05)):
        if text in log.read_text():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the bot never logged {text!r}:\n{log.read_text()[-3000:]}")


def job_of(message: Message) -> int:
    return int(message.custom_ids[0].rsplit(":", 1)[1])  # the Cancel button names the job


async def test_sigterm_finishes_the_batch_in_hand_and_old_buttons_work_after_each_restart(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    database, config, log = tmp_path / "sygil.db", tmp_path / "config.toml", tmp_path / "bot.log"
    holds = Holds(tmp_path / "holds")
    async with FakeDiscord() as server:
        other = server.add_user("other")
        write_config(config, server, tiny_model_dir, database, extra="[queue]\nshutdown_grace = 20")
        async with bot_process(config, server, log, holds=holds) as process:
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

            # The batch in hand fits in the grace: it is finished and posted; the job behind it waits.
            slow = await server.slash("imagine", {"prompt": f"species:whale, {holds.word('whale')}"})
            await holds.wait("whale")
            await status(server, slow, "Rendering")
            waiting = await server.slash("imagine", {"prompt": "species:cat"}, user_id=other)
            await status(server, waiting, "Queued")
            stopped_at = time.monotonic()
            process.send_signal(signal.SIGTERM)
            await logged(log, "Shutting down")
            late = await server.slash("imagine", {"prompt": "species:dog"}, user_id=other)
            assert "restarting" in (await late.wait_response())["data"]["content"] and late.ephemeral
            holds.release("whale")
            assert await process.wait() == 0
            assert time.monotonic() - stopped_at < 20, "it exits once the batch is posted, not at the end of the grace"
        finished = server.message((await status(server, slow, "species:whale")).id)
        assert finished.attachments and not server.message((await status(server, waiting, "Queued")).id).attachments

        # After a restart: the waiting job is delivered, and the first message's buttons still work. A batch longer
        # than the grace is stopped, and runs again after the next restart.
        write_config(config, server, tiny_model_dir, database, extra="[queue]\nshutdown_grace = 2")
        async with bot_process(config, server, log, holds=holds) as process:
            await server.wait_for_message(lambda m: m.interaction_id == waiting.id and bool(m.attachments), 120)
            reroll = await server.click(message.id, f"imagine:reroll:{job_id}:0")
            rerolled = await remix_result(server, reroll, within=120)
            assert "Reroll of image 1" in rerolled.content
            assert rerolled.reference is not None and rerolled.reference["message_id"] == str(message.id)
            vote = await server.click(message.id, f"imagine:vote:{job_id}:1:down")
            assert (await vote.wait_response())["type"] == 7
            await server.wait_for_message(lambda m: m.interaction_id == vote.id and m.ephemeral)

            longer = await server.slash("imagine", {"prompt": f"species:whale, {holds.word('longer')}"})
            await holds.wait("longer")  # never released while this bot runs: longer than any grace
            await status(server, longer, "Rendering")
            stopped_at = time.monotonic()
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
            assert time.monotonic() - stopped_at < 2 + 3  # the grace, and the interpreter's own exit
        assert not server.message((await status(server, longer, "Rendering")).id).attachments

        holds.release("longer")
        async with bot_process(config, server, log, holds=holds):
            await server.wait_for_message(lambda m: m.interaction_id == longer.id and bool(m.attachments), 120)
        assert attachment_jobs(server) == dict.fromkeys(attachment_jobs(server), 1)
        assert server.violations == []

    async with await Database.open(database) as db:
        first = await db.vote_tally(job_id=job_id, index=0)
        second = await db.vote_tally(job_id=job_id, index=1)
    assert (first.up, first.down, second.up, second.down) == (1, 0, 0, 1)
    assert "Traceback" not in log.read_text()


async def test_kill_9_loses_nothing_and_delivers_every_job_once(tiny_model_dir: Path, tmp_path: Path) -> None:
    database, config, log = tmp_path / "sygil.db", tmp_path / "config.toml", tmp_path / "bot.log"
    holds = Holds(tmp_path / "holds")
    async with FakeDiscord() as server:
        admin = server.add_user("admin", roles=[server.add_role("Admins", MANAGE_GUILD)])
        painter, sculptor, spammer = (server.add_user(name) for name in ("painter", "sculptor", "spammer"))
        write_config(config, server, tiny_model_dir, database)

        async with bot_process(config, server, log, holds=holds) as process:
            first = await server.slash("imagine", {"prompt": "species:seal"}, user_id=painter)
            source = await server.wait_for_message(lambda m: m.interaction_id == first.id and bool(m.attachments), 60)
            source_job = int(source.attachments[0].filename.split("_")[1])
            vote = await server.click(source.id, f"imagine:vote:{source_job}:0:up", user_id=sculptor)
            await server.wait_for_message(lambda m: m.interaction_id == vote.id and m.ephemeral)
            for command, options in (
                ("mod limits set", {"user": painter, "images_per_hour": 40}),
                ("mod ban", {"user": spammer, "reason": "spam"}),
                ("mod blocklist add", {"term": "gloom"}),
            ):
                done = await server.slash(command, options, user_id=admin)
                assert (await done.wait_response())["type"] == 4

            # One job rendering, a variation and another job waiting behind it.
            slow = await server.slash("imagine", {"prompt": f"species:whale, {holds.word('whale')}"}, user_id=sculptor)
            await holds.wait("whale")
            rendering = await status(server, slow, "Rendering")
            variation = await server.click(source.id, f"imagine:subtle:{source_job}:0", user_id=painter)
            upscale = await server.click(source.id, f"imagine:upscale:{source_job}:0", user_id=painter)
            cat = await server.slash("imagine", {"prompt": "species:cat"}, user_id=admin)
            accepted = [
                rendering,
                *[await status(server, remix, "Queued") for remix in (variation, upscale)],
                await status(server, cat, "Queued"),
            ]
            accepted_jobs = [job_of(message) for message in accepted]
            # And one killed the moment Discord shows it is accepted: the job was stored before that.
            last = await server.slash("imagine", {"prompt": "species:last moment"}, user_id=sculptor)
            assert (await last.wait_response())["type"] == 5
            process.kill()
            await process.wait()
        assert process.returncode == -signal.SIGKILL
        delivered_before = attachment_jobs(server)

        holds.release("whale")
        async with bot_process(config, server, log, holds=holds):
            for interaction in (slow, cat):
                await server.wait_for_message(
                    lambda m, i=interaction: m.interaction_id == i.id and bool(m.attachments), 120
                )
            varied = await remix_result(server, variation, within=120)
            assert varied.reference is not None and varied.reference["message_id"] == str(source.id)
            upscaled = await remix_result(server, upscale, within=120)
            assert upscaled.reference is not None and upscaled.reference["message_id"] == str(source.id)
            assert Image.open(io.BytesIO(upscaled.attachments[0].data)).size == (128, 128)
            # In its thinking message, or in the channel if the bot died before learning that message's id.
            final = await server.wait_for_message(lambda m: "last moment" in m.content and bool(m.attachments), 120)
            last_job = int(final.attachments[0].filename.split("_")[1])
            refused = await server.slash("imagine", {"prompt": "x"}, user_id=spammer)
            assert "banned" in (await refused.wait_response())["data"]["content"]
            limits = await server.slash("mod limits show", {"user": painter}, user_id=admin)
            assert "**40** (set for" in (await limits.wait_response())["data"]["content"]
            await all_delivered(database)

        counts = attachment_jobs(server)
        assert delivered_before == {source_job: 1}
        assert counts == {source_job: 1, **dict.fromkeys([*accepted_jobs, last_job], 1)}
        assert "Subtle variation (strength 0.35) of image 1" in varied.content
        assert f"Upscale ×2 of image 1 from job {source_job}" in upscaled.content
        assert server.violations == []

    async with await Database.open(database) as db:
        assert await db.unfinished_jobs() == []
        assert (await db.vote_tally(job_id=source_job, index=0)).up == 1
        actions = [entry.action for entry in await db.audit_log(guild_id=server.guild_id, count=10)]
        assert actions == ["blocklist add", "ban", "limits set"]
    assert "Traceback" not in log.read_text()


async def test_a_burst_of_200_is_answered_in_time_with_private_refusals(tiny_model_dir: Path, tmp_path: Path) -> None:
    database = tmp_path / "sygil.db"
    config = tmp_path / "config.toml"
    log = tmp_path / "bot.log"
    async with FakeDiscord() as server:
        users = [server.add_user(f"user{i}") for i in range(4)]
        limits = "[queue]\nmax_queue = 200\nmax_per_user = 50\nimages_per_hour = 5"
        write_config(config, server, tiny_model_dir, database, extra=limits)
        async with bot_process(config, server, log):
            interactions = [
                await server.slash("imagine", {"prompt": f"species:seal, {n}"}, user_id=users[n % 4])
                for n in range(200)
            ]
            responses = await asyncio.gather(*(interaction.wait_response(10) for interaction in interactions))
            delays = [interaction.response_delay or 99.0 for interaction in interactions]
            assert max(delays) < 3, sorted(delays)[-5:]
            accepted = [i for i, r in zip(interactions, responses, strict=True) if r["type"] == 5]
            assert len(accepted) == 20  # 5 images an hour for each of the 4 users
            for interaction, response in zip(interactions, responses, strict=True):
                if response["type"] != 5:
                    assert response["type"] == 4 and interaction.ephemeral
                    assert "of your 5 images per hour" in response["data"]["content"]
            for interaction in accepted:
                await server.wait_for_message(
                    lambda m, i=interaction: m.interaction_id == i.id and bool(m.attachments), 120
                )
        public = server.messages(server.channel_id)
        assert len(public) == 20 and all(message.attachments for message in public)
        assert server.violations == []


async def test_two_workers_share_the_queue_and_a_killed_one_is_replaced_without_losing_a_job(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    database, config, log = tmp_path / "sygil.db", tmp_path / "config.toml", tmp_path / "bot.log"
    holds = Holds(tmp_path / "holds")
    async with FakeDiscord() as server:
        users = [server.add_user(f"user{i}") for i in range(8)]
        extra = "[queue]\nmax_batch = 4"
        write_config(config, server, tiny_model_dir, database, extra=extra, devices='["cpu", "cpu"]')
        async with bot_process(config, server, log, holds=holds) as process:
            first_pid = _worker_pid(log.read_text(), "0:cpu")
            other_pid = _worker_pid(log.read_text(), "1:cpu")
            interactions = [
                await server.slash("imagine", {"prompt": f"species:seal, {n} {holds.word('both')}"}, user_id=users[n])
                for n in range(8)
            ]
            # Eight users' jobs make two batches of four, one on each worker, both held mid-render.
            held = await holds.wait("both", count=2)
            assert {entry.pid for entry in held} == {first_pid, other_pid}
            os.kill(first_pid, signal.SIGKILL)
            await logged(log, "died with exit code -9")
            holds.release("both")
            for interaction in interactions:
                await server.wait_for_message(
                    lambda m, i=interaction: m.interaction_id == i.id and bool(m.attachments), 180
                )
            # The bot itself lived on, with a new worker beside the one that was never touched.
            assert process.returncode is None
            await until(lambda: _worker_pid(log.read_text(), "0:cpu", last=True) != first_pid, 120, "a new worker")
            text = log.read_text()
            assert _worker_pid(text, "0:cpu", last=True) not in (first_pid, other_pid)
            assert _worker_pid(text, "1:cpu", last=True) == other_pid
            await all_delivered(database)
        counts = attachment_jobs(server)
        assert len(counts) == 8 and set(counts.values()) == {1}, counts
        assert server.violations == []
    assert "Traceback" not in log.read_text()


async def all_delivered(database: Path, within: float = 30) -> None:
    """Wait until the bot's database holds no unfinished job: every accepted job was posted and recorded."""
    async with await Database.open(database) as db:
        await until(lambda: _none_unfinished(db), within, "every job delivered")


async def _none_unfinished(db: Database) -> bool:
    return not await db.unfinished_jobs()


def _worker_pid(text: str, name: str, *, last: bool = False) -> int:
    """Return the pid the bot logged for its CPU worker of that name (the first one, or the latest)."""
    marker = f"CPU worker {name} ready: pid "
    pids = [int(line.split(marker)[1].split()[0]) for line in text.splitlines() if marker in line]
    assert pids, f"no worker {name} in the log:\n{text[-3000:]}"
    return pids[-1] if last else pids[0]
