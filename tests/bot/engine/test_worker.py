"""The GPU worker process: rendering in its own process, restarts after a kill, out-of-memory splits, two workers."""

from __future__ import annotations

import asyncio
import io
import json
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bot.engine import Engine, EngineOptions, ImageSpec, Mode, RenderedImage, Settings
from bot.engine.process import WorkerProcess
from bot.engine.protocol import (
    Failed,
    FailureKind,
    Hello,
    Progress,
    RenderBatch,
    Rendered,
    Shutdown,
    StopBatch,
    WorkerSettings,
    decode,
    encode,
)
from bot.errors import ModelError, OutOfMemory
from bot.scheduler import Scheduler
from bot.scheduler.batches import Batch
from bot.scheduler.line import Ticket
from tests.holds import Holds
from tests.waiting import until

FAST = Settings(steps=3, width=64, height=64)


def _spec(prompt: str, seed: int, settings: Settings = FAST) -> ImageSpec:
    return ImageSpec(prompt=prompt, negative_prompt="", seed=seed, settings=settings)


def _pixels(image: RenderedImage) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image.png)).convert("RGB"), dtype=np.int16)


def _settings(model: Path, environ: Mapping[str, str] | None = None) -> WorkerSettings:
    options = EngineOptions(warmup_batches=(1,), warmup_sizes=((64, 64),))
    return WorkerSettings(model_id=str(model), device="cpu", threads=1, options=options, environ=dict(environ or {}))


@pytest.fixture
def holds(tmp_path: Path) -> Holds:
    return Holds(tmp_path / "holds")


@pytest.fixture
async def worker(tiny_model_dir: Path, holds: Holds) -> AsyncIterator[WorkerProcess]:
    async with WorkerProcess(_settings(tiny_model_dir, holds.environ)) as worker:
        yield worker


def _submit(scheduler: Scheduler, job_id: int, specs: list[ImageSpec]) -> Ticket:
    return scheduler.submit(job_id=job_id, user_id=job_id, guild_id=None, specs=specs)


def test_every_message_survives_the_trip_as_plain_data() -> None:
    init = ImageSpec("species:seal", "", 3, Settings(steps=4, mode=Mode.IMG2IMG, strength=0.5), init_image=b"png")
    messages = [
        RenderBatch(7, (_spec("species:seal", 1), init)),
        StopBatch(7),
        Shutdown(),
        Hello(12, "cuda:0", "NVIDIA H200", 1.5, {"compile": True}),
        Progress(7, 3, 25),
        Rendered(7, (RenderedImage(png=b"\x89PNG", seed=1, nsfw=True),), 0.25, 2**30),
        Failed(7, FailureKind.OUT_OF_MEMORY, "out of memory"),
    ]
    for message in messages:
        data = encode(message)
        assert all(isinstance(key, str) for key in data)
        assert decode(data) == message
    with pytest.raises(ValueError, match="unknown message type"):
        decode({"type": "explode"})


async def test_the_worker_renders_in_its_own_process_what_the_engine_renders(
    worker: WorkerProcess, engine: Engine
) -> None:
    assert worker.pid is not None and worker.pid != os.getpid()
    specs = [_spec("species:seal, beach", 7), _spec("studio:dc", 8)]
    async with Scheduler(workers=[worker], max_batch=4) as scheduler:
        images = await _submit(scheduler, 1, specs).result
    assert [image.seed for image in images] == [7, 8]
    for spec, image in zip(specs, images, strict=True):
        [here] = engine.render([spec])
        assert np.abs(_pixels(here) - _pixels(image)).max() <= 2
        assert json.loads(Image.open(io.BytesIO(image.png)).text["sygil"])["prompt"] == spec.prompt  # type: ignore[attr-defined]


async def test_a_worker_killed_mid_batch_is_replaced_and_its_jobs_render_once(
    worker: WorkerProcess, holds: Holds
) -> None:
    batches: list[Batch] = []
    async with Scheduler(workers=[worker], max_batch=2, on_batch=batches.append) as scheduler:
        specs = [_spec(f"species:fox {job} {holds.word('kill')}", job) for job in range(1, 5)]
        tickets = [_submit(scheduler, job, [spec]) for job, spec in enumerate(specs, 1)]
        first = worker.pid
        await holds.wait("kill")  # the first batch is on the "GPU", between two steps
        worker.kill()
        holds.release("kill")
        results = await asyncio.wait_for(asyncio.gather(*(ticket.result for ticket in tickets)), 120)
    assert worker.restarts == 1 and worker.pid not in (None, first)
    assert [images[0].seed for images in results] == [1, 2, 3, 4]
    # The killed batch went back to the front and rendered once on the new worker: no job twice, none lost.
    rendered = sorted(job for batch in batches for job in batch.job_ids)
    assert rendered == [1, 2, 3, 4]
    assert tickets[0].attempts == 1


