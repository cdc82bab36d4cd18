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
from bot.errors import JobCancelled, QueueFull
from bot.limits import describe_wait

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

_RATE_WEIGHT = 0.3  # weight of the newest batch in the moving average of rendering speed


class Render(Protocol):
    """The executor seam: a batch of plain specs in, PNGs out; runs on the one GPU thread.

    ``progress`` may raise to stop the batch early (the scheduler does when nobody wants its images any more).
    """

    def __call__(self, specs: Sequence[ImageSpec], progress: Progress | None = None, /) -> list[RenderedImage]: ...


class RenderStopped(Exception):
    """Raised from the progress callback to stop a batch whose images nobody will receive."""


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
    guild_id: int | None
    specs: tuple[ImageSpec, ...]
    result: asyncio.Future[list[RenderedImage]]
    started: asyncio.Event = field(default_factory=asyncio.Event)
    step: int = 0
    total_steps: int = 0

    @property
    def settings(self) -> Settings:
        return self.specs[0].settings

    @property
    def work(self) -> int:
        """Pixel-steps this job costs the GPU, the unit its time estimates are kept in."""
        settings = self.settings
        return len(self.specs) * settings.width * settings.height * settings.steps


@dataclass(eq=False, slots=True)
class Place:
    """A place in the queue taken for a job not yet stored; ``submit`` fills it, ``release`` gives it back."""

    user_id: int
    guild_id: int | None
    taken: bool = True


@dataclass(eq=False, slots=True)
class _Running:
    tickets: list[Ticket]
    started: float
    estimate: float | None
    stop: bool = False  # read on the GPU thread at every step


