"""The GPU worker process: one model on one device, rendering the batches the bot sends (see ``protocol``).

The bot starts it (``bot.engine.process``) and restarts it when it dies: a CUDA fault, a segfault or an exhausted
GPU ends this process only. It exits on its own when the bot goes away, so a killed bot never leaves a GPU held.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
import queue
import re
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from bot.engine.executor import RenderStopped, failed
from bot.engine.loading import DTYPES
from bot.engine.pipeline import Decoded, Engine, Prepared
from bot.engine.preview import Previewer
from bot.engine.protocol import (
    Failed,
    FailureKind,
    FromWorker,
    Hello,
    LoadFailed,
    Preview,
    Progress,
    RenderBatch,
    Rendered,
    Shutdown,
    Started,
    StopBatch,
    WorkerSettings,
    decode,
    encode,
)
from bot.errors import BotError, HubUnreachable, OutOfMemory

log = logging.getLogger(__name__)

# Faults and moments the tests need but a CPU cannot produce on cue, injected through the environment.
_OOM_ABOVE = "SYGIL_TEST_OOM_ABOVE"  # batches of more images than this run out of memory
_OOM_PROMPT = "SYGIL_TEST_OOM_PROMPT"  # batches holding a prompt with this text run out of memory
# A batch whose prompt holds the word ``hold-NAME`` stops after its first step, writes a line (pid, the pid of the
# bot or remote worker host that started this process, batch id) to NAME.held in this folder, and goes on once
# NAME.release exists there (or stops, if asked). So a test catches a batch mid-render however fast the machine is.
_HOLD_DIR = "SYGIL_TEST_HOLD_DIR"
# With steps listed here ("5,10"), such a batch holds at each of them instead, after that step's preview frame (if
# any) went to the bot: it writes NAME.STEP.held and waits for NAME.STEP.release.
_HOLD_STEPS = "SYGIL_TEST_HOLD_STEPS"
_HOLD_WORD = re.compile(r"\bhold-([a-z0-9]+)\b")
_HOLD_POLL = 0.01
EXIT_CUDA_FAULT = 70


def main(conn: Connection, settings: WorkerSettings) -> None:
    """Serve until the bot says to shut down or goes away; run as the worker process's target."""
    logging.basicConfig(
        level=logging.DEBUG if settings.verbose else logging.INFO,
        format=f"%(asctime)s %(levelname)-7s %(name)s[{settings.device} pid {os.getpid()}]: %(message)s",
    )
    # The bot decides when this process ends (through the pipe, or by going away): a Ctrl-C or a SIGTERM sent to the
    # whole process group must not cut the batch in hand short while the bot is finishing it within its grace.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.environ.update(settings.environ)
    _Worker(conn, settings).run()


