"""The queue in front of the GPU: fair order across users, compatible jobs batched into one call, one worker."""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from bot.engine.executor import Call, Render, RenderStopped, ThreadWorker, Worker, WorkerGroup, WorkerLost
from bot.engine.types import ImageSpec, RenderedImage, Settings
from bot.errors import BotError, JobCancelled, OutOfMemory, QueueFull, RenderFailed
from bot.limits import describe_wait

log = logging.getLogger(__name__)

_RATE_WEIGHT = 0.3  # weight of the newest batch in the moving average of rendering speed
MAX_ATTEMPTS = 3  # workers a job may see die under it before it fails


class _TakenBack(Exception):
    """A batch a worker held to render next was stopped to put its jobs back in line (their server paused)."""


@dataclass(frozen=True, slots=True)
class Batch:
    """What one GPU call rendered, for the log and the benchmarks."""

    job_ids: tuple[int, ...]
    images: int
    seconds: float
    worker: str = ""


@dataclass(frozen=True, slots=True)
class Rendering:
    """How one image of a job was rendered: its batch (a GPU call), the worker, when, and what the worker said."""

    batch_id: int
    batch_size: int
    worker: str
    started_at: float  # wall-clock time the batch started
    seconds: float
    revision: str | None = None
    dtype: str | None = None
    compiled: bool = False


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
    attempts: int = 0  # workers that died while holding it
    renders: list[Rendering] = field(default_factory=lambda: list[Rendering]())  # per image, once rendered

    @property
    def settings(self) -> Settings:
        return self.specs[0].settings

    @property
    def work(self) -> int:
        """Pixel-steps this job costs the GPU, the unit its time estimates fall back on."""
        settings = self.settings
        return len(self.specs) * settings.width * settings.height * settings.steps


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


@dataclass(eq=False, slots=True)
class _Running:
    """A call in flight on a worker, with the tickets whose images it renders."""

    worker: Worker
    tickets: list[Ticket]
    call: Call
    estimate: float | None
    started: float | None = None  # perf_counter when the worker began it
    taken_back: bool = False  # stopped before it started, to go back in line

    def remaining(self, now: float) -> float:
        if self.estimate is None:
            return 0.0
        if self.started is None:
            return self.estimate
        return max(0.0, self.estimate - (now - self.started))