class Scheduler:
    """Serve jobs from many users in turn, rendering compatible ones together."""

    def __init__(
        self,
        render: Render,
        *,
        max_batch: int = 8,
        max_queue: int = 32,
        on_batch: Callable[[Batch], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be at least 1")
        self._render = render
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._on_batch = on_batch
        # Users in turn order; each has a FIFO of tickets. The user served last moves to the back.
        self._waiting: collections.OrderedDict[int, collections.deque[Ticket]] = collections.OrderedDict()
        self._places: dict[int, list[Place]] = {}  # by user, so a user's count never walks the whole queue
        self._place_count = 0
        self._running: _Running | None = None
        self._paused: set[int] = set()
        self._draining = False
        self._seconds_per_work: float | None = None
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
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
        unfinished = [*self.running, *self._iter_waiting()]
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
        if self._executor is not None:
            # Let the batch in hand finish: a pipeline must never be driven by two threads (a restart in the same
            # process would otherwise start a second GPU thread on the same weights and scheduler state).
            await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
            self._executor = None
        self._running = None
        self._idle.set()

    # Admission

    def reserve(self, *, user_id: int, guild_id: int | None, max_queued: int) -> Place:
        """Take a place for a job about to be stored, or raise QueueFull; nothing may be awaited before ``submit``.

        ``max_queued`` is how many jobs the user may have waiting or rendering in that server at once.
        """
        if self.pending + self._place_count >= self._max_queue:
            raise QueueFull(f"The queue is full ({self._max_queue} jobs waiting). Please try again in a minute or two.")
        mine = self.jobs_of(user_id=user_id, guild_id=guild_id)
        if mine >= max_queued:
            if max_queued == 0:
                raise QueueFull("You cannot queue images in this server (your limit is 0 jobs at once).")
            etas = [
                eta
                for ticket in [*self.running, *self._waiting.get(user_id, ())]
                if ticket.user_id == user_id and ticket.guild_id == guild_id and (eta := self.eta(ticket.job_id))
            ]
            when = f" One should be done in about {describe_wait(min(etas))}." if etas else ""
            raise QueueFull(
                f"You already have {mine} job{'s' if mine != 1 else ''} in the queue (your limit is {max_queued}). "
                f"Try again when one has finished, or cancel one with its Cancel button.{when}"
            )
        place = Place(user_id=user_id, guild_id=guild_id)
        self._places.setdefault(user_id, []).append(place)
        self._place_count += 1
        return place

    def release(self, place: Place) -> None:
        """Give back a place whose job was never submitted (storing it failed, or the interaction expired)."""
        if place.taken:
            place.taken = False
            places = self._places[place.user_id]
            places.remove(place)
            if not places:
                del self._places[place.user_id]
            self._place_count -= 1

    def submit(
        self,
        *,
        job_id: int,
        user_id: int,
        guild_id: int | None,
        specs: Sequence[ImageSpec],
        place: Place | None = None,
    ) -> Ticket:
        """Queue a stored job's images in the place taken for it; without a place (a job restored after a restart)
        it goes in whatever the limits say."""
        if not specs:
            raise ValueError("a job needs at least one image")
        if len(specs) > self._max_batch:
            raise ValueError(f"a job of {len(specs)} images does not fit a batch of {self._max_batch}")
        if len({spec.settings for spec in specs}) != 1:
            raise ValueError("all images of one job must share their settings")
        if place is not None:
            if not place.taken:
                raise ValueError("that place in the queue was already used or released")
            self.release(place)
        loop = asyncio.get_running_loop()
        ticket = Ticket(
            job_id=job_id, user_id=user_id, guild_id=guild_id, specs=tuple(specs), result=loop.create_future()
        )
        self._waiting.setdefault(user_id, collections.deque()).append(ticket)
        self._wakeup.set()
        return ticket

    def jobs_of(self, *, user_id: int, guild_id: int | None) -> int:
        """Return a user's jobs in a server that wait, render, or are being stored."""
        return (
            sum(ticket.guild_id == guild_id for ticket in self._waiting.get(user_id, ()))
            + sum(ticket.user_id == user_id and ticket.guild_id == guild_id for ticket in self.running)
            + sum(place.guild_id == guild_id for place in self._places.get(user_id, ()))
        )

    def cancel(self, job_id: int, reason: str) -> bool | None:
        """Withdraw a job: its result becomes JobCancelled(reason).

        Returns False if it was waiting, True if it was rendering (its images will be dropped, and the batch stops
        if no job in it still wants its images), and None if the scheduler does not hold it.
        """
        for user_id, tickets in self._waiting.items():
            for ticket in tickets:
                if ticket.job_id == job_id:
                    tickets.remove(ticket)
                    if not tickets:
                        del self._waiting[user_id]
                    if not ticket.result.done():
                        ticket.result.set_exception(JobCancelled(reason))
                    return False
        running = self._running
        for ticket in running.tickets if running else ():
            if ticket.job_id == job_id:
                if not ticket.result.done():
                    ticket.result.set_exception(JobCancelled(reason))
                if running is not None and all(other.result.done() for other in running.tickets):
                    running.stop = True
                return True
        return None

    # Pausing and stopping

    def pause(self, guild_id: int) -> None:
        """Start no new batch of this server's jobs; they keep their places, and the batch on the GPU finishes."""
        self._paused.add(guild_id)

    def resume(self, guild_id: int) -> None:
        self._paused.discard(guild_id)
        self._wakeup.set()

    def is_paused(self, guild_id: int | None) -> bool:
        return guild_id is not None and guild_id in self._paused

    def drain(self) -> None:
        """Start no new batch at all (the bot is stopping); waiting jobs stay queued in the database."""
        self._draining = True

    async def wait_idle(self) -> None:
        """Wait until no batch is on the GPU."""
        await self._idle.wait()

    def stop_rendering(self) -> None:
        """Stop the batch on the GPU at its next step; its jobs stay unfinished, to run again after a restart."""
        if self._running is not None:
            self._running.stop = True

    # What users see

    @property
    def pending(self) -> int:
        """Jobs waiting, not counting those on the GPU."""
        return sum(len(tickets) for tickets in self._waiting.values())

    @property
    def running(self) -> list[Ticket]:
        return list(self._running.tickets) if self._running else []

    def waiting(self, guild_id: int | None = None) -> list[Ticket]:
        """Return the waiting jobs in the order they will be served, of one server or of all."""
        return [ticket for ticket in self._fair_order() if guild_id is None or ticket.guild_id == guild_id]

    def position(self, job_id: int) -> int | None:
        """Return 0 while the job renders, its 1-based place in line while it waits, None when unknown."""
        if any(ticket.job_id == job_id for ticket in self.running):
            return 0
        for place, ticket in enumerate(self._fair_order(), 1):
            if ticket.job_id == job_id:
                return place
        return None

    def eta(self, job_id: int) -> float | None:
        """Estimate the seconds until a job's images are ready, from measured speed; None before any measurement."""
        rate = self._seconds_per_work
        if rate is None:
            return None
        running = self._running
        ahead = 0.0
        if running is not None:
            elapsed = time.perf_counter() - running.started
            remaining = max(0.0, (running.estimate or 0.0) - elapsed)
            if any(ticket.job_id == job_id for ticket in running.tickets):
                return remaining
            ahead = remaining
        for ticket in self._fair_order():
            if self.is_paused(ticket.guild_id):
                continue
            ahead += ticket.work * rate
            if ticket.job_id == job_id:
                return ahead
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

    def _ready(self) -> list[Ticket]:
        if self._draining:
            return []
        return [ticket for ticket in self._fair_order() if not self.is_paused(ticket.guild_id)]

    def _take_batch(self, order: list[Ticket]) -> list[Ticket]:
        """Take the next ticket in fair order and every later compatible ticket that fits beside it."""
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
            while not (order := self._ready()):
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = self._take_batch(order)
            specs = [spec for ticket in batch for spec in ticket.specs]
            work = sum(ticket.work for ticket in batch)
            rate = self._seconds_per_work
            running = _Running(batch, time.perf_counter(), work * rate if rate is not None else None)
            self._running = running
            self._idle.clear()
            total = batch[0].settings.steps

            def progress(step: int, total_steps: int, running: _Running = running) -> None:
                # Called on the GPU thread: stop if asked, else hand the numbers to the loop.
                if running.stop:
                    raise RenderStopped
                loop.call_soon_threadsafe(_set_progress, running.tickets, step, total_steps)

            for ticket in batch:
                ticket.total_steps = total
                ticket.started.set()
            try:
                images = await loop.run_in_executor(self._executor, self._render, specs, progress)
            except asyncio.CancelledError:
                raise
            except RenderStopped:
                # Cancelled jobs already have their answer. A stop for shutdown leaves the others unfinished in the
                # database, to run after the restart: their waiters see a cancellation, not a failure.
                log.info("Stopped a batch of %d images early", len(specs))
                for ticket in batch:
                    if not ticket.result.done():
                        ticket.result.cancel()
            except Exception as exc:
                log.exception("Rendering a batch of %d images failed", len(specs))
                for ticket in batch:
                    if not ticket.result.done():
                        ticket.result.set_exception(exc)
            else:
                seconds = time.perf_counter() - running.started
                log.info("Rendered %d images for %d jobs in %.2f s", len(specs), len(batch), seconds)
                if len(images) != len(specs):
                    raise RuntimeError(f"render returned {len(images)} images for {len(specs)} specs")
                measured = seconds / work
                self._seconds_per_work = (
                    measured if rate is None else (1 - _RATE_WEIGHT) * rate + _RATE_WEIGHT * measured
                )
                offset = 0
                for ticket in batch:
                    mine = images[offset : offset + len(ticket.specs)]
                    offset += len(ticket.specs)
                    if not ticket.result.done():
                        ticket.result.set_result(mine)
                if self._on_batch is not None:
                    self._on_batch(Batch(tuple(t.job_id for t in batch), len(specs), seconds))
            finally:
                self._running = None
                self._idle.set()


def _set_progress(tickets: list[Ticket], step: int, total_steps: int) -> None:
    for ticket in tickets:
        ticket.step = step
        ticket.total_steps = total_steps
