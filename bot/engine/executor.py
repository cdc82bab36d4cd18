"""The worker contract: what the scheduler hands whoever renders a batch, and what may come back.

The scheduler gives a ``Worker`` a ``Call`` (specs in, start and progress reported, a stop asked for) and gets the
images or one of the exceptions ``Worker`` names. Workers that render in another process or on another host (the GPU
worker process, the cluster) speak ``bot.engine.protocol`` instead; this module translates both ways: ``answer`` turns
a batch's events into its call's progress and its future's result on the bot's side, and ``failed`` and ``rendered``
turn what a local executor did into those events on the worker's side.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from bot.engine import protocol
from bot.engine.protocol import Failed, FailureKind, Rendered
from bot.engine.types import ImageSpec, RenderedImage
from bot.errors import BotError, OutOfMemory, RenderFailed

Progress = Callable[[int, int], None]
OnPreview = Callable[[int, int, int, bytes], None]  # (spec index, step, total, JPEG)


class Render(Protocol):
    """A batch of plain specs in, PNGs out, on the calling thread: what ``ThreadWorker`` runs.

    ``progress`` may raise to stop the batch early (the scheduler does when nobody wants its images any more).
    """

    def __call__(self, specs: Sequence[ImageSpec], progress: Progress | None = None, /) -> list[RenderedImage]: ...


class RenderStopped(Exception):
    """A batch was stopped before it finished, because the scheduler asked (``Call.stop``)."""


class WorkerLost(Exception):
    """The worker died holding the batch; its jobs go back to the front of the queue.

    A job on the GPU when its worker died may have caused it, so that counts as one of the scheduler's attempts,
    unless the loss is ``blameless``: nothing the jobs did can have caused it (the link to remote workers went down).
    """

    def __init__(self, *args: object, blameless: bool = False) -> None:
        super().__init__(*args)
        self.blameless = blameless


class Worker(Protocol):
    """The executor seam: whoever renders batches for the scheduler (a thread here, a GPU process, a remote host).

    ``render`` returns the call's images in order, or raises ``OutOfMemory`` (the scheduler splits the batch),
    ``RenderStopped`` (after ``Call.stop``), ``WorkerLost`` (the jobs are queued again), or a ``BotError`` whose
    message is for the users whose jobs were in the batch.

    A worker that serves a candidate revision of the model (``model.candidates``) says which in a ``serves``
    attribute, the candidate as configured; without one it serves the production revision, and the scheduler hands
    each worker only batches of its revision.
    """

    name: str
    depth: int  # batches it may hold at once: 2 lets it prepare the next batch while the GPU renders this one

    async def ready(self) -> None:
        """Return once the worker can take a batch (at once, or after a restart)."""
        ...

    async def render(self, call: Call) -> list[RenderedImage]: ...


@runtime_checkable
class WorkerGroup(Protocol):
    """A worker that stands for several GPUs (remote workers behind a broker): how many serve, and how they are."""

    @property
    def parallel(self) -> int:
        """Batches rendered at the same time now: the GPUs serving; at least 1 for estimates."""
        ...

    def describe(self) -> str | None:
        """Return a line for /queue about the GPUs behind it, or None when there is nothing to say."""
        ...


@dataclass(eq=False, slots=True)
class Call:
    """One batch handed to a worker: the worker reports its start and progress; the scheduler may stop it."""

    specs: tuple[ImageSpec, ...]
    on_started: Callable[[], None]
    on_progress: Progress
    previews: tuple[int, ...] = ()  # the specs whose images the scheduler wants to see forming
    on_preview: OnPreview | None = None  # a frame of one of them: index, step, total, JPEG bytes
    stopping: bool = False
    # What the worker says about how it rendered: "revision", "dtype", "compiled", and where known "seconds" (its own
    # time from start to last PNG), "peak_memory" (bytes) and "worker" (the name of the remote worker that rendered
    # it, where the worker stands for several); plain values.
    facts: dict[str, object] = field(default_factory=lambda: dict[str, object]())
    _on_stop: list[Callable[[], None]] = field(default_factory=lambda: list[Callable[[], None]]())

    def stop(self) -> None:
        """Ask the worker to stop this batch at its next step."""
        if not self.stopping:
            self.stopping = True
            for callback in self._on_stop:
                callback()

    def when_stopped(self, callback: Callable[[], None]) -> None:
        self._on_stop.append(callback)


class ThreadWorker:
    """Render on one thread of this process: for the CLI, the tests and the benchmarks' baselines."""

    depth = 1

    def __init__(
        self,
        render: Render,
        *,
        name: str = "thread",
        facts: Mapping[str, object] | None = None,
        serves: str | None = None,
    ) -> None:
        self.name = name
        self.serves = serves  # the candidate revision it renders; None: the production one
        self._render = render
        self._facts = dict(facts or {})
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu")

    async def ready(self) -> None:
        return

    async def render(self, call: Call) -> list[RenderedImage]:
        loop = asyncio.get_running_loop()

        def progress(step: int, total: int) -> None:
            # On the render thread: stop if asked, else hand the numbers to the loop.
            if call.stopping:
                raise RenderStopped
            loop.call_soon_threadsafe(call.on_progress, step, total)

        call.on_started()
        call.facts.update(self._facts)
        return await loop.run_in_executor(self._executor, self._render, call.specs, progress)

    async def close(self) -> None:
        """Wait for the batch in hand: a pipeline must never be driven by two threads at once."""
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)


