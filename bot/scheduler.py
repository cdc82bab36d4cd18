"""The queue in front of the GPU: fair order across users, compatible jobs batched into one call, one worker."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol, Self

from bot.engine.types import ImageSpec, RenderedImage, Settings
from bot.errors import QueueFull

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


class Render(Protocol):
    """The executor seam: a batch of plain specs in, PNGs out; runs on the one GPU thread."""

    def __call__(self, specs: Sequence[ImageSpec], progress: Progress | None = None, /) -> list[RenderedImage]: ...


@dataclass(frozen=True, slots=True)
class Batch:
    """What one GPU call rendered, for the log and the benchmarks."""

    job_ids: tuple[int, ...]
    images: int
    seconds: float


@dataclass(eq=False, slots=True)
class Ticket:
    """A queued job: await ``result`` for its images; ``started`` is set when the GPU takes it."""

    job_id: int
    user_id: int
    specs: tuple[ImageSpec, ...]
    result: asyncio.Future[list[RenderedImage]]
    started: asyncio.Event = field(default_factory=asyncio.Event)
    step: int = 0
    total_steps: int = 0

    @property
    def settings(self) -> Settings:
        return self.specs[0].settings


class Scheduler:
    """Serve jobs from many users in turn, rendering compatible ones together."""

    def __init__(
        self,
        render: Render,
        *,
        max_batch: int = 8,
        max_queue: int = 32,
        max_per_user: int = 3,
        on_batch: Callable[[Batch], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_per_user < 1:
            raise ValueError("max_batch, max_queue and max_per_user must be at least 1")
        self._render = render
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._max_per_user = max_per_user
        self._on_batch = on_batch
        # Users in turn order; each has a FIFO of tickets. The user served last moves to the back.
        self._waiting: collections.OrderedDict[int, collections.deque[Ticket]] = collections.OrderedDict()
        self._running: list[Ticket] = []
        self._wakeup = asyncio.Event()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._worker: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def start(self) -> None:
        if self._worker is not None:
            raise RuntimeError("scheduler already started")
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu")
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="gpu-scheduler")

    async def close(self) -> None:
        """Stop the worker and wait for the batch on the GPU; waiting jobs are cancelled (the database keeps them)."""
        unfinished = [*self._running, *self._iter_waiting()]
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        for ticket in unfinished:
            if not ticket.result.done():
                ticket.result.cancel()
        self._waiting.clear()
        self._running.clear()
        if self._executor is not None:
            # Let the batch in hand finish: a pipeline must never be driven by two threads (a restart in the same
            # process would otherwise start a second GPU thread on the same weights and scheduler state).
            await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
            self._executor = None

    # Queue

    def submit(self, *, job_id: int, user_id: int, specs: Sequence[ImageSpec], force: bool = False) -> Ticket:
        """Queue a job's images, or raise QueueFull; ``force`` skips the limits (jobs restored after a restart)."""
        if not specs:
            raise ValueError("a job needs at least one image")
        if len(specs) > self._max_batch:
            raise ValueError(f"a job of {len(specs)} images does not fit a batch of {self._max_batch}")
        if len({spec.settings for spec in specs}) != 1:
            raise ValueError("all images of one job must share their settings")
        if not force:
            self.check_room(user_id)
        loop = asyncio.get_running_loop()
        ticket = Ticket(job_id=job_id, user_id=user_id, specs=tuple(specs), result=loop.create_future())
        self._waiting.setdefault(user_id, collections.deque()).append(ticket)
        self._wakeup.set()
        return ticket

    def check_room(self, user_id: int) -> None:
        """Raise QueueFull if the queue, or this user's share of it, is full."""
        if self.pending >= self._max_queue:
            raise QueueFull(f"The queue is full ({self._max_queue} jobs waiting). Please try again in a minute or two.")
        mine = len(self._waiting.get(user_id, ())) + sum(ticket.user_id == user_id for ticket in self._running)
        if mine >= self._max_per_user:
            raise QueueFull(
                f"You already have {mine} jobs in the queue (the limit is {self._max_per_user}). "
                "Wait for one to finish, then try again."
            )

    def cancel(self, job_id: int) -> bool:
        """Withdraw a waiting job; a job already on the GPU cannot be stopped."""
        for user_id, tickets in self._waiting.items():
            for ticket in tickets:
                if ticket.job_id == job_id:
                    tickets.remove(ticket)
                    if not tickets:
                        del self._waiting[user_id]
                    ticket.result.cancel()
                    return True
        return False

    @property
    def pending(self) -> int:
        """Jobs waiting, not counting those on the GPU."""
        return sum(len(tickets) for tickets in self._waiting.values())

    def position(self, job_id: int) -> int | None:
        """Return 0 while the job renders, its 1-based place in line while it waits, None when unknown."""
        if any(ticket.job_id == job_id for ticket in self._running):
            return 0
        for place, ticket in enumerate(self._fair_order(), 1):
            if ticket.job_id == job_id:
                return place
        return None

    def _iter_waiting(self) -> Iterator[Ticket]:
        for tickets in self._waiting.values():
            yield from tickets

    def _fair_order(self) -> Iterator[Ticket]:
        """Yield waiting tickets in the order they will be served: one per user per round, in turn order."""
        queues = [list(tickets) for tickets in self._waiting.values()]
        for depth in range(max((len(q) for q in queues), default=0)):
            for queue in queues:
                if depth < len(queue):
                    yield queue[depth]

    def _take_batch(self) -> list[Ticket]:
        """Take the next ticket in fair order and every later compatible ticket that fits beside it."""
        order = list(self._fair_order())
        first = order[0]
        batch = [first]
        images = len(first.specs)
        for ticket in order[1:]:
            if images + len(ticket.specs) <= self._max_batch and ticket.settings == first.settings:
                batch.append(ticket)
                images += len(ticket.specs)
        for ticket in batch:
            tickets = self._waiting[ticket.user_id]
            tickets.remove(ticket)
            if not tickets:
                del self._waiting[ticket.user_id]
        # The first user has had their turn: to the back of the line.
        if first.user_id in self._waiting:
            self._waiting.move_to_end(first.user_id)
        return batch

    # Worker

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._executor is not None
        while True:
            while not self._waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = self._take_batch()
            self._running = batch
            specs = [spec for ticket in batch for spec in ticket.specs]
            total = batch[0].settings.steps

            def progress(step: int, total_steps: int, batch: list[Ticket] = batch) -> None:
                # Called on the GPU thread: hand the numbers to the loop.
                loop.call_soon_threadsafe(_set_progress, batch, step, total_steps)

            for ticket in batch:
                ticket.total_steps = total
                ticket.started.set()
            started = time.perf_counter()
            try:
                images = await loop.run_in_executor(self._executor, self._render, specs, progress)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("Rendering a batch of %d images failed", len(specs))
                for ticket in batch:
                    if not ticket.result.done():
                        ticket.result.set_exception(exc)
            else:
                seconds = time.perf_counter() - started
                log.info("Rendered %d images for %d jobs in %.2f s", len(specs), len(batch), seconds)
                if len(images) != len(specs):
                    raise RuntimeError(f"render returned {len(images)} images for {len(specs)} specs")
                offset = 0
                for ticket in batch:
                    mine = images[offset : offset + len(ticket.specs)]
                    offset += len(ticket.specs)
                    if not ticket.result.done():
                        ticket.result.set_result(mine)
                if self._on_batch is not None:
                    self._on_batch(Batch(tuple(t.job_id for t in batch), len(specs), seconds))
            finally:
                self._running = []

    def resume(self) -> None:
        self._wakeup.set()


def _set_progress(batch: list[Ticket], step: int, total_steps: int) -> None:
    for ticket in batch:
        ticket.step = step
        ticket.total_steps = total_steps
