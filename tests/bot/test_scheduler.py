from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from bot.engine.types import ImageSpec, RenderedImage, Settings
from bot.errors import QueueFull
from bot.scheduler import Batch, Progress, Scheduler

SMALL = Settings(steps=4, width=64, height=64)
LARGE = Settings(steps=4, width=64, height=96)


class FakeRender:
    """Stands in for the GPU: records batches and their thread, and can be held to let a queue build up."""

    def __init__(self) -> None:
        self.batches: list[list[ImageSpec]] = []
        self.threads: set[str] = set()
        self.gate = threading.Event()
        self.gate.set()
        self.fail = False

    def __call__(self, specs: Sequence[ImageSpec], progress: Progress | None = None, /) -> list[RenderedImage]:
        self.gate.wait(5)
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(specs))
        if self.fail:
            raise RuntimeError("GPU on fire")
        for step in range(1, 5):
            if progress:
                progress(step, 4)
        return [RenderedImage(png=f"{spec.prompt}|{spec.seed}".encode(), seed=spec.seed) for spec in specs]


def specs(prompt: str, count: int = 1, settings: Settings = SMALL, seed: int = 1) -> list[ImageSpec]:
    return [ImageSpec(prompt=prompt, negative_prompt="", seed=seed + i, settings=settings) for i in range(count)]


async def test_results_come_back_per_job_in_order_on_one_gpu_thread() -> None:
    render = FakeRender()
    async with Scheduler(render, max_batch=8) as scheduler:
        ticket = scheduler.submit(job_id=1, user_id=1, specs=specs("seal", 3, seed=10))
        images = await ticket.result
    assert [image.png for image in images] == [b"seal|10", b"seal|11", b"seal|12"]
    assert ticket.started.is_set()
    assert len(render.threads) == 1 and next(iter(render.threads)).startswith("gpu")


async def test_compatible_jobs_from_different_users_share_one_batch() -> None:
    render = FakeRender()
    render.gate.clear()
    batches: list[Batch] = []
    async with Scheduler(render, max_batch=4, on_batch=batches.append) as scheduler:
        first = scheduler.submit(job_id=1, user_id=1, specs=specs("a"))
        await first.started.wait()  # job 1 holds the GPU while the others queue up
        others = [
            scheduler.submit(job_id=2, user_id=2, specs=specs("b", 2)),
            scheduler.submit(job_id=3, user_id=3, specs=specs("c", settings=LARGE)),
            scheduler.submit(job_id=4, user_id=4, specs=specs("d")),
            scheduler.submit(job_id=5, user_id=5, specs=specs("e", 2)),
        ]
        render.gate.set()
        await asyncio.gather(first.result, *(ticket.result for ticket in others))
    assert [batch.job_ids for batch in batches] == [(1,), (2, 4), (3,), (5,)]
    # b (2 images) + d (1) fill 3 of 4 places; e (2 more) would not fit, c has other settings.
    assert [len(batch) for batch in render.batches] == [1, 3, 1, 2]


async def test_users_take_turns() -> None:
    render = FakeRender()
    render.gate.clear()
    batches: list[Batch] = []
    async with Scheduler(render, max_batch=1, max_per_user=5, on_batch=batches.append) as scheduler:
        blocker = scheduler.submit(job_id=100, user_id=9, specs=specs("x"))
        await blocker.started.wait()
        tickets = [scheduler.submit(job_id=10 + i, user_id=1, specs=specs("a")) for i in range(3)]
        tickets.append(scheduler.submit(job_id=20, user_id=2, specs=specs("b")))
        tickets.append(scheduler.submit(job_id=30, user_id=3, specs=specs("c")))
        assert [scheduler.position(job_id) for job_id in (10, 20, 30, 11, 12)] == [1, 2, 3, 4, 5]
        assert scheduler.position(100) == 0
        assert scheduler.position(999) is None
        render.gate.set()
        await asyncio.gather(*(ticket.result for ticket in tickets))
    assert [batch.job_ids[0] for batch in batches] == [100, 10, 20, 30, 11, 12]


async def test_queue_limits_say_why() -> None:
    render = FakeRender()
    render.gate.clear()
    async with Scheduler(render, max_queue=2, max_per_user=2) as scheduler:
        running = scheduler.submit(job_id=1, user_id=1, specs=specs("a"))
        await running.started.wait()
        scheduler.submit(job_id=2, user_id=1, specs=specs("a"))
        with pytest.raises(QueueFull, match="You already have 2 jobs"):
            scheduler.submit(job_id=3, user_id=1, specs=specs("a"))
        scheduler.submit(job_id=4, user_id=2, specs=specs("b"))
        with pytest.raises(QueueFull, match="The queue is full"):
            scheduler.submit(job_id=5, user_id=3, specs=specs("c"))
        restored = scheduler.submit(job_id=6, user_id=3, specs=specs("c"), force=True)
        render.gate.set()
        assert len(await restored.result) == 1


async def test_a_failed_batch_fails_its_jobs_and_the_worker_goes_on() -> None:
    render = FakeRender()
    async with Scheduler(render) as scheduler:
        render.fail = True
        bad = scheduler.submit(job_id=1, user_id=1, specs=specs("a"))
        with pytest.raises(RuntimeError, match="GPU on fire"):
            await bad.result
        render.fail = False
        good = scheduler.submit(job_id=2, user_id=1, specs=specs("b"))
        assert len(await good.result) == 1


async def test_progress_reaches_the_ticket() -> None:
    render = FakeRender()
    async with Scheduler(render) as scheduler:
        ticket = scheduler.submit(job_id=1, user_id=1, specs=specs("a"))
        await ticket.result
        await asyncio.sleep(0)  # progress is handed over with call_soon_threadsafe
    assert (ticket.step, ticket.total_steps) == (4, 4)


async def test_cancel_and_close() -> None:
    render = FakeRender()
    render.gate.clear()
    scheduler = Scheduler(render)
    scheduler.start()
    first = scheduler.submit(job_id=1, user_id=1, specs=specs("a"))
    await first.started.wait()
    second = scheduler.submit(job_id=2, user_id=2, specs=specs("b"))
    third = scheduler.submit(job_id=3, user_id=3, specs=specs("c"))
    assert scheduler.cancel(2) and second.result.cancelled()
    assert not scheduler.cancel(2)
    # Closing waits for the batch on the GPU thread, then cancels what was left.
    threading.Timer(0.2, render.gate.set).start()
    await scheduler.close()
    assert third.result.cancelled() and first.result.cancelled()
    assert [[spec.prompt for spec in batch] for batch in render.batches] == [["a"]]


async def test_bad_jobs_are_refused() -> None:
    async with Scheduler(FakeRender(), max_batch=2) as scheduler:
        with pytest.raises(ValueError, match="does not fit"):
            scheduler.submit(job_id=1, user_id=1, specs=specs("a", 3))
        with pytest.raises(ValueError, match="share their settings"):
            scheduler.submit(job_id=1, user_id=1, specs=specs("a") + specs("b", settings=LARGE))
