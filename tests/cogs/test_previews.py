"""Live previews on the fake Discord: the status message shows the image forming while a worker process renders it."""

from __future__ import annotations

import asyncio
import io
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from PIL import Image

from bot.config import GenerationConfig, PreviewConfig
from bot.engine.process import WorkerProcess
from bot.engine.protocol import WorkerSettings
from bot.engine.types import EngineOptions
from cogs.imagine._text import PREVIEW_FILENAME
from tests.cogs.conftest import Harness, final_message, job_id_of, remix_result
from tests.fakediscord import FakeDiscord, Message, Revision
from tests.holds import Holds
from tests.waiting import until

INTERVAL = 0.3  # preview.min_interval: small, so the test is quick; only ever a lower bound on time
PREVIEW = PreviewConfig(decoder="taesd", every=5, min_interval=INTERVAL, max_side=64)
GENERATION = GenerationConfig(default_steps=25, max_steps=25, sizes=("64x64",), max_count=2)


@pytest.fixture
def holds(tmp_path: Path) -> Holds:
    return Holds(tmp_path / "holds")


@pytest.fixture
async def worker(tiny_model_dir: Path, holds: Holds) -> AsyncIterator[WorkerProcess]:
    """A worker process drawing frames with the tiny TAESD, holding a batch after its frames at steps 5 and 10."""
    options = PreviewConfig(
        decoder=PREVIEW.decoder,
        taesd=str(tiny_model_dir / "taesd"),
        every=PREVIEW.every,
        min_interval=PREVIEW.min_interval,
        max_side=PREVIEW.max_side,
    ).options()
    settings = WorkerSettings(
        model_id=str(tiny_model_dir),
        device="cpu",
        threads=1,
        options=EngineOptions(warmup_batches=(1,), warmup_sizes=((64, 64),), warmup_steps=1),
        preview=options,
        environ=holds.environ | {"SYGIL_TEST_HOLD_STEPS": "5,10"},
    )
    async with WorkerProcess(settings) as worker:
        yield worker


def _frames(message: Message) -> list[Revision]:
    return [revision for revision in message.history if PREVIEW_FILENAME in revision.filenames]


async def _frame_shown(message: Message, count: int) -> Revision:
    """Wait until the message has shown ``count`` frames; return the latest."""
    await until(lambda: len(_frames(message)) >= count, 30, f"{count} preview frames in message {message.id}")
    return _frames(message)[-1]


async def _let_go(holds: Holds, name: str) -> None:
    # At least the interval after the frame went out, so the worker's throttle lets the next one through.
    await asyncio.sleep(INTERVAL * 1.2)
    holds.release(name)


def _check_frame(revision: Revision, step: int) -> Image.Image:
    [attachment] = revision.attachments
    image = Image.open(io.BytesIO(attachment.data))
    assert image.format == "JPEG" and max(image.size) <= PREVIEW.max_side
    assert f"step {step}/25" in revision.content  # the frame comes with the step it shows
    return image


async def test_the_status_message_shows_the_image_forming_and_the_result_replaces_it(
    harness: Harness, worker: WorkerProcess, holds: Holds
) -> None:
    harness.worker, harness.preview, harness.generation = worker, PREVIEW, GENERATION
    server: FakeDiscord = harness.server
    async with harness.bot():
        interaction = await server.slash("imagine", {"prompt": f"species:seal {holds.word('watch')}"})
        await holds.wait("watch.5")  # the worker sent the frame of step 5 and waits
        status = await interaction.wait_message()
        first = _check_frame(await _frame_shown(status, 1), 5)
        await _let_go(holds, "watch.5")
        await holds.wait("watch.10")
        second = _check_frame(await _frame_shown(status, 2), 10)
        assert second.tobytes() != first.tobytes()  # the image changed between the frames
        await _let_go(holds, "watch.10")
        result = await final_message(server, interaction)
        assert result.id == status.id  # the result went into the status message, replacing the frame
        result_files = [a.filename for a in result.attachments]
        assert result_files == [f"sygil_{job_id_of(result)}_0.png"]
        [posted] = [i for i, revision in enumerate(status.history) if revision.filenames == result_files]
        # No frame after the result, and the status edits came at least the interval apart.
        assert all(PREVIEW_FILENAME not in revision.filenames for revision in status.history[posted:])
        edits = [revision.at for revision in status.history[:posted] if revision.edit]
        assert len(_frames(status)) >= 2
        assert all(later - earlier >= INTERVAL for earlier, later in itertools.pairwise(edits))

        # A reroll's private status shows its image forming too, and loses the frame when it points at the result.
        for name in ("watch.5", "watch.10"):
            for suffix in ("held", "release"):
                (holds.folder / f"{name}.{suffix}").unlink()
        reroll = await server.click(result.id, f"imagine:reroll:{job_id_of(result)}:0")
        await holds.wait("watch.5")
        private = await reroll.wait_message()
        assert private.ephemeral
        _check_frame(await _frame_shown(private, 1), 5)
        holds.release("watch.5")
        holds.release("watch.10")
        rerolled = await remix_result(server, reroll)
        assert [a.filename for a in rerolled.attachments] == [f"sygil_{job_id_of(rerolled)}_0.png"]
        assert private.content.startswith("➡️ Posted:") and private.attachments == []