# The bot's side: a batch's events, as a worker process or a remote worker sends them, answer its call.

BatchEvent = protocol.Started | protocol.Progress | protocol.Preview | Rendered | Failed

# What the scheduler is given for each way a batch can fail.
_RAISED: Mapping[FailureKind, Callable[[str], Exception]] = {
    FailureKind.OUT_OF_MEMORY: OutOfMemory,
    FailureKind.STOPPED: lambda _message: RenderStopped(),
    FailureKind.ERROR: RenderFailed,
}


def answer(
    call: Call,
    future: asyncio.Future[list[RenderedImage]],
    event: BatchEvent,
    facts: Mapping[str, object] | None = None,
) -> bool:
    """Pass one event of a batch on: its start, progress and preview frames to the call, its outcome to the future
    awaiting it (a frame after the outcome, or of an image the call did not ask for, is dropped).

    ``facts`` are what the caller knows of the worker that rendered it (``Call.facts``), added to the call's with the
    outcome's own. Return False for an outcome that came after the future was already answered (it is dropped).
    """
    if isinstance(event, protocol.Started):
        call.on_started()
    elif isinstance(event, protocol.Progress):
        call.on_progress(event.step, event.total)
    elif isinstance(event, protocol.Preview):
        if future.done() or call.on_preview is None or event.index not in call.previews:
            return False
        call.on_preview(event.index, event.step, event.total, event.jpeg)
    elif future.done():
        return False
    elif isinstance(event, Rendered):
        call.facts.update(facts or {})
        call.facts.update(compiled=event.compiled, seconds=event.seconds, peak_memory=event.peak_memory)
        future.set_result(list(event.images))
    else:
        future.set_exception(_RAISED[event.kind](event.message))
    return True


# The worker's side: what a local executor did, as the events the bot reads.


def failed(batch_id: int, error: Exception) -> Failed | None:
    """Return the ``Failed`` event that tells the bot why a batch did not render; None for an error that is a bug
    (the caller logs it, and says so in its own words)."""
    if isinstance(error, RenderStopped):
        return Failed(batch_id, FailureKind.STOPPED, "stopped")
    if isinstance(error, OutOfMemory):
        return Failed(batch_id, FailureKind.OUT_OF_MEMORY, str(error))
    if isinstance(error, BotError):
        return Failed(batch_id, FailureKind.ERROR, str(error))
    return None


def rendered(
    batch_id: int, images: Sequence[RenderedImage], facts: Mapping[str, object], *, seconds: float
) -> Rendered:
    """Return the ``Rendered`` event for a call's images, with what its worker said (``Call.facts``); ``seconds``
    stands in when the worker did not time the batch itself."""
    took, peak = facts.get("seconds"), facts.get("peak_memory")
    if not isinstance(took, int | float) or isinstance(took, bool):
        took = seconds
    return Rendered(
        batch_id,
        tuple(images),
        float(took),
        peak if isinstance(peak, int) and not isinstance(peak, bool) else None,
        facts.get("compiled") is True,
    )