async def test_a_pause_takes_back_the_batch_a_worker_holds_to_render_next(worker: WorkerProcess, holds: Holds) -> None:
    paused, other = 10, 20
    batches: list[Batch] = []
    async with Scheduler(workers=[worker], max_batch=1, on_batch=batches.append) as scheduler:
        first = scheduler.submit(job_id=1, user_id=1, guild_id=paused, specs=[_spec(f"a {holds.word('gpu')}", 1)])
        await holds.wait("gpu")  # on the GPU
        second = scheduler.submit(job_id=2, user_id=2, guild_id=paused, specs=[_spec("species:cat", 2)])
        await until(lambda: scheduler.next_up == [second], what="handed to the worker, to render next")
        scheduler.pause(paused)
        await until(lambda: not scheduler.next_up, what="the worker gives it back unstarted")
        assert [ticket.job_id for ticket in scheduler.waiting(paused)] == [2]
        third = scheduler.submit(job_id=3, user_id=3, guild_id=other, specs=[_spec("species:owl", 3)])
        holds.release("gpu")
        await asyncio.wait_for(asyncio.gather(first.result, third.result), 60)
        # The batch on the GPU finished, another server's job went past, and the paused one waits in its place.
        assert [batch.job_ids for batch in batches] == [(1,), (3,)]
        assert not second.result.done() and second.attempts == 0
        scheduler.resume(paused)
        await asyncio.wait_for(second.result, 60)
    assert [batch.job_ids for batch in batches] == [(1,), (3,), (2,)]


async def test_out_of_memory_in_the_worker_splits_batches_and_one_bad_job_fails_alone(
    tiny_model_dir: Path,
) -> None:
    environ = {"SYGIL_TEST_OOM_ABOVE": "2", "SYGIL_TEST_OOM_PROMPT": "gigantic"}
    batches: list[Batch] = []
    async with (
        WorkerProcess(_settings(tiny_model_dir, environ)) as worker,
        Scheduler(workers=[worker], max_batch=8, on_batch=batches.append) as scheduler,
    ):
        pid = worker.pid
        tickets = [_submit(scheduler, job, [_spec(f"species:seal {job}", job)]) for job in range(1, 6)]
        doomed = _submit(scheduler, 6, [_spec("a gigantic whale", 6)])
        results = await asyncio.wait_for(asyncio.gather(*(ticket.result for ticket in tickets)), 120)
        with pytest.raises(OutOfMemory, match="even alone"):
            await doomed.result
        assert [images[0].seed for images in results] == [1, 2, 3, 4, 5]
        assert max(batch.images for batch in batches) <= 2
        # The worker lived through it and serves the next job.
        after = await _submit(scheduler, 7, [_spec("species:cat", 7)]).result
        assert len(after) == 1 and worker.pid == pid and worker.restarts == 0


async def test_two_workers_share_the_queue_and_no_batch_goes_to_both(tiny_model_dir: Path, holds: Holds) -> None:
    batches: list[Batch] = []
    async with (
        WorkerProcess(_settings(tiny_model_dir, holds.environ), name="cpu-a") as first,
        WorkerProcess(_settings(tiny_model_dir, holds.environ), name="cpu-b") as second,
        Scheduler(workers=[first, second], max_batch=2, on_batch=batches.append) as scheduler,
    ):
        assert first.pid != second.pid
        specs = [_spec(f"species:owl {job} {holds.word('owl')}", job) for job in range(1, 11)]
        tickets = [_submit(scheduler, job, [spec]) for job, spec in enumerate(specs, 1)]
        # Each worker takes two batches at most (one on the GPU, one prepared), so both hold one mid-render.
        held = await holds.wait("owl", count=2)
        assert {entry.pid for entry in held} == {first.pid, second.pid}
        holds.release("owl")
        results = await asyncio.wait_for(asyncio.gather(*(ticket.result for ticket in tickets)), 180)
    assert [images[0].seed for images in results] == list(range(1, 11))
    rendered = [job for batch in batches for job in batch.job_ids]
    assert sorted(rendered) == list(range(1, 11)), "each job in exactly one batch"
    assert {batch.worker for batch in batches} == {"cpu-a", "cpu-b"}


async def test_a_model_that_cannot_load_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        async with WorkerProcess(_settings(tmp_path / "nowhere")):
            pass