class _Worker:
    """Three stages on three threads, so the GPU never waits for the CPU between batches:

    - prepare (its own thread): tokenise and encode the prompts and decode init images of the next batch;
    - denoise (the main thread): the UNet steps and the VAE decode, the GPU's work;
    - finish (its own thread): the safety checker and PNG encoding, then the images go to the bot.
    """

    def __init__(self, conn: Connection, settings: WorkerSettings) -> None:
        self._conn = conn
        self._settings = settings
        self._send_lock = threading.Lock()
        self._inbox: queue.SimpleQueue[RenderBatch | None] = queue.SimpleQueue()
        # One batch prepared ahead: enough to hide its preparation, without fixing the order of later ones early.
        self._prepared: queue.Queue[tuple[RenderBatch, Prepared] | None] = queue.Queue(maxsize=1)
        self._stopped: set[int] = set()
        # Batches received and not started, and those of them already answered as stopped: a stop for a batch that
        # waits behind the GPU is answered at once, so the bot can put its jobs back in line (a pause).
        self._state_lock = threading.Lock()
        self._unstarted: set[int] = set()
        self._answered: set[int] = set()
        self._shutting_down = False
        self._oom_above = int(os.environ.get(_OOM_ABOVE, "0") or 0)
        self._oom_prompt = os.environ.get(_OOM_PROMPT, "")
        hold_dir = os.environ.get(_HOLD_DIR, "")
        self._hold_dir = Path(hold_dir) if hold_dir else None
        steps = os.environ.get(_HOLD_STEPS, "")
        self._hold_steps = frozenset(int(step) for step in steps.split(",") if step.strip()) if steps else None
        self._previewer: Previewer | None = None

    def run(self) -> None:
        settings = self._settings
        if settings.threads is not None:
            torch.set_num_threads(settings.threads)
        started = time.perf_counter()
        try:
            engine = Engine.load(
                settings.model_id,
                device=settings.device,
                dtype=settings.dtype,
                scheduler=settings.scheduler,
                safety_checker=settings.safety_checker,
                options=settings.options,
                revision=settings.revision,
            )
            engine.warm_up()
            if settings.preview is not None:
                dtype = DTYPES.get(settings.dtype, torch.float32)
                self._previewer = Previewer.load(settings.preview, device=settings.device, dtype=dtype)
                if self._previewer is not None and engine.checks_safety:
                    self._previewer.unsafe = lambda pixels: engine.screen(pixels[None])[1][0]
        except BotError as error:
            self._send(LoadFailed(str(error), unreachable=isinstance(error, HubUnreachable)))
            return
        # Whatever else goes wrong while loading (a driver fault, a corrupt file) is reported the same way, so
        # the bot's operator reads one line instead of a dead process.
        except Exception as error:
            log.exception("Loading the model failed")
            self._send(LoadFailed(f"Could not load model {settings.model_id!r} on {settings.device}: {error}"))
            return
        ready = time.perf_counter() - started
        device_name = torch.cuda.get_device_name(settings.device) if settings.device.startswith("cuda") else "cpu"
        self._send(Hello(os.getpid(), settings.device, device_name, round(ready, 3), engine.describe()))
        threading.Thread(target=self._read, name="worker-inbox", daemon=True).start()
        threading.Thread(target=self._prepare_all, args=(engine,), name="worker-prepare", daemon=True).start()
        with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker-finish") as finisher:
            while (item := self._prepared.get()) is not None:
                self._denoise(engine, finisher, *item)

    def _read(self) -> None:
        """Take the bot's messages as they come, so a stop reaches a batch mid-render."""
        try:
            while True:
                message = decode(self._conn.recv())
                if isinstance(message, RenderBatch):
                    with self._state_lock:
                        self._unstarted.add(message.batch_id)
                    self._inbox.put(message)
                elif isinstance(message, StopBatch):
                    self._stop(message.batch_id)
                elif isinstance(message, Shutdown):
                    self._shutting_down = True  # the batch in hand stops at its next step; no other starts
                    break
        except (EOFError, OSError):
            log.info("The bot went away; exiting")
            self._shutting_down = True
        self._inbox.put(None)

    def _stop(self, batch_id: int) -> None:
        """Stop a batch: one not started is answered now; one on the GPU stops at its next step."""
        with self._state_lock:
            unstarted = batch_id in self._unstarted
            if unstarted:
                self._unstarted.discard(batch_id)
                self._answered.add(batch_id)
            else:
                self._stopped.add(batch_id)
        if unstarted:
            self._send(Failed(batch_id, FailureKind.STOPPED, "stopped before it started"))

    def _answered_already(self, batch_id: int, *, starting: bool) -> bool:
        """Return whether a batch was answered as stopped before it started (then forget it); note a start."""
        with self._state_lock:
            if batch_id in self._answered:
                self._answered.discard(batch_id)
                return True
            if starting:
                self._unstarted.discard(batch_id)
            return False

    def _prepare_all(self, engine: Engine) -> None:
        while (batch := self._inbox.get()) is not None:
            if self._answered_already(batch.batch_id, starting=False):
                continue
            if self._wants_stop(batch.batch_id):
                self._send(Failed(batch.batch_id, FailureKind.STOPPED, "stopped before it started"))
                continue
            try:
                self._inject_faults(batch)
                prepared = engine.prepare(batch.specs)
            except Exception as error:
                self._fail(batch, error)
                continue
            self._prepared.put((batch, prepared))
        self._prepared.put(None)

    def _denoise(
        self, engine: Engine, finisher: concurrent.futures.Executor, batch: RenderBatch, prepared: Prepared
    ) -> None:
        batch_id = batch.batch_id
        if self._answered_already(batch_id, starting=True):
            return
        if self._wants_stop(batch_id):
            self._send(Failed(batch_id, FailureKind.STOPPED, "stopped before it started"))
            return
        self._send(Started(batch_id))
        started = time.perf_counter()

        def progress(step: int, total: int) -> None:
            if self._wants_stop(batch_id):
                raise RenderStopped
            self._send(Progress(batch_id, step, total))
            if step == 1 and self._hold_dir is not None and self._hold_steps is None:
                self._hold(batch)

        frames = _Frames(self, batch)
        holds = self._hold_dir is not None and self._hold_steps is not None
        try:
            decoded = engine.denoise(prepared, progress, latents=frames if frames.wanted or holds else None)
        except Exception as error:
            self._fail(batch, error)
            return
        finisher.submit(self._finish, engine, batch, decoded, started, prepared.compiled, frames)

    def _finish(
        self,
        engine: Engine,
        batch: RenderBatch,
        decoded: Decoded,
        started: float,
        compiled: bool,
        frames: _Frames,
    ) -> None:
        try:
            images = engine.finish(decoded)
        except Exception as error:
            self._fail(batch, error)
            return
        finally:
            self._stopped.discard(batch.batch_id)
        seconds = time.perf_counter() - started
        frames.wait()  # the bot gets no frame after the images
        self._send(Rendered(batch.batch_id, tuple(images), seconds, engine.peak_memory(), compiled))

    def _wants_stop(self, batch_id: int) -> bool:
        return self._shutting_down or batch_id in self._stopped

    def _fail(self, batch: RenderBatch, error: Exception) -> None:
        """Tell the bot why a batch did not render; exit if the device can no longer be trusted."""
        batch_id = batch.batch_id
        self._stopped.discard(batch_id)
        with self._state_lock:
            self._unstarted.discard(batch_id)
        if isinstance(error, OutOfMemory | torch.OutOfMemoryError):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.warning("Out of memory rendering %d images: %s", len(batch.specs), error)
            message = f"The GPU ran out of memory rendering {len(batch.specs)} images at {_size(batch)}."
            self._send(Failed(batch_id, FailureKind.OUT_OF_MEMORY, message))
        elif (failure := failed(batch_id, error)) is not None:  # stopped, or an error whose message is for users
            self._send(failure)
        elif isinstance(error, ValueError):
            self._send(Failed(batch_id, FailureKind.ERROR, str(error)))
        # Anything else is a bug or a device fault. A CUDA fault leaves the context unusable: exit, and the bot
        # restarts this worker and gives the batch to a fresh one. Any other bug fails only this batch.
        elif _is_device_fault(error):
            log.critical("Device fault; exiting so the bot starts a fresh worker", exc_info=error)
            os._exit(EXIT_CUDA_FAULT)
        else:
            log.error("Rendering a batch of %d images failed", len(batch.specs), exc_info=error)
            self._send(
                Failed(batch_id, FailureKind.ERROR, f"Rendering failed ({type(error).__name__}); it was logged.")
            )

    def _inject_faults(self, batch: RenderBatch) -> None:
        if self._oom_above and len(batch.specs) > self._oom_above:
            raise torch.OutOfMemoryError(f"injected: more than {self._oom_above} images")
        if self._oom_prompt and any(self._oom_prompt in spec.prompt for spec in batch.specs):
            raise torch.OutOfMemoryError(f"injected: a prompt holds {self._oom_prompt!r}")

    def _hold(self, batch: RenderBatch, step: int | None = None) -> None:
        """Wait, mid-render, until the test releases each hold this batch's prompts name (see ``_HOLD_DIR``)."""
        assert self._hold_dir is not None
        names = sorted({name for spec in batch.specs for name in _HOLD_WORD.findall(spec.prompt)})
        for name in names:
            hold = name if step is None else f"{name}.{step}"
            release = self._hold_dir / f"{hold}.release"
            if release.exists():
                continue
            with (self._hold_dir / f"{hold}.held").open("a", encoding="utf-8") as held:
                # The bot or `sygil-bot worker` that started this process (its parent is the forkserver).
                parent = multiprocessing.parent_process()
                held.write(f"{os.getpid()} {parent.pid if parent else os.getppid()} {batch.batch_id}\n")
            while not release.exists():
                if self._wants_stop(batch.batch_id):
                    raise RenderStopped
                time.sleep(_HOLD_POLL)

    def _send(self, message: FromWorker) -> None:
        data = encode(message)
        with self._send_lock:
            try:
                self._conn.send(data)
            except (BrokenPipeError, OSError):
                # The bot is gone; nobody will read this. Exit without a traceback.
                os._exit(0)


