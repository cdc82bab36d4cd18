from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from bot.engine.executor import Call, Progress, ThreadWorker, WorkerLost
from bot.engine.types import ImageSpec, RenderedImage, Settings
from bot.errors import JobCancelled, OutOfMemory, QueueFull, RenderFailed
from bot.scheduler import MAX_ATTEMPTS, Scheduler
from bot.scheduler.batches import Batch
from tests.waiting import until

GUILD = 10
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
        self.memory: int | None = None  # images that fit on the GPU at once; more raise OutOfMemory
        self.too_big = ""  # a prompt that never fits

    def __call__(self, specs: Sequence[ImageSpec], progress: Progress | None = None, /) -> list[RenderedImage]:
        self.gate.wait(5)
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(specs))
        if self.fail:
            raise RuntimeError("GPU on fire")
        if (self.memory is not None and len(specs) > self.memory) or any(self.too_big == s.prompt for s in specs):
            raise OutOfMemory(f"The GPU ran out of memory rendering {len(specs)} images.")
        for step in range(1, 5):
            if progress:
                progress(step, 4)
        return [RenderedImage(png=f"{spec.prompt}|{spec.seed}".encode(), seed=spec.seed) for spec in specs]


def specs(prompt: str, count: int = 1, settings: Settings = SMALL, seed: int = 1) -> list[ImageSpec]:
    return [ImageSpec(prompt=prompt, negative_prompt="", seed=seed + i, settings=settings) for i in range(count)]


async def test_results_come_back_per_job_in_order_on_one_gpu_thread() -> None:
    render = FakeRender()
    async with Scheduler(render, max_batch=8) as scheduler:
        ticket = scheduler.submit(job_id=1, user_id=1, guild_id=GUILD, specs=specs("seal", 3, seed=10))
        images = await ticket.result
    assert [image.png for image in images] == [b"seal|10", b"seal|11", b"seal|12"]
    assert ticket.started.is_set()
    assert len(render.threads) == 1 and next(iter(render.threads)).startswith("gpu")