class Scheduler:
    """Serve jobs from many users in turn, rendering compatible ones together on whichever worker is free."""

    def __init__(
        self,
        render: Render | None = None,
        *,
        workers: Sequence[Worker] = (),
        max_batch: int = 8,
        max_queue: int = 32,
        on_batch: Callable[[Batch], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be at least 1")
        if (render is None) == (not workers):
            raise ValueError("give either a render function or workers")
        # A render function gets a thread of its own, which the scheduler owns and closes.
        self._own = [ThreadWorker(render)] if render is not None else []
        self._workers: tuple[Worker, ...] = tuple(workers) or tuple(self._own)
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._on_batch = on_batch
        # Users in turn order; each has a FIFO of tickets. The user served last moves to the back.
        self._waiting: collections.OrderedDict[int, collections.deque[Ticket]] = collections.OrderedDict()
        self._places: dict[int, list[Place]] = {}  # by user, so a user's count never walks the whole queue
        self._place_count = 0
        self._running: list[_Running] = []  # calls in flight, in the order they were handed out
        self._busy = 0  # slots between taking a batch and delivering it (an out-of-memory split spans calls)
        self._finished_at: dict[str, float] = {}  # by worker: when its last call ended, to time busy workers
        self._paused: set[int] = set()
        self._draining = False
        self._seconds_per_image: dict[Settings, float] = {}
        self._seconds_per_work: float | None = None
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._slots: list[asyncio.Task[None]] = []
        # Batch ids stay unique across restarts: they count on from the time the scheduler started, in microseconds.
        self._batch_ids = itertools.count(time.time_ns() // 1000)
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
        unfinished = [*self._in_flight(), *self._iter_waiting()]
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
        self._waiting.clear()
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
        mine = self.jobs_of(user_id=user_id, guild_id=guild_id)
        if mine >= max_queued:
            if max_queued == 0:
                raise QueueFull("You cannot queue images in this server (your limit is 0 jobs at once).")
            etas = [
                eta
                for ticket in [*self._in_flight(), *self._waiting.get(user_id, ())]
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
        self._touch()
        self._wakeup.set()
        return ticket

    def jobs_of(self, *, user_id: int, guild_id: int | None) -> int:
        """Return a user's jobs in a server that wait, render, or are being stored."""
        return (
            sum(ticket.guild_id == guild_id for ticket in self._waiting.get(user_id, ()))
            + sum(ticket.user_id == user_id and ticket.guild_id == guild_id for ticket in self._in_flight())
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
                if all(other.result.done() for other in running.tickets):
                    running.call.stop()
        return True if found else None

    # Pausing and stopping

    def pause(self, guild_id: int) -> None:
        """Start no new batch of this server's jobs; they keep their places, and the batch on the GPU finishes.

        A batch a worker holds to render next is taken back if it holds a job of this server: it has not started,
        so its jobs go back to the head of the line (the other servers' jobs in it go out again at once).
        """
        self._paused.add(guild_id)
        for running in self._running:
            if running.started is None and any(ticket.guild_id == guild_id for ticket in running.tickets):
                running.taken_back = True
                running.call.stop()
        self._touch()

    def resume(self, guild_id: int) -> None:
        self._paused.discard(guild_id)
        self._touch()
        self._wakeup.set()

    def is_paused(self, guild_id: int | None) -> bool:
        return guild_id is not None and guild_id in self._paused

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
        return sum(len(tickets) for tickets in self._waiting.values()) + len(self._next())

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
        return [ticket for ticket in self._line() if guild_id is None or ticket.guild_id == guild_id]

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
            work: float | None = 0.0 if self._seconds_per_work is not None else None
            for place, ticket in enumerate(self._next(), 1):
                index[ticket.job_id] = _Place(place, None)
            for place, ticket in enumerate(self._fair_order(), len(index) + 1):
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
        if self._seconds_per_work is None:
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
        estimate = self._estimate_images(ticket.settings, len(ticket.specs))
        assert estimate is not None  # asked only once something was measured
        return estimate

    def _in_flight(self) -> list[Ticket]:
        """Jobs handed to a worker: rendering, or held by the worker to render next."""
        return list(dict.fromkeys(ticket for running in self._running for ticket in running.tickets))

    def _next(self) -> list[Ticket]:
        """Jobs a worker holds but has not started: the head of the line."""
        return [ticket for ticket in self._in_flight() if not ticket.started.is_set()]

    def _line(self) -> Iterator[Ticket]:
        yield from self._next()
        yield from self._fair_order()

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

    def _ready(self) -> Iterator[Ticket] | None:
        """Return the waiting tickets that may start, in fair order, or None when none may."""
        if self._draining or not self._waiting:
            return None
        order = (ticket for ticket in self._fair_order() if not self.is_paused(ticket.guild_id))
        first = next(order, None)
        return itertools.chain((first,), order) if first is not None else None

    def _take_batch(self, order: Iterator[Ticket]) -> list[Ticket]:
        """Take the next ticket in fair order and every later compatible ticket that fits beside it."""
        first = next(order)
        batch = [first]
        images = len(first.specs)
        for ticket in order:
            if images >= self._max_batch:
                break
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
        self._touch()
        return batch

    # Workers

    async def _serve(self, worker: Worker) -> None:
        """Hand the next fair batch to this worker whenever it can take one; one task per place the worker has."""
        while True:
            await worker.ready()
            while (order := self._ready()) is None:
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = self._take_batch(order)
            self._busy += 1
            self._idle.clear()
            try:
                await self._run(worker, batch)
            finally:
                self._busy -= 1
                if not self._busy:
                    self._idle.set()

    async def _run(self, worker: Worker, batch: list[Ticket]) -> None:
        """Render a batch and answer each of its jobs: images, a failure, or back in line if the worker died."""
        pairs = [(ticket, spec) for ticket in batch for spec in ticket.specs]
        try:
            results = await self._render_split(worker, pairs)
        except WorkerLost as error:
            log.log(
                logging.INFO if error.blameless else logging.WARNING,
                "Worker %s was lost holding %d jobs (%s); they go back to the front of the queue",
                worker.name,
                len(batch),
                error,
            )
            self._requeue(batch, blameless=error.blameless)
            return
        except _TakenBack:
            log.info("Took back a batch of %d images a worker held to render next: its server paused", len(pairs))
            self._requeue(batch, blameless=True)
            return
        except RenderStopped:
            # Cancelled jobs already have their answer. A stop for shutdown leaves the others unfinished in the
            # database, to run after the restart: their waiters see a cancellation, not a failure.
            log.info("Stopped a batch of %d images early", len(pairs))
            for ticket in batch:
                if not ticket.result.done():
                    ticket.result.cancel()
            return
        except BotError as error:
            log.warning("A batch of %d images failed: %s", len(pairs), error)
            for ticket in batch:
                if not ticket.result.done():
                    ticket.result.set_exception(error)
            return
        except Exception as error:
            log.exception("Rendering a batch of %d images failed", len(pairs))
            for ticket in batch:
                if not ticket.result.done():
                    ticket.result.set_exception(error)
            return
        offset = 0
        for ticket in batch:
            mine = results[offset : offset + len(ticket.specs)]
            offset += len(ticket.specs)
            if ticket.result.done():
                continue
            failure = next((result for result in mine if isinstance(result, BaseException)), None)
            if failure is not None:
                ticket.result.set_exception(failure)
            else:
                done = [result for result in mine if isinstance(result, tuple)]
                ticket.renders = [rendering for _, rendering in done]
                ticket.result.set_result([image for image, _ in done])

    async def _render_split(
        self, worker: Worker, pairs: list[tuple[Ticket, ImageSpec]]
    ) -> list[tuple[RenderedImage, Rendering] | BaseException | None]:
        """Render the pairs' specs; when the GPU runs out of memory, render the two halves one after the other.

        An image that does not fit even alone gets its own failure; None stands for images nobody wants any more.
        """
        if all(ticket.result.done() for ticket, _ in pairs):
            return [None] * len(pairs)
        try:
            return list(await self._render_once(worker, pairs))
        except OutOfMemory as error:
            if len(pairs) == 1:
                size = f"{pairs[0][1].settings.width}x{pairs[0][1].settings.height}"
                return [
                    OutOfMemory(
                        f"{error} This image does not fit in the GPU's free memory even alone: "
                        f"try a smaller size than {size}."
                    )
                ]
            middle = _middle(pairs)
            log.warning(
                "Out of memory with %d images on %s; rendering %d and %d",
                len(pairs),
                worker.name,
                middle,
                len(pairs) - middle,
            )
            first = await self._render_split(worker, pairs[:middle])
            return first + await self._render_split(worker, pairs[middle:])

    async def _render_once(
        self, worker: Worker, pairs: list[tuple[Ticket, ImageSpec]]
    ) -> list[tuple[RenderedImage, Rendering]]:
        tickets = list(dict.fromkeys(ticket for ticket, _ in pairs))
        specs = tuple(spec for _, spec in pairs)
        settings = specs[0].settings
        estimate = self._estimate_images(settings, len(specs))

        def on_started() -> None:
            running.started = time.perf_counter()
            self._touch()
            for ticket in tickets:
                ticket.started.set()

        def on_progress(step: int, total: int) -> None:
            for ticket in tickets:
                ticket.step = step
                ticket.total_steps = total

        running = _Running(worker, tickets, Call(specs, on_started, on_progress), estimate)
        for ticket in tickets:
            ticket.step = 0
            ticket.total_steps = settings.steps
        self._running.append(running)
        self._touch()
        try:
            images = await worker.render(running.call)
        except RenderStopped:
            if running.taken_back:
                raise _TakenBack from None
            raise
        finally:
            self._running.remove(running)
            self._touch()
        if len(images) != len(specs):
            raise RuntimeError(f"worker {worker.name} returned {len(images)} images for {len(specs)} specs")
        now = time.perf_counter()
        facts = running.call.facts
        revision, dtype, who = facts.get("revision"), facts.get("dtype"), facts.get("worker")
        name = who if isinstance(who, str) and who else worker.name
        # A busy worker prepares and encodes around the GPU work, so what one call costs is the time since the
        # worker last finished, when that is later than this call's start.
        began = max(running.started or now, self._finished_at.get(name, 0.0))
        self._finished_at[name] = now
        self._measure(settings, len(specs), now - began)
        log.info("Rendered %d images for %d jobs on %s in %.2f s", len(specs), len(tickets), name, now - began)
        if self._on_batch is not None:
            self._on_batch(Batch(tuple(ticket.job_id for ticket in tickets), len(specs), now - began, name))
        rendering = Rendering(
            batch_id=next(self._batch_ids),
            batch_size=len(specs),
            worker=name,
            started_at=time.time() - (now - (running.started or now)),
            seconds=now - began,
            revision=revision if isinstance(revision, str) else None,
            dtype=dtype if isinstance(dtype, str) else None,
            compiled=facts.get("compiled") is True,
        )
        return [(image, rendering) for image in images]

    def _estimate_images(self, settings: Settings, images: int) -> float | None:
        per_image = self._seconds_per_image.get(settings)
        if per_image is not None:
            return per_image * images
        if self._seconds_per_work is None:
            return None
        return self._seconds_per_work * images * settings.width * settings.height * settings.steps

    def _measure(self, settings: Settings, images: int, seconds: float) -> None:
        """Fold one call's time into the moving averages the estimates come from."""
        per_image = seconds / images
        old = self._seconds_per_image.get(settings)
        self._seconds_per_image[settings] = per_image if old is None else _average(old, per_image)
        per_work = per_image / (settings.width * settings.height * settings.steps)
        old = self._seconds_per_work
        self._seconds_per_work = per_work if old is None else _average(old, per_work)
        self._touch()

    def _requeue(self, batch: list[Ticket], *, blameless: bool = False) -> None:
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
            self._waiting.setdefault(ticket.user_id, collections.deque()).appendleft(ticket)
            self._waiting.move_to_end(ticket.user_id, last=False)
        self._touch()
        self._wakeup.set()


def _average(old: float, new: float) -> float:
    return (1 - _RATE_WEIGHT) * old + _RATE_WEIGHT * new


def _middle(pairs: list[tuple[Ticket, ImageSpec]]) -> int:
    """Return where to split a batch in two: at the job boundary nearest the middle, else the middle."""
    half = len(pairs) / 2
    boundaries = [index for index in range(1, len(pairs)) if pairs[index][0] is not pairs[index - 1][0]]
    return min(boundaries, key=lambda index: abs(index - half)) if boundaries else len(pairs) // 2
