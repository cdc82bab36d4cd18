"""Running one batch on a worker and answering each of its jobs, for the scheduler.

A batch's jobs get their images, a failure, or go back in line when the worker died; when the GPU runs out of memory
the batch is rendered in two halves, down to single images. Every call is timed for the estimates (``Speed``) and
described per image (``Rendering``); the calls in flight are what the scheduler's places, estimates and stops see.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from bot.engine.executor import Call, RenderStopped, Worker, WorkerLost
from bot.engine.types import ImageSpec, RenderedImage
from bot.errors import BotError, OutOfMemory
from bot.scheduler.estimates import Speed

if TYPE_CHECKING:
    from bot.scheduler.line import Ticket

log = logging.getLogger(__name__)


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


@dataclass(frozen=True, slots=True)
class Frame:
    """The look at a job's first image while it renders: a small JPEG after ``step`` of ``total`` steps."""

    jpeg: bytes = field(repr=False)
    step: int
    total: int


@dataclass(eq=False, slots=True)
class Running:
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

    def take_back(self) -> None:
        """Stop a call a worker holds to render next, so that its jobs go back to the head of the line."""
        self.taken_back = True
        self.call.stop()


class _TakenBack(Exception):
    """A batch a worker held to render next was stopped to put its jobs back in line (their server paused)."""


class Runner:
    """Render batches on workers and answer their jobs, keeping the calls in flight in the order handed out."""

    def __init__(
        self,
        speed: Speed,
        *,
        changed: Callable[[], None],
        requeue: Callable[[list[Ticket], bool], None],
        on_batch: Callable[[Batch], None] | None = None,
    ) -> None:
        self.running: list[Running] = []
        self._speed = speed
        self._changed = changed  # the calls in flight or the measured speed changed
        self._requeue = requeue  # put a batch's jobs back at the front of the line; True: no attempt counts
        self._on_batch = on_batch
        self._finished_at: dict[str, float] = {}  # by worker: when its last call ended, to time busy workers
        # Batch ids stay unique across restarts: they count on from the time the scheduler started, in microseconds.
        self._batch_ids = itertools.count(time.time_ns() // 1000)

    async def run(self, worker: Worker, batch: list[Ticket]) -> None:
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
            self._requeue(batch, error.blameless)
            return
        except _TakenBack:
            log.info("Took back a batch of %d images a worker held to render next: its server paused", len(pairs))
            self._requeue(batch, True)
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
        estimate = self._speed.estimate(settings, len(specs))

        def on_started() -> None:
            running.started = time.perf_counter()
            self._changed()
            for ticket in tickets:
                ticket.started.set()

        def on_progress(step: int, total: int) -> None:
            for ticket in tickets:
                ticket.step = step
                ticket.total_steps = total

        # Each job's first image in this call is the one its requester watches form.
        firsts: dict[int, Ticket] = {}
        for index, (ticket, _) in enumerate(pairs):
            if ticket not in firsts.values():
                firsts[index] = ticket

        def on_preview(index: int, step: int, total: int, jpeg: bytes) -> None:
            ticket = firsts.get(index)
            if ticket is not None and not ticket.result.done():
                ticket.show(Frame(jpeg, step, total))

        call = Call(specs, on_started, on_progress, previews=tuple(firsts), on_preview=on_preview)
        running = Running(worker, tickets, call, estimate)
        for ticket in tickets:
            ticket.step = 0
            ticket.total_steps = settings.steps
        self.running.append(running)
        self._changed()
        try:
            images = await worker.render(running.call)
        except RenderStopped:
            if running.taken_back:
                raise _TakenBack from None
            raise
        finally:
            self.running.remove(running)
            self._changed()
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
        self._speed.measure(settings, len(specs), now - began)
        self._changed()
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


def _middle(pairs: list[tuple[Ticket, ImageSpec]]) -> int:
    """Return where to split a batch in two: at the job boundary nearest the middle, else the middle."""
    half = len(pairs) / 2
    boundaries = [index for index in range(1, len(pairs)) if pairs[index][0] is not pairs[index - 1][0]]
    return min(boundaries, key=lambda index: abs(index - half)) if boundaries else len(pairs) // 2
