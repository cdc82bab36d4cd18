"""The queue in front of the GPU: admission, fair order across users, batches handed to whichever worker is free.

``Scheduler`` is what the rest of the bot sees: places in the queue taken and given back, jobs submitted, cancelled,
paused, drained, and where each stands. Beside it: ``line`` (the waiting line, its fair order and which jobs make a
batch), ``batches`` (running a batch on a worker, out-of-memory splitting, timing), ``estimates`` (measured speed).
The workers themselves are ``bot.engine.executor``'s.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from bot.engine.executor import Render, ThreadWorker, Worker, WorkerGroup
from bot.engine.types import ImageSpec
from bot.errors import JobCancelled, QueueFull, RenderFailed, RevisionUnserved
from bot.limits import describe_wait
from bot.scheduler.batches import Batch, Runner
from bot.scheduler.estimates import Speed
from bot.scheduler.line import Line, Ticket

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # workers a job may see die under it before it fails


@dataclass(eq=False, slots=True)
class Place:
    """A place in the queue taken for a job not yet stored; ``submit`` fills it, ``release`` gives it back."""

    user_id: int
    guild_id: int | None
    taken: bool = True


@dataclass(frozen=True, slots=True)
class _Place:
    place: int
    work_ahead: float | None  # seconds of waiting work up to and including this job; None when unknown or paused


class Scheduler:
    """Serve jobs from many users in turn, rendering compatible ones together on whichever worker is free."""

    def __init__(
        self,
        render: Render | None = None,
        *,
        workers: Sequence[Worker] = (),
        max_batch: int = 8,
        max_queue: int = 32,
        server_share: float = 1.0,
        on_batch: Callable[[Batch], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be at least 1")
        if not 0 < server_share <= 1:
            raise ValueError(f"server_share must be in (0, 1], got {server_share}")
        if (render is None) == (not workers):
            raise ValueError("give either a render function or workers")
        # A render function gets a thread of its own, which the scheduler owns and closes.
        self._own = [ThreadWorker(render)] if render is not None else []
        self._workers: tuple[Worker, ...] = tuple(workers) or tuple(self._own)
        # The revisions served: a job asks for one (None: production), and only a worker serving it takes the job.
        self._revisions = frozenset(serves(worker) for worker in self._workers)
        self._one_revision = len(self._revisions) == 1
        self._max_batch = max_batch
        self._max_queue = max_queue
        # Jobs one server (DMs count as one) may hold at once, so a flood from one server leaves room for others;
        # None: no cap (a share of 1, the whole queue, is what max_queue bounds already).
        self._server_cap = max(1, math.ceil(server_share * max_queue)) if server_share < 1 else None
        self._per_server: dict[int | None, int] = {}  # waiting, rendering and being stored; kept by _count
        self._holding: set[Ticket] = set()  # the submitted jobs _per_server counts
        self._line = Line()
        self._places: dict[int, list[Place]] = {}  # by user, so a user's count never walks the whole queue
        self._place_count = 0
        self._speed = Speed()
        self._runner = Runner(self._speed, changed=self._touch, requeue=self._requeue, on_batch=on_batch)
        self._running = self._runner.running  # calls in flight, in the order they were handed out
        self._busy = 0  # slots between taking a batch and delivering it (an out-of-memory split spans calls)
        # Paused servers: kept here until moderation keeps them (``follow_pauses``), then asked of it.
        self._pauses: set[int] | None = set()
        self._paused: Callable[[int], bool] = self._pauses.__contains__
        self._draining = False
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._slots: list[asyncio.Task[None]] = []
        self._version = 0
        self._index_version = -1
        self._line_index: dict[int, _Place] = {}

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def start(self) -> None:
        if self._slots:
            raise RuntimeError("scheduler already started")
        loop = asyncio.get_running_loop()
        for worker in self._workers:
            for slot in range(worker.depth):
                self._slots.append(loop.create_task(self._serve(worker), name=f"gpu-{worker.name}-{slot}"))

    async def close(self) -> None:
        """Stop handing out batches and wait for the thread worker's batch; waiting jobs are cancelled (the
        database keeps them). Worker processes are closed by whoever started them."""
        unfinished = [*self._in_flight(), *self._line]
        for task in self._slots:
            task.cancel()
        for task in self._slots:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._slots.clear()
        for ticket in unfinished:
            if not ticket.result.done():
                ticket.result.cancel()
        self._line.clear()
        self._touch()
        for worker in self._own:
            await worker.close()
        self._running.clear()
        self._busy = 0
        self._idle.set()

    # Admission

    def reserve(self, *, user_id: int, guild_id: int | None, max_queued: int) -> Place:
        """Take a place for a job about to be stored, or raise QueueFull; nothing may be awaited before ``submit``.

        ``max_queued`` is how many jobs the user may have waiting or rendering in that server at once.
        """
        if self.pending + self._place_count >= self._max_queue:
            raise QueueFull(f"The queue is full ({self._max_queue} jobs waiting). Please try again in a minute or two.")
        held = self.jobs_of_server(guild_id)
        if self._server_cap is not None and held >= self._server_cap:
            where = "This server" if guild_id is not None else "Direct messages"
            raise QueueFull(
                f"{where} already {'has' if guild_id is not None else 'have'} {held} job{'s' if held != 1 else ''} "
                f"in the queue shared by all servers (the share of one server is {self._server_cap} of "
                f"{self._max_queue}). Try again when some have finished."
            )
        mine = self.jobs_of(user_id=user_id, guild_id=guild_id)
        if mine >= max_queued:
            if max_queued == 0:
                raise QueueFull("You cannot queue images in this server (your limit is 0 jobs at once).")
            etas = [
                eta
                for ticket in [*self._in_flight(), *self._line.of(user_id)]
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
        self._count(guild_id, 1)
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
            self._count(place.guild_id, -1)

    def submit(
        self,
        *,
        job_id: int,
        user_id: int,
        guild_id: int | None,
        specs: Sequence[ImageSpec],
        place: Place | None = None,
        revision: str | None = None,
    ) -> Ticket:
        """Queue a stored job's images in the place taken for it; without a place (a job restored after a restart)
        it goes in whatever the limits say. ``revision`` names a candidate revision to render it with (None: the
        production one); one no worker serves raises RevisionUnserved."""
        self.check_revision(revision)
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
            job_id=job_id,
            user_id=user_id,
            guild_id=guild_id,
            specs=tuple(specs),
            result=loop.create_future(),
            revision=revision,
        )
        self._line.append(ticket)
        # Every ticket's result is settled in the end (close cancels the rest): then it no longer holds a place.
        self._holding.add(ticket)
        self._count(guild_id, 1)
        ticket.result.add_done_callback(lambda _: self._let_go(ticket))
        self._touch()
        self._wakeup.set()
        return ticket

    @property
    def revisions(self) -> frozenset[str | None]:
        """Return the revisions the workers serve: None for the production one, and the candidates served."""
        return self._revisions

    def check_revision(self, revision: str | None) -> None:
        """Raise RevisionUnserved unless a worker serves ``revision`` (None: the production one)."""
        if revision not in self._revisions:
            raise RevisionUnserved(
                f"No GPU worker serves the model revision {revision or 'in production'}, so this job cannot run."
            )

    def jobs_of_server(self, guild_id: int | None) -> int:
        """Return a server's jobs that wait, render (and still want their images), or are being stored."""
        return self._per_server.get(guild_id, 0)

    @property
    def server_cap(self) -> int | None:
        """Return how many jobs one server may hold in the shared queue at once; None when there is no cap."""
        return self._server_cap

    def _let_go(self, ticket: Ticket) -> None:
        """Stop counting a job against its server's share (once)."""
        if ticket in self._holding:
            self._holding.discard(ticket)
            self._count(ticket.guild_id, -1)

    def _count(self, guild_id: int | None, delta: int) -> None:
        held = self._per_server.get(guild_id, 0) + delta
        if held > 0:
            self._per_server[guild_id] = held
        else:
            self._per_server.pop(guild_id, None)

    def jobs_of(self, *, user_id: int, guild_id: int | None) -> int:
        """Return a user's jobs in a server that wait, render, or are being stored."""
        return (
            sum(ticket.guild_id == guild_id for ticket in self._line.of(user_id))
            + sum(ticket.user_id == user_id and ticket.guild_id == guild_id for ticket in self._in_flight())
            + sum(place.guild_id == guild_id for place in self._places.get(user_id, ()))
        )

    def cancel(self, job_id: int, reason: str) -> bool | None:
        """Withdraw a job: its result becomes JobCancelled(reason).

        Returns False if it was waiting, True if it was rendering (its images will be dropped, and the batch stops
        if no job in it still wants its images), and None if the scheduler does not hold it.
        """
        ticket = self._line.remove(job_id)
        if ticket is not None:
            if not ticket.result.done():
                ticket.result.set_exception(JobCancelled(reason))
            self._let_go(ticket)  # now, not when the result's callbacks run
            self._touch()
            return False
        found = False
        for running in self._running:
            for ticket in running.tickets:
                if ticket.job_id != job_id:
                    continue
                found = True
                if not ticket.result.done():
                    ticket.result.set_exception(JobCancelled(reason))
                self._let_go(ticket)
                if all(other.result.done() for other in running.tickets):
                    running.call.stop()
        return True if found else None

    # Pausing and stopping

    def pause(self, guild_id: int) -> None:
        """Start no new batch of this server's jobs; they keep their places, and the batch on the GPU finishes.

        For a scheduler that keeps its own pauses (the CLI, the benchmarks); the bot's are moderation's.
        """
        self._own_pauses().add(guild_id)
        self.pause_changed(guild_id)

    def resume(self, guild_id: int) -> None:
        self._own_pauses().discard(guild_id)
        self.pause_changed(guild_id)

    def follow_pauses(self, paused: Callable[[int], bool]) -> None:
        """Ask ``paused`` from now on whether a server is paused: whoever keeps the pauses (moderation) calls
        ``pause_changed`` after each change. Batches held for servers paused already are taken back."""
        self._pauses = None
        self._paused = paused
        self._take_back(self.is_paused)
        self._touch()
        self._wakeup.set()

    def pause_changed(self, guild_id: int) -> None:
        """Apply a server's pause or resume.

        A batch a worker holds to render next is taken back if it holds a job of a paused server: it has not started,
        so its jobs go back to the head of the line (the other servers' jobs in it go out again at once).
        """
        if self.is_paused(guild_id):
            self._take_back(lambda other: other == guild_id)
            self._touch()
        else:
            self._touch()
            self._wakeup.set()

    def is_paused(self, guild_id: int | None) -> bool:
        return guild_id is not None and self._paused(guild_id)

    def _own_pauses(self) -> set[int]:
        if self._pauses is None:
            raise RuntimeError("this scheduler follows moderation's pauses: pause and resume the server there")
        return self._pauses

    def _take_back(self, of: Callable[[int | None], bool]) -> None:
        """Take back the batches workers hold to render next that hold a job of a server ``of`` names."""
        for running in self._running:
            if running.started is None and any(of(ticket.guild_id) for ticket in running.tickets):
                running.take_back()

    def drain(self) -> None:
        """Start no new batch at all (the bot is stopping); waiting jobs stay queued in the database."""
        self._draining = True
        for running in self._running:
            if running.started is None:  # handed to a worker to go next: it goes after the restart instead
                running.call.stop()

    async def wait_idle(self) -> None:
        """Wait until no batch is on a GPU."""
        await self._idle.wait()

    def stop_rendering(self) -> None:
        """Stop the batches on the GPUs at their next step; their jobs stay unfinished, to run again after a restart."""
        for running in self._running:
            running.call.stop()

    # What users see

    @property
    def pending(self) -> int:
        """Jobs waiting, counting those next on a worker but not those rendering."""
        return len(self._line) + len(self._next())

    @property
    def running(self) -> list[Ticket]:
        """Jobs on a GPU now."""
        return [ticket for ticket in self._in_flight() if ticket.started.is_set()]

    @property
    def next_up(self) -> list[Ticket]:
        """Jobs a worker holds to render next: handed out, not started."""
        return self._next()

    @property
    def workers(self) -> tuple[Worker, ...]:
        return self._workers

    def worker_notes(self) -> list[str]:
        """Return what workers that stand for several GPUs say about them (how many are up, or why none is)."""
        notes = (worker.describe() for worker in self._workers if isinstance(worker, WorkerGroup))
        return [note for note in notes if note]

    def waiting(self, guild_id: int | None = None) -> list[Ticket]:
        """Return the waiting jobs in the order they will be served, of one server or of all."""
        return [ticket for ticket in self._in_line() if guild_id is None or ticket.guild_id == guild_id]

    def position(self, job_id: int) -> int | None:
        """Return 0 while the job renders, its 1-based place in line while it waits, None when unknown."""
        if any(ticket.job_id == job_id for ticket in self.running):
            return 0
        place = self._index().get(job_id)
        return place.place if place is not None else None

    def _index(self) -> dict[int, _Place]:
        """Return every waiting job's place and the work ahead of it, rebuilt only after the queue changed.

        Every waiting job's message asks for its place every few seconds: with a thousand jobs queued, walking
        the queue for each of them would keep the event loop busy.
        """
        if self._index_version != self._version:
            index: dict[int, _Place] = {}
            work: float | None = 0.0 if self._speed.measured else None
            for place, ticket in enumerate(self._next(), 1):
                index[ticket.job_id] = _Place(place, None)
            for place, ticket in enumerate(self._line.fair_order(), len(index) + 1):
                if self.is_paused(ticket.guild_id) or work is None:
                    index[ticket.job_id] = _Place(place, None)
                    continue
                work += self._estimate(ticket)
                index[ticket.job_id] = _Place(place, work)
            self._line_index, self._index_version = index, self._version
        return self._line_index

    def _touch(self) -> None:
        """Note that the queue changed: places and estimates are computed again when next asked for."""
        self._version += 1

    def eta(self, job_id: int) -> float | None:
        """Estimate the seconds until a job's images are ready, from measured speed; None before any measurement.

        Each settings' seconds per image is a moving average over the batches rendered, so it includes what
        batching gains; the work ahead is shared by the workers.
        """
        if not self._speed.measured:
            return None
        now = time.perf_counter()
        ahead = 0.0
        for running in self._running:
            if any(ticket.job_id == job_id for ticket in running.tickets):
                # Calls on one worker run in the order handed out: this one waits for those before it.
                return sum(
                    other.remaining(now)
                    for other in self._running[: self._running.index(running) + 1]
                    if other.worker is running.worker
                )
            ahead += running.remaining(now)
        place = self._index().get(job_id)
        if place is None or place.work_ahead is None:
            return None
        return (ahead + place.work_ahead) / self._parallel()

    def _parallel(self) -> int:
        return sum(max(1, worker.parallel) if isinstance(worker, WorkerGroup) else 1 for worker in self._workers)

    def _estimate(self, ticket: Ticket) -> float:
        """Return the seconds a job should take its worker, measured for its settings where possible."""
        estimate = self._speed.estimate(ticket.settings, len(ticket.specs))
        assert estimate is not None  # asked only once something was measured
        return estimate

    def _in_flight(self) -> list[Ticket]:
        """Jobs handed to a worker: rendering, or held by the worker to render next."""
        return list(dict.fromkeys(ticket for running in self._running for ticket in running.tickets))

    def _next(self) -> list[Ticket]:
        """Jobs a worker holds but has not started: the head of the line."""
        return [ticket for ticket in self._in_flight() if not ticket.started.is_set()]

    def _in_line(self) -> Iterator[Ticket]:
        """Yield every waiting job in the order it will be served, those a worker holds first."""
        yield from self._next()
        yield from self._line.fair_order()

    def _ready(self, revision: str | None = None) -> Iterator[Ticket] | None:
        """Return the waiting tickets of ``revision`` that may start, in fair order, or None when none may."""
        if self._draining or not self._line:
            return None
        if self._one_revision:  # every job asks for the revision every worker serves
            order = (ticket for ticket in self._line.fair_order() if not self.is_paused(ticket.guild_id))
        elif not self._line.waiting_for(revision):
            return None
        else:
            order = (
                ticket
                for ticket in self._line.fair_order()
                if ticket.revision == revision and not self.is_paused(ticket.guild_id)
            )
        first = next(order, None)
        return itertools.chain((first,), order) if first is not None else None

    # Workers

    async def _serve(self, worker: Worker) -> None:
        """Hand the next fair batch of the revision it serves to this worker whenever it can take one; one task per
        place the worker has."""
        revision = serves(worker)
        while True:
            await worker.ready()
            while (order := self._ready(revision)) is None:
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = self._line.take_batch(order, self._max_batch)
            self._touch()
            self._busy += 1
            self._idle.clear()
            try:
                await self._runner.run(worker, batch)
            finally:
                self._busy -= 1
                if not self._busy:
                    self._idle.set()

    def _requeue(self, batch: list[Ticket], blameless: bool) -> None:
        """Put a dead worker's jobs back at the front of the line, in their order; a job that keeps killing
        workers fails instead of taking the next one down. A ``blameless`` loss counts no attempt."""
        for ticket in reversed(batch):
            if ticket.result.done():
                continue
            if ticket.started.is_set():
                if not blameless:  # it was on the GPU when the worker died, so it may be the cause
                    ticket.attempts += 1
                    if ticket.attempts >= MAX_ATTEMPTS:
                        ticket.result.set_exception(
                            RenderFailed(
                                f"Rendering this job stopped the GPU worker {ticket.attempts} times, so it was "
                                "given up. Try other settings, or tell the bot's operator."
                            )
                        )
                        continue
                ticket.started.clear()
                ticket.step = 0
                ticket.preview = None
            self._line.put_back(ticket)
        self._touch()
        self._wakeup.set()


def serves(worker: Worker) -> str | None:
    """Return the revision a worker serves: its ``serves`` attribute, a candidate revision as configured; None (or no
    such attribute) for the production one."""
    revision = getattr(worker, "serves", None)
    return revision if isinstance(revision, str) else None