class _Frames:
    """A batch's preview frames: which steps get one (every ``preview.every`` steps, at most one per
    ``preview.min_interval`` seconds, none at the last step), decoded on the GPU thread, encoded and sent beside it."""

    def __init__(self, worker: _Worker, batch: RenderBatch) -> None:
        self._worker = worker
        self._batch = batch
        previewer = worker._previewer  # pyright: ignore[reportPrivateUsage]
        self._previewer = previewer if batch.previews else None
        self._last: float | None = None  # when the batch's last frame was decoded
        self._pending: list[concurrent.futures.Future[None]] = []

    @property
    def wanted(self) -> bool:
        return self._previewer is not None

    def due(self, step: int, total: int, now: float) -> bool:
        previewer = self._previewer
        if previewer is None or step % previewer.options.every or step >= total:
            return False
        return self._last is None or now - self._last >= previewer.options.min_interval

    def __call__(self, step: int, total: int, latents: torch.Tensor) -> None:
        """Send a frame of the step's latents if one is due; then hold the batch there if a test asks to."""
        previewer, batch = self._previewer, self._batch
        if previewer is not None and self.due(step, total, time.monotonic()):
            self._last = time.monotonic()
            try:
                pixels = previewer.decode(latents, batch.previews)
            except Exception:  # out of memory in the preview decoder, say: the batch goes on without frames
                log.warning("Decoding a preview frame failed; this batch goes on without them", exc_info=True)
                self._previewer = None
            else:
                for index, image in zip(batch.previews, pixels, strict=True):
                    self._pending.append(previewer.send(image, self._deliver(index, step, total)))
        worker = self._worker
        if worker._hold_steps is not None and step in worker._hold_steps:  # pyright: ignore[reportPrivateUsage]
            self.wait()
            worker._hold(batch, step)  # pyright: ignore[reportPrivateUsage]

    def _deliver(self, index: int, step: int, total: int) -> Callable[[bytes], None]:
        def deliver(jpeg: bytes) -> None:
            self._worker._send(Preview(self._batch.batch_id, index, step, total, jpeg))  # pyright: ignore[reportPrivateUsage]

        return deliver

    def wait(self) -> None:
        """Return once every frame so far has gone to the bot."""
        concurrent.futures.wait(self._pending)


def _size(batch: RenderBatch) -> str:
    settings = batch.specs[0].settings
    return f"{settings.width}x{settings.height}"


def _is_device_fault(error: BaseException) -> bool:
    """Return whether an error means the device context is no longer usable."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(error, accelerator_error):
        return True
    return isinstance(error, RuntimeError) and "CUDA error" in str(error)
