"""The bot's side of a GPU worker process: start it, hand it batches, watch it, and start a new one when it dies.

Nothing here imports torch: the model lives only in the worker (``bot.engine.worker``). Workers are forked from a
forkserver that has already imported torch and diffusers, so a restart after a crash costs the model load, not the
imports, and no worker inherits the bot's threads or a CUDA context.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import threading
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

from bot.engine.executor import Call, RenderStopped, WorkerLost, answer
from bot.engine.protocol import (
    FromWorker,
    Hello,
    LoadFailed,
    RenderBatch,
    Rendered,
    Shutdown,
    StopBatch,
    ToWorker,
    WorkerSettings,
    decode,
    encode,
)
from bot.engine.types import RenderedImage
from bot.errors import HubUnreachable, ModelError

log = logging.getLogger(__name__)

_RESTART_DELAYS = (0.0, 1.0, 2.0, 5.0, 10.0, 30.0)  # after each crash in a row; a minute of health resets it
_HEALTHY_SECONDS = 60.0
_STOP_SECONDS = 10.0  # a worker told to shut down that is still there after this is killed

_context: Any = None


def _forkserver() -> Any:
    """Return the multiprocessing context workers start from, preloading the worker's imports once."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(["bot.engine.worker"])
    return _context


class WorkerProcess:
    """One GPU worker process, supervised: render calls go to it; when it dies, the calls it held fail with
    ``WorkerLost`` and a new process takes its place."""

    depth = 2  # one batch on the GPU, the next being prepared beside it

    def __init__(
        self, settings: WorkerSettings, *, name: str | None = None, announce: bool = True, serves: str | None = None
    ) -> None:
        self.name = name or settings.device
        self.settings = settings
        self.serves = serves  # the candidate revision (model.candidates) it loaded; None: the production one
        self.announce = announce  # False: its first ready line is a debug one, as its caller announces the device
        self.hello: Hello | None = None
        self.restarts = 0
        self.peak_memory: int | None = None  # the most GPU memory a batch has used, in bytes, where reported
        self._ids = itertools.count(1)
        self._calls: dict[int, tuple[Call, asyncio.Future[list[RenderedImage]]]] = {}
        self._ready = asyncio.Event()
        self._process: Any = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._incarnation = 0
        self._hello_waiter: asyncio.Future[Hello] | None = None
        self._restarting: asyncio.Task[None] | None = None
        self._closing = False
        self._crashes = 0
        self._last_start = 0.0

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def pid(self) -> int | None:
        return self.hello.pid if self.hello is not None else None

    @property
    def alive(self) -> bool:
        return self._ready.is_set()

    @property
    def kind(self) -> str:
        """What the log calls it: "CPU worker" or "GPU worker"."""
        return "CPU worker" if self.settings.device == "cpu" else "GPU worker"

    async def start(self) -> Hello:
        """Start the process and wait until its model is loaded and warmed up; raise a ModelError or HubUnreachable."""
        loop = asyncio.get_running_loop()
        context = _forkserver()
        ours, theirs = context.Pipe()
        process = context.Process(
            target=_worker_main, args=(theirs, self.settings), name=f"sygil-worker-{self.name}", daemon=True
        )
        self._incarnation += 1
        incarnation = self._incarnation
        self._hello_waiter = loop.create_future()
        self._last_start = time.monotonic()
        # Starting blocks until the forkserver forks, which the first time waits for its imports.
        await asyncio.to_thread(process.start)
        theirs.close()  # so that the worker's death reads as end-of-file here
        self._process, self._conn = process, ours
        threading.Thread(
            target=self._read, args=(ours, process, incarnation, loop), name=f"worker-{self.name}-reader", daemon=True
        ).start()
        try:
            hello = await self._hello_waiter
        finally:
            self._hello_waiter = None
        first = self.hello is None
        self.hello = hello
        self._ready.set()
        # A restart is always news; a first start may be its caller's to announce.
        log.log(
            logging.INFO if self.announce or not first else logging.DEBUG,
            "%s %s ready: pid %d on %s (%s), loaded and warmed up in %.1f s%s",
            self.kind,
            self.name,
            hello.pid,
            hello.device,
            hello.device_name,
            hello.warmup_seconds,
            f"; {_describe(hello.engine)}" if hello.engine else "",
        )
        return hello

    async def ready(self) -> None:
        await self._ready.wait()

    async def render(self, call: Call) -> list[RenderedImage]:
        if not self._ready.is_set() or self._conn is None:
            raise WorkerLost(f"worker {self.name} is restarting")
        if call.stopping:
            raise RenderStopped
        batch_id = next(self._ids)
        future: asyncio.Future[list[RenderedImage]] = asyncio.get_running_loop().create_future()
        self._calls[batch_id] = (call, future)
        call.when_stopped(lambda: self._send(StopBatch(batch_id)))
        try:
            self._send(RenderBatch(batch_id, call.specs, call.previews))
            return await future
        finally:
            self._calls.pop(batch_id, None)

    async def close(self) -> None:
        """Tell the worker to stop, and kill it if it has not gone within a few seconds."""
        self._closing = True
        self._ready.clear()
        if self._restarting is not None:
            self._restarting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._restarting
        process = self._process
        if process is None:
            return
        self._send(Shutdown())
        await asyncio.to_thread(process.join, _STOP_SECONDS)
        if process.is_alive():
            log.warning("%s %s did not stop within %.0f s; killing it", self.kind, self.name, _STOP_SECONDS)
            process.kill()
            await asyncio.to_thread(process.join)
        self._fail_calls(WorkerLost(f"worker {self.name} was closed"))

    def kill(self) -> None:
        """Kill the worker process at once (what a crash does); the supervisor starts a new one."""
        if self._process is not None:
            self._process.kill()

    def _send(self, message: ToWorker) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            conn.send(encode(message))
        except (BrokenPipeError, OSError):
            pass  # the worker is gone; its reader reports that and the supervisor starts a new one

    def _read(
        self,
        conn: multiprocessing.connection.Connection,
        process: Any,
        incarnation: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """Pass the worker's messages to the loop until its pipe closes (on this process's own thread)."""
        while True:
            try:
                message = decode(conn.recv())
            except (EOFError, OSError):
                break
            except ValueError:
                log.exception("%s %s sent a malformed message", self.kind, self.name)
                continue
            if isinstance(message, RenderBatch | StopBatch | Shutdown):
                log.error("%s %s sent a message meant for workers: %r", self.kind, self.name, message)
                continue
            with contextlib.suppress(RuntimeError):  # the loop closed: the bot is gone
                loop.call_soon_threadsafe(self._on_message, incarnation, message)
        process.join(5)
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._on_exit, incarnation, process.exitcode)

    def _on_message(self, incarnation: int, message: FromWorker) -> None:
        if incarnation != self._incarnation:
            return
        if isinstance(message, Hello | LoadFailed):
            waiter = self._hello_waiter
            if waiter is not None and not waiter.done():
                if isinstance(message, Hello):
                    waiter.set_result(message)
                else:
                    waiter.set_exception((HubUnreachable if message.unreachable else ModelError)(message.message))
            return
        entry = self._calls.get(message.batch_id)
        if entry is None:
            return  # a call the scheduler gave up on (it was cancelled or the bot is closing)
        call, future = entry
        engine: Mapping[str, Any] = self.hello.engine if self.hello is not None else {}
        facts = {"revision": engine.get("revision"), "dtype": engine.get("dtype")}
        if answer(call, future, message, facts) and isinstance(message, Rendered) and message.peak_memory is not None:
            self.peak_memory = max(self.peak_memory or 0, message.peak_memory)

    def _on_exit(self, incarnation: int, exitcode: int | None) -> None:
        if incarnation != self._incarnation:
            return
        self._ready.clear()
        self._conn = None
        waiter = self._hello_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(
                ModelError(f"The {self.kind} {self.name} exited (code {exitcode}) while loading the model")
            )
        if self._closing:
            return
        log.error("%s %s (pid %s) died with exit code %s", self.kind, self.name, self.pid, exitcode)
        self._fail_calls(WorkerLost(f"worker {self.name} exited with code {exitcode}"))
        if self.hello is not None and self._restarting is None:
            self._restarting = asyncio.get_running_loop().create_task(self._restart(), name=f"restart-{self.name}")

    def _fail_calls(self, error: Exception) -> None:
        for _call, future in list(self._calls.values()):
            if not future.done():
                future.set_exception(error)
        self._calls.clear()

    async def _restart(self) -> None:
        """Start new worker processes until one is ready, waiting longer after each crash in a row."""
        try:
            while not self._closing:
                if time.monotonic() - self._last_start > _HEALTHY_SECONDS:
                    self._crashes = 0
                delay = _RESTART_DELAYS[min(self._crashes, len(_RESTART_DELAYS) - 1)]
                self._crashes += 1
                if delay:
                    log.info("Starting %s %s again in %.0f s", self.kind, self.name, delay)
                    await asyncio.sleep(delay)
                try:
                    await self.start()
                except (ModelError, HubUnreachable) as error:
                    log.error("%s %s could not start again: %s", self.kind, self.name, error)
                    continue
                # Starting can also fail outside the model (the forkserver, the operating system); keep trying.
                except Exception:
                    log.exception("%s %s could not start again", self.kind, self.name)
                    continue
                self.restarts += 1
                return
        finally:
            self._restarting = None


def _worker_main(conn: multiprocessing.connection.Connection, settings: WorkerSettings) -> None:
    """Run the worker; imported here in the worker only, so the bot itself never loads torch."""
    from bot.engine.worker import main

    main(conn, settings)


def _describe(engine: Mapping[str, Any]) -> str:
    return ", ".join(f"{key} {value}" for key, value in engine.items())