async def test_compatible_jobs_from_different_users_share_one_batch() -> None:
    render = FakeRender()
    render.gate.clear()
    batches: list[Batch] = []
    async with Scheduler(render, max_batch=4, on_batch=batches.append) as scheduler:
        first = scheduler.submit(job_id=1, user_id=1, guild_id=GUILD, specs=specs("a"))
        await first.started.wait()  # job 1 holds the GPU while the others queue up
        others = [
            scheduler.submit(job_id=2, user_id=2, guild_id=GUILD, specs=specs("b", 2)),
            scheduler.submit(job_id=3, user_id=3, guild_id=GUILD, specs=specs("c", settings=LARGE)),
            scheduler.submit(job_id=4, user_id=4, guild_id=GUILD, specs=specs("d")),
            scheduler.submit(job_id=5, user_id=5, guild_id=GUILD, specs=specs("e", 2)),
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
    async with Scheduler(render, max_batch=1, on_batch=batches.append) as scheduler:
        blocker = scheduler.submit(job_id=100, user_id=9, guild_id=GUILD, specs=specs("x"))
        await blocker.started.wait()
        tickets = [scheduler.submit(job_id=10 + i, user_id=1, guild_id=GUILD, specs=specs("a")) for i in range(3)]
        tickets.append(scheduler.submit(job_id=20, user_id=2, guild_id=GUILD, specs=specs("b")))
        tickets.append(scheduler.submit(job_id=30, user_id=3, guild_id=GUILD, specs=specs("c")))
        assert [scheduler.position(job_id) for job_id in (10, 20, 30, 11, 12)] == [1, 2, 3, 4, 5]
        assert scheduler.position(100) == 0
        assert scheduler.position(999) is None
        render.gate.set()
        await asyncio.gather(*(ticket.result for ticket in tickets))
    assert [batch.job_ids[0] for batch in batches] == [100, 10, 20, 30, 11, 12]


async def test_queue_limits_say_why() -> None:
    render = FakeRender()
    render.gate.clear()
    async with Scheduler(render, max_queue=3) as scheduler:
        running = submit(scheduler, 1, 1, specs("a"), max_queued=2)
        await running.started.wait()
        submit(scheduler, 2, 1, specs("a"), max_queued=2)
        with pytest.raises(QueueFull, match="You already have 2 jobs in the queue \\(your limit is 2\\)"):
            scheduler.reserve(user_id=1, guild_id=GUILD, max_queued=2)
        # The limit is per server: the same user elsewhere has room.
        elsewhere = scheduler.reserve(user_id=1, guild_id=GUILD + 1, max_queued=2)
        scheduler.release(elsewhere)
        submit(scheduler, 4, 2, specs("b"), max_queued=2)
        # Places taken for jobs being stored count too.
        place = scheduler.reserve(user_id=3, guild_id=GUILD, max_queued=2)
        with pytest.raises(QueueFull, match="The queue is full"):
            scheduler.reserve(user_id=4, guild_id=GUILD, max_queued=2)
        scheduler.release(place)
        scheduler.release(place)  # twice is harmless
        with pytest.raises(QueueFull, match="0 jobs at once"):
            scheduler.reserve(user_id=5, guild_id=GUILD, max_queued=0)
        assert scheduler.reserve(user_id=4, guild_id=GUILD, max_queued=2).taken
        # A job restored after a restart goes in whatever the limits say.
        restored = scheduler.submit(job_id=6, user_id=3, guild_id=GUILD, specs=specs("c"))
        render.gate.set()
        assert len(await restored.result) == 1


def submit(scheduler: Scheduler, job_id: int, user_id: int, images: list[ImageSpec], *, max_queued: int = 3):
    place = scheduler.reserve(user_id=user_id, guild_id=GUILD, max_queued=max_queued)
    return scheduler.submit(job_id=job_id, user_id=user_id, guild_id=GUILD, specs=images, place=place)


async def test_a_failed_batch_fails_its_jobs_and_the_worker_goes_on() -> None:
    render = FakeRender()
    async with Scheduler(render) as scheduler:
        render.fail = True
        bad = scheduler.submit(job_id=1, user_id=1, guild_id=GUILD, specs=specs("a"))
        with pytest.raises(RuntimeError, match="GPU on fire"):
            await bad.result
        render.fail = False
        good = scheduler.submit(job_id=2, user_id=1, guild_id=GUILD, specs=specs("b"))
        assert len(await good.result) == 1


async def test_progress_reaches_the_ticket() -> None:
    render = FakeRender()
    async with Scheduler(render) as scheduler:
        ticket = scheduler.submit(job_id=1, user_id=1, guild_id=GUILD, specs=specs("a"))
        await ticket.result
        await asyncio.sleep(0)  # progress is handed over with call_soon_threadsafe
    assert (ticket.step, ticket.total_steps) == (4, 4)


async def test_cancel_and_close() -> None:
    render = FakeRender()
    render.gate.clear()
    scheduler = Scheduler(render)
    scheduler.start()
    first = scheduler.submit(job_id=1, user_id=1, guild_id=GUILD, specs=specs("a"))
    await first.started.wait()
    second = scheduler.submit(job_id=2, user_id=2, guild_id=GUILD, specs=specs("b"))
    third = scheduler.submit(job_id=3, user_id=3, guild_id=GUILD, specs=specs("c"))
    assert scheduler.cancel(2, "no thanks") is False
    with pytest.raises(JobCancelled, match="no thanks"):
        await second.result
    assert scheduler.cancel(2, "again") is None
    assert scheduler.position(2) is None and scheduler.position(3) == 1
    # Closing waits for the batch on the GPU thread, then cancels what was left.
    threading.Timer(0.2, render.gate.set).start()
    await scheduler.close()
    assert third.result.cancelled() and first.result.cancelled()
    assert [[spec.prompt for spec in batch] for batch in render.batches] == [["a"]]


class SlowRender(FakeRender):
    """Takes many steps, so a test can act while a batch renders."""

    def __init__(self) -> None:
        super().__init__()
        self.steps_run = 0
        self.step_gate = threading.Semaphore(0)

    def __call__(self, specs: Sequence[ImageSpec], progress: Progress | None = None, /) -> list[RenderedImage]:
        self.batches.append(list(specs))
        for step in range(1, 101):
            self.step_gate.acquire(timeout=5)
            self.steps_run = step
            if progress:
                progress(step, 100)
        return [RenderedImage(png=spec.prompt.encode(), seed=spec.seed) for spec in specs]


async def test_cancelling_every_job_of_a_running_batch_stops_it() -> None:
    render = SlowRender()
    async with Scheduler(render, max_batch=4) as scheduler:
        blocker = scheduler.submit(job_id=1, user_id=1, guild_id=GUILD, specs=specs("a"))
        await blocker.started.wait()
        assert scheduler.cancel(1, "stop") is True
        for _ in range(3):
            render.step_gate.release()
        with pytest.raises(JobCancelled):
            await blocker.result
        # The GPU is free again long before the batch's 100 steps: the next job renders.
        follower = scheduler.submit(job_id=2, user_id=2, guild_id=GUILD, specs=specs("b"))
        for _ in range(100):
            render.step_gate.release()
        assert [image.png for image in await follower.result] == [b"b"]
    assert len(render.batches) == 2


async def test_a_cancelled_job_in_a_shared_batch_is_dropped_and_the_others_delivered() -> None:
    render = SlowRender()
    async with Scheduler(render, max_batch=4) as scheduler:
        blocker = scheduler.submit(job_id=1, user_id=1, guild_id=GUILD, specs=specs("a"))
        await blocker.started.wait()
        for _ in range(100):
            render.step_gate.release()
        await blocker.result
        one = scheduler.submit(job_id=2, user_id=2, guild_id=GUILD, specs=specs("b"))
        two = scheduler.submit(job_id=3, user_id=3, guild_id=GUILD, specs=specs("c"))
        await one.started.wait()
        assert two.started.is_set()  # one batch
        assert scheduler.cancel(2, "gone") is True
        for _ in range(100):
            render.step_gate.release()
        assert [image.png for image in await two.result] == [b"c"]
        with pytest.raises(JobCancelled):
            await one.result
    assert render.steps_run == 100


async def test_a_paused_server_starts_nothing_and_resumes_in_order() -> None:
    render = FakeRender()
    batches: list[Batch] = []
    async with Scheduler(render, max_batch=1, on_batch=batches.append) as scheduler:
        scheduler.pause(GUILD)
        paused = [scheduler.submit(job_id=i, user_id=i % 2, guild_id=GUILD, specs=specs("p")) for i in range(1, 5)]
        other = scheduler.submit(job_id=9, user_id=5, guild_id=GUILD + 1, specs=specs("o"))
        await other.result
        await asyncio.sleep(0.05)
        assert not any(ticket.started.is_set() for ticket in paused)
        assert [ticket.job_id for ticket in scheduler.waiting(GUILD)] == [1, 2, 3, 4]
        scheduler.resume(GUILD)
        await asyncio.gather(*(ticket.result for ticket in paused))
    assert [batch.job_ids[0] for batch in batches] == [9, 1, 2, 3, 4]


async def test_draining_starts_no_new_batch_and_stop_rendering_leaves_jobs_unfinished() -> None:
    render = SlowRender()
    scheduler = Scheduler(render)
    scheduler.start()
    running = scheduler.submit(job_id=1, user_id=1, guild_id=GUILD, specs=specs("a"))
    waiting = scheduler.submit(job_id=2, user_id=2, guild_id=GUILD, specs=specs("b", settings=LARGE))
    await running.started.wait()
    scheduler.drain()
    scheduler.stop_rendering()
    render.step_gate.release()
    await asyncio.wait_for(scheduler.wait_idle(), 5)
    # Stopped, not failed: the job stays unfinished in the database, to run after the restart.
    assert running.result.cancelled()
    await asyncio.sleep(0.05)
    assert not waiting.started.is_set()
    await scheduler.close()
    assert waiting.result.cancelled()


async def test_estimates_come_from_measured_speed() -> None:
    render = FakeRender()
    render.gate.clear()
    async with Scheduler(render, max_batch=4) as scheduler:
        first = scheduler.submit(job_id=1, user_id=1, guild_id=GUILD, specs=specs("a"))
        assert scheduler.eta(1) is None  # nothing measured yet
        render.gate.set()
        await first.result
        render.gate.clear()
        blocker = scheduler.submit(job_id=2, user_id=1, guild_id=GUILD, specs=specs("b"))
        await blocker.started.wait()
        small = scheduler.submit(job_id=3, user_id=2, guild_id=GUILD, specs=specs("c"))
        large = scheduler.submit(job_id=4, user_id=3, guild_id=GUILD, specs=specs("d", 4, settings=LARGE))
        small_eta, large_eta = scheduler.eta(3), scheduler.eta(4)
        assert small_eta is not None and large_eta is not None and large_eta > small_eta
        # A user at their limit is told when a place should free up.
        with pytest.raises(QueueFull, match=r"One should be done in about \d+ s"):
            scheduler.reserve(user_id=2, guild_id=GUILD, max_queued=1)
        render.gate.set()
        await asyncio.gather(blocker.result, small.result, large.result)


async def test_bad_jobs_are_refused() -> None:
    async with Scheduler(FakeRender(), max_batch=2) as scheduler:
        with pytest.raises(ValueError, match="does not fit"):
            scheduler.submit(job_id=1, user_id=1, guild_id=GUILD, specs=specs("a", 3))
        with pytest.raises(ValueError, match="share their settings"):
            scheduler.submit(job_id=1, user_id=1, guild_id=GUILD, specs=specs("a") + specs("b", settings=LARGE))


async def test_out_of_memory_splits_the_batch_until_every_job_fits() -> None:
    render = FakeRender()
    render.gate.clear()
    render.memory = 2
    batches: list[Batch] = []
    async with Scheduler(render, max_batch=8, on_batch=batches.append) as scheduler:
        blocker = scheduler.submit(job_id=1, user_id=1, guild_id=GUILD, specs=specs("first"))
        await blocker.started.wait()
        tickets = [
            scheduler.submit(job_id=2, user_id=2, guild_id=GUILD, specs=specs("two", 2)),
            scheduler.submit(job_id=3, user_id=3, guild_id=GUILD, specs=specs("one")),
            scheduler.submit(job_id=4, user_id=4, guild_id=GUILD, specs=specs("four", 4, seed=20)),
        ]
        render.gate.set()
        results = await asyncio.gather(blocker.result, *(ticket.result for ticket in tickets))
    assert [[image.png for image in images] for images in results] == [
        [b"first|1"],
        [b"two|1", b"two|2"],
        [b"one|1"],
        [b"four|20", b"four|21", b"four|22", b"four|23"],
    ]
    # 7 images failed together, then split at the job nearest the middle, down to what fits.
    assert [len(batch) for batch in render.batches] == [1, 7, 3, 2, 1, 4, 2, 2]
    assert [batch.images for batch in batches] == [1, 2, 1, 2, 2]


async def test_an_image_too_big_even_alone_fails_only_its_own_job() -> None:
    render = FakeRender()
    render.gate.clear()
    render.too_big = "huge"
    async with Scheduler(render, max_batch=8) as scheduler:
        blocker = scheduler.submit(job_id=1, user_id=1, guild_id=GUILD, specs=specs("first"))
        await blocker.started.wait()
        small = scheduler.submit(job_id=2, user_id=2, guild_id=GUILD, specs=specs("small"))
        huge = scheduler.submit(job_id=3, user_id=3, guild_id=GUILD, specs=specs("huge"))
        other = scheduler.submit(job_id=4, user_id=4, guild_id=GUILD, specs=specs("other", 2))
        render.gate.set()
        assert [image.png for image in await small.result] == [b"small|1"]
        assert len(await other.result) == 2
        with pytest.raises(OutOfMemory, match="even alone: try a smaller size than 64x64"):
            await huge.result
        # The queue goes on.
        later = scheduler.submit(job_id=5, user_id=3, guild_id=GUILD, specs=specs("later"))
        assert [image.png for image in await later.result] == [b"later|1"]


async def test_two_workers_share_the_queue_and_never_render_a_job_twice() -> None:
    renders = [FakeRender(), FakeRender()]
    for render in renders:
        render.gate.clear()
    workers = [ThreadWorker(render, name=f"gpu{index}") for index, render in enumerate(renders)]
    batches: list[Batch] = []
    async with Scheduler(workers=workers, max_batch=2, on_batch=batches.append) as scheduler:
        tickets = [
            scheduler.submit(job_id=job, user_id=job, guild_id=GUILD, specs=specs(f"p{job}", seed=job))
            for job in range(12)
        ]
        # Each worker holds one batch of two; the rest wait in line.
        await until(lambda: len(scheduler.running) == 4, within=10, what="both workers hold a batch")
        assert scheduler.pending == 8
        for render in renders:
            render.gate.set()
        results = await asyncio.gather(*(ticket.result for ticket in tickets))
    for worker in workers:
        await worker.close()
    assert [images[0].png for images in results] == [f"p{job}|{job}".encode() for job in range(12)]
    rendered = sorted(spec.seed for render in renders for batch in render.batches for spec in batch)
    assert rendered == list(range(12)), "every job rendered exactly once"
    assert {batch.worker for batch in batches} == {"gpu0", "gpu1"}
    # Both took part (which takes the line's later batches is up to the threads, so no count is asserted).
    assert all(render.batches for render in renders)


async def test_estimates_are_kept_per_settings_and_shared_by_the_workers() -> None:
    renders = [FakeRender(), FakeRender()]
    workers = [ThreadWorker(render, name=f"gpu{index}") for index, render in enumerate(renders)]
    async with Scheduler(workers=workers, max_batch=1) as scheduler:
        await scheduler.submit(job_id=1, user_id=1, guild_id=GUILD, specs=specs("a")).result
        for render in renders:
            render.gate.clear()
        held = [scheduler.submit(job_id=2 + i, user_id=2 + i, guild_id=GUILD, specs=specs("b")) for i in range(2)]
        for ticket in held:
            await ticket.started.wait()
        line = [scheduler.submit(job_id=10 + i, user_id=10 + i, guild_id=GUILD, specs=specs("c")) for i in range(4)]
        etas = [eta for ticket in line if (eta := scheduler.eta(ticket.job_id)) is not None]
        assert len(etas) == 4
        # Two workers take the line two at a time: each place later waits longer, the fourth about twice the second.
        assert etas == sorted(etas) and etas[3] > etas[1]
        for render in renders:
            render.gate.set()
        await asyncio.gather(*(ticket.result for ticket in [*held, *line]))
    for worker in workers:
        await worker.close()


class LosingWorker:
    """Starts each batch, then loses the first ones: a worker dying under it, or the link to remote workers."""

    depth = 1

    def __init__(self, losses: int, *, blameless: bool) -> None:
        self.name = "remote"
        self.losses = losses
        self.blameless = blameless
        self.facts = {"worker": "gpu-b", "revision": "r1"}

    async def ready(self) -> None:
        return

    async def render(self, call: Call) -> list[RenderedImage]:
        call.on_started()
        await asyncio.sleep(0)
        if self.losses:
            self.losses -= 1
            raise WorkerLost("gone", blameless=self.blameless)
        call.facts.update(self.facts)
        return [RenderedImage(png=spec.prompt.encode(), seed=spec.seed) for spec in call.specs]


async def test_a_blameless_loss_requeues_without_counting_an_attempt() -> None:
    worker = LosingWorker(MAX_ATTEMPTS + 2, blameless=True)
    batches: list[Batch] = []
    async with Scheduler(workers=[worker], on_batch=batches.append) as scheduler:
        ticket = scheduler.submit(job_id=1, user_id=1, guild_id=GUILD, specs=specs("a"))
        images = await ticket.result
    assert [image.png for image in images] == [b"a"]
    assert ticket.attempts == 0 and worker.losses == 0
    # The name of the remote worker that rendered it, not the pool's, goes in the record.
    assert [batch.worker for batch in batches] == ["gpu-b"]
    assert [(rendering.worker, rendering.revision) for rendering in ticket.renders] == [("gpu-b", "r1")]


async def test_a_job_on_the_gpu_each_time_its_worker_dies_is_given_up() -> None:
    worker = LosingWorker(MAX_ATTEMPTS, blameless=False)
    async with Scheduler(workers=[worker]) as scheduler:
        ticket = scheduler.submit(job_id=1, user_id=1, guild_id=GUILD, specs=specs("a"))
        with pytest.raises(RenderFailed, match=f"stopped the GPU worker {MAX_ATTEMPTS} times"):
            await ticket.result
