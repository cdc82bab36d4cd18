"""The bot's side of the GPU cluster: hand batches to remote workers through Redis, and read back what they did.

``ClusterPool`` is one scheduler ``Worker`` standing for every remote worker. The scheduler keeps admission, fairness
and batching, and SQLite keeps every job; the pool lets a slot take a batch only while a live worker has room for it
(``ready``), so the fair order is decided as late as with local workers. Redis carries only the batches in flight:
when it goes away, their jobs go back to the front of the queue without counting an attempt, ``ready`` waits, and
the pool reconnects by itself. The keys and entries are those of ``bot.cluster.wire``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import secrets
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from redis.typing import EncodableT, FieldT

from bot.cluster.broker import Backoff, Outage, connect, create_group, end, entries, kept, redacted, unreachable_errors
from bot.cluster.wire import BotInfo, Keys, WorkerInfo, exact_revision, pack, shown, unpack
from bot.config import ClusterConfig
from bot.engine.executor import BatchEvent, Call, RenderStopped, WorkerLost, answer
from bot.engine.protocol import RenderBatch, Rendered, Started
from bot.engine.types import RenderedImage

log = logging.getLogger(__name__)

DEPTH = 64  # scheduler slots; how many of them may hold a batch is what the live workers can take
_BROKEN = unreachable_errors()
_READ_BLOCK_MS = 1000
_READ_COUNT = 100
_STOP_SECONDS = 300  # how long a stop key waits for a worker to take its batch
_WORKERS_SHOWN = 8


@dataclass(eq=False, slots=True)
class _Flight:
    """A batch sent to the cluster and awaited."""

    batch_id: int
    call: Call
    future: asyncio.Future[list[RenderedImage]]
    entry_id: bytes | None = None  # its entry in the batches stream, once Redis answered the XADD
    started: bool = False


class _Trouble(Exception):
    """A command outside the supervisor's tasks found the broker gone; the supervisor reconnects."""


class ClusterPool:
    """Every remote worker of the cluster as one scheduler ``Worker``: a batch goes out when a live worker has room."""

    depth = DEPTH

    def __init__(self, config: ClusterConfig, *, model: str, revision: str, name: str = "cluster") -> None:
        if not config.enabled:
            raise ValueError("a cluster needs cluster.broker")
        self.name = name
        self.session = secrets.token_hex(8)  # new at every start: workers drop batches of an earlier session
        # The revision every worker must serve: the configured one when exact, else the first worker's.
        self.revision: str | None = revision if exact_revision(revision) else None
        self._config = config
        self._keys = Keys(config.prefix)
        self._model = model
        self._configured_revision = revision
        self._redis = connect(config.broker)  # the supervisor does the retrying
        self._outage = Outage(
            log,
            config.broker,
            begins="The cluster's broker at %(url)s is unreachable (%(reason)s): jobs keep their place in the queue "
            "until it is back",
            lasts="The cluster's broker is still unreachable: %(reason)s",
            ends="The cluster's broker at %(url)s is back after %(seconds).0f s: handing out batches again",
        )
        self._ids = itertools.count(1)
        self._flights: dict[int, _Flight] = {}
        self._workers: dict[str, WorkerInfo] = {}  # alive and serving the pinned revision
        self._refused: dict[str, str] = {}  # worker → the revision it was refused for (logged once)
        self._malformed: set[str] = set()  # heartbeat keys already reported unreadable
        self._holders: set[asyncio.Task[Any]] = set()  # slots holding a place, from ready() to their next ready()
        self._changed = asyncio.Event()  # set and replaced whenever room may have changed
        self._up = False
        self._connected_once = False
        self._alone_since: float | None = None  # when the last accepted worker left
        self._grace_until = 0.0  # after a reconnect, workers have a heartbeat's time to announce themselves again
        self._abandoned: list[tuple[int, bytes | None]] = []  # batches given up: stop them on the broker
        self._last_id = b"0-0"
        self._trouble = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._chores: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # What the scheduler and /queue see

    @property
    def up(self) -> bool:
        """Whether the broker answers."""
        return self._up

    @property
    def workers(self) -> list[WorkerInfo]:
        """The live workers serving the pinned revision, by name."""
        return [self._workers[name] for name in sorted(self._workers)]

    @property
    def parallel(self) -> int:
        return len(self._workers)

    def describe(self) -> str:
        if not self._up:
            if not self._outage.down:
                return "Connecting to the GPU cluster…"
            return "⚠️ The GPU cluster's broker is unreachable: your jobs keep their place and run when it is back."
        if not self._workers:
            return "⚠️ No GPU worker is up: your jobs keep their place and run when one joins."
        gpus = [f"{info.device_name or info.device} on {info.host}" for info in self.workers]
        shown = ", ".join(gpus[:_WORKERS_SHOWN])
        if len(gpus) > _WORKERS_SHOWN:
            shown += f" and {len(gpus) - _WORKERS_SHOWN} more"
        return f"Workers: {len(gpus)} up — {shown}"

    # The scheduler's Worker

    def start(self) -> None:
        """Connect in the background: until the broker answers and a worker is up, ``ready`` waits."""
        if self._supervisor is not None:
            raise RuntimeError("cluster pool already started")
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise(), name="cluster-broker")

    async def close(self) -> None:
        """Stop talking to the broker; workers see no bot announcement and wait for the next one."""
        for task in [task for task in (self._supervisor, *self._chores) if task is not None]:
            await end(task)
        self._fail_flights(WorkerLost("the cluster pool was closed", blameless=True))
        if self._up:
            self._up = False
            with contextlib.suppress(*_BROKEN, TimeoutError):
                async with asyncio.timeout(2):
                    await self._send_stops()
                    await kept(self._redis.delete(self._keys.bot))
        await self._redis.aclose()

    async def ready(self) -> None:
        """Return once a live worker has room for one more batch; the calling slot holds that room until it asks
        again (so a batch split after running out of memory keeps its place)."""
        slot = asyncio.current_task()
        assert slot is not None
        if slot in self._holders:
            self._holders.discard(slot)
            self._notify()
        while not self._has_room():
            await self._changed.wait()
        self._holders.add(slot)

    async def render(self, call: Call) -> list[RenderedImage]:
        if not self._up:
            raise WorkerLost("the cluster's broker is unreachable", blameless=True)
        if call.stopping:
            raise RenderStopped
        batch_id = next(self._ids)
        flight = _Flight(batch_id, call, asyncio.get_running_loop().create_future())
        self._flights[batch_id] = flight
        call.when_stopped(lambda: self._stop(flight))
        try:
            try:
                entry: dict[FieldT, EncodableT] = {**pack(RenderBatch(batch_id, call.specs), session=self.session)}
                entry_id = await kept(self._redis.xadd(self._keys.batches, entry))
            except _BROKEN as error:
                self._lost(error)  # which fails this flight too
            else:
                flight.entry_id = entry_id if isinstance(entry_id, bytes) else entry_id.encode()
                if flight.future.done() and self._up:  # stopped while its entry was on the way: delete it too
                    self._abandoned.append((batch_id, flight.entry_id))
                    self._spawn(self._send_stops())
            return await flight.future
        finally:
            del self._flights[batch_id]
            if not flight.future.done():  # the slot was cancelled (the scheduler is closing): stop it for workers
                flight.future.cancel()
                self._abandoned.append((batch_id, flight.entry_id))

    # Room

    def _has_room(self) -> bool:
        self._holders = {slot for slot in self._holders if not slot.done()}
        return self._up and len(self._holders) < sum(info.depth for info in self._workers.values())

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # The connection

    async def _supervise(self) -> None:
        """Keep the broker connected: announce the bot, watch the workers, read their events; reconnect when lost."""
        backoff = Backoff()
        while True:
            try:
                await self._connect()
                backoff.reset()
                await self._keep_up()
            except _BROKEN as error:
                self._lost(error)
            except _Trouble:
                pass  # already noted by whoever found it
            except Exception as error:
                log.error("The cluster connection failed", exc_info=error)
                self._lost(error)
            await asyncio.sleep(backoff.next())

    async def _keep_up(self) -> None:
        """Beat, read events and watch for trouble until one of them fails; raise what it raised.

        Not an asyncio.TaskGroup: in Python 3.11 one whose child fails while it waits leaves its task marked as
        being cancelled, which ``kept`` would take for a real cancellation.
        """
        loop = asyncio.get_running_loop()
        tasks = [
            loop.create_task(self._beat(), name="cluster-heartbeat"),
            loop.create_task(self._read(), name="cluster-events"),
            loop.create_task(self._watch(), name="cluster-watch"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                await end(task)
        # What the first to end raised, reading every task's outcome so that none is reported as never retrieved.
        errors = [error for task in (*done, *tasks) if not task.cancelled() and (error := task.exception())]
        if errors:
            raise errors[0]

    async def _connect(self) -> None:
        await kept(create_group(self._redis, self._keys.batches))
        self._trouble.clear()
        self._last_id = b"0-0"  # what is left on the events stream is for batches given up: read and drop it
        if self._connected_once:
            self._grace_until = time.monotonic() + 3 * self._config.heartbeat
        await self._scan()
        await self._announce()
        self._up = True
        self._outage.answered(quiet=not self._connected_once)  # the first connection is no return
        if not self._connected_once:
            log.info(
                "Connected to the cluster's broker at %s: session %s, model %s, revision %s",
                redacted(self._config.broker),
                self.session,
                self._model,
                self.revision or f"{self._configured_revision} (pinned by the first worker)",
            )
        self._connected_once = True
        self._notify()
        await self._send_stops()

    async def _watch(self) -> None:
        await self._trouble.wait()
        raise _Trouble

    def _lost(self, error: BaseException) -> None:
        """Note that the broker went away: no batch goes out until it is back, and the jobs in flight go back in line
        (Redis may have lost their batches; nothing they did caused it)."""
        self._outage.failed(error)
        self._up = False
        self._trouble.set()
        self._fail_flights(WorkerLost("the cluster's broker is unreachable", blameless=True))
        self._notify()

    # Announcements

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self._config.heartbeat)
            await self._scan()
            await self._announce()
            self._give_up_orphans()

    async def _announce(self) -> None:
        info = BotInfo(self.session, self._model, self.revision, self._config.lease)
        heartbeat = self._config.heartbeat
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(self._keys.bot, info.dump(), ex=math.ceil(3 * heartbeat))
            # The events stream outlives a bot that stopped only by this long.
            pipe.expire(self._keys.events(self.session), math.ceil(max(60.0, 10 * self._config.lease)))
            await kept(pipe.execute())

    async def _scan(self) -> None:
        keys: list[bytes | str] = []
        cursor = 0
        while True:
            cursor, found = await kept(
                self._redis.scan(  # pyright: ignore[reportUnknownMemberType] (untyped **kwargs)
                    cursor, match=self._keys.workers, count=100
                )
            )
            keys += found
            if not cursor:
                break
        seen: dict[str, WorkerInfo] = {}
        values = await kept(self._redis.mget(keys)) if keys else []
        for key, value in zip(keys, values, strict=True):
            if value is None:
                continue  # it expired between the two commands
            try:
                info = WorkerInfo.load(value)
            except (ValueError, KeyError, TypeError) as error:
                name = key.decode(errors="replace") if isinstance(key, bytes) else key
                if name not in self._malformed:
                    self._malformed.add(name)
                    log.warning("Ignoring an unreadable worker heartbeat at %s: %r", name, error)
                continue
            seen[info.name] = info
        self._update_workers(seen)

    def _update_workers(self, seen: Mapping[str, WorkerInfo]) -> None:
        """Take in the heartbeats just read: pin a revision, accept or refuse workers, and note who left."""
        now = time.monotonic()
        accepted: set[str] = set()
        for info in sorted(seen.values(), key=lambda info: info.started_at):
            if info.revision is None:
                continue  # still resolving what it serves
            if self.revision is None:
                self.revision = info.revision
                log.info(
                    "Pinned revision %s of %s, served by worker %s (model.revision is %s): workers serving another "
                    "are refused",
                    info.revision,
                    self._model,
                    info.name,
                    self._configured_revision,
                )
            if info.revision != self.revision:
                if self._refused.get(info.name) != info.revision:
                    self._refused[info.name] = info.revision
                    log.warning(
                        "Refused worker %s: it serves revision %s; the bot is pinned to %s",
                        info.name,
                        info.revision,
                        self.revision,
                    )
                self._workers.pop(info.name, None)
                continue
            self._refused.pop(info.name, None)
            accepted.add(info.name)
            if info.name not in self._workers:
                log.info("Worker %s joined: %s", info.name, info.describe())
            self._workers[info.name] = info
        for name in [name for name in self._workers if name not in accepted]:
            if name in seen or now < self._grace_until:
                continue
            info = self._workers.pop(name)
            log.info("Worker %s left: its heartbeat stopped (device %s on %s)", name, info.device_name, info.host)
        for name in [name for name in self._refused if name not in seen]:
            del self._refused[name]
        if self._workers:
            self._alone_since = None
        elif self._alone_since is None:
            self._alone_since = now
        self._notify()

    def _give_up_orphans(self) -> None:
        """With no worker at all for longer than the lease, put the batches sent back in line, to go out again in fair
        order when a worker joins. Left in Redis, a returning worker would claim them too, but until then their jobs
        would show as rendering, and a shutdown would wait for their stop to be answered by nobody.

        A job that was on a GPU counts an attempt, as when a local worker dies: a batch that crashes every worker
        that claims it must not take the whole cluster down again and again."""
        if self._alone_since is None or time.monotonic() - self._alone_since <= self._config.lease:
            return
        orphans = [flight for flight in self._flights.values() if not flight.future.done()]
        if orphans:
            log.warning(
                "No GPU worker has been up for %.0f s: %d batch%s go back in the queue until one joins",
                time.monotonic() - self._alone_since,
                len(orphans),
                "" if len(orphans) == 1 else "es",
            )
            self._fail_flights(WorkerLost("no GPU worker is up"))
            self._spawn(self._send_stops())

    # Batches

    def _fail_flights(self, error: WorkerLost) -> None:
        """Fail every awaited batch (the scheduler puts its jobs back in line) and remember to stop it on the broker."""
        # Each batch's jobs go to the front of the line as they fail: the last sent fails first, so the line keeps
        # the order the batches were sent in.
        for flight in reversed(self._flights.values()):
            if not flight.future.done():
                flight.future.set_exception(error)
                self._abandoned.append((flight.batch_id, flight.entry_id))

    def _stop(self, flight: _Flight) -> None:
        """Stop a batch nobody wants any more: one not yet started is answered at once, since no worker may ever
        take it (the bot may be shutting down with none up); one started ends with the worker's answer."""
        if self._flights.get(flight.batch_id) is not flight or flight.future.done():
            return
        if not flight.started:
            flight.future.set_exception(RenderStopped())
            self._abandoned.append((flight.batch_id, flight.entry_id))
        else:
            self._abandoned.append((flight.batch_id, None))  # its worker holds the entry, and answers the stop
        if self._up:
            self._spawn(self._send_stops())

    async def _send_stops(self) -> None:
        """Set the stop keys of the batches given up and delete those not started, so no worker renders them."""
        if not self._abandoned:
            return
        abandoned, self._abandoned = self._abandoned, []
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for batch_id, entry_id in abandoned:
                    pipe.set(self._keys.stop(self.session, batch_id), 1, ex=_STOP_SECONDS)
                    if entry_id is not None:
                        pipe.xdel(self._keys.batches, entry_id)
                await kept(pipe.execute())
        except _BROKEN:
            self._abandoned.extend(abandoned)  # sent once the broker is back
            raise

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        async def chore() -> None:
            try:
                await work
            except _BROKEN as error:
                self._lost(error)

        task = asyncio.get_running_loop().create_task(chore())
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    # Events

    async def _read(self) -> None:
        """Read this session's events stream and hand each event to the batch it names; delete what was read."""
        stream = self._keys.events(self.session)
        while True:
            reply = await kept(self._redis.xread({stream: self._last_id}, count=_READ_COUNT, block=_READ_BLOCK_MS))
            ids: list[bytes] = []
            for entry_id, fields in entries(reply):
                ids.append(entry_id)
                self._dispatch(fields)
            if ids:
                self._last_id = ids[-1]
                await kept(self._redis.xdel(stream, *ids))

    def _dispatch(self, fields: Mapping[bytes, bytes]) -> None:
        try:
            message, plain = unpack(fields)
        except ValueError as error:
            log.warning("Dropped an unreadable event from the cluster: %s", error)
            return
        if not isinstance(message, BatchEvent):
            log.warning("Dropped a %s message from the cluster: only batch events belong there", type(message).__name__)
            return
        worker = shown(plain.get("worker", ""))  # named as its heartbeat names it (WorkerInfo.load)
        flight = self._flights.get(message.batch_id)
        if flight is None or flight.future.done():
            log.debug(
                "Dropped %s of batch %d from worker %s: nobody awaits it (a late duplicate, or a batch given up)",
                type(message).__name__,
                message.batch_id,
                worker or "?",
            )
            return
        facts: dict[str, object] = {}
        if isinstance(message, Started):
            flight.started = True
            flight.call.facts["worker"] = worker or self.name
        elif isinstance(message, Rendered):
            if worker in self._refused:
                log.warning("Dropped batch %d from worker %s: it serves another revision", message.batch_id, worker)
                flight.future.set_exception(WorkerLost(f"worker {worker} serves another revision", blameless=True))
                return
            info = self._workers.get(worker)
            facts = {
                "worker": worker or self.name,
                "revision": info.revision if info is not None else self.revision,
                "dtype": info.dtype if info is not None else None,
            }
        answer(flight.call, flight.future, message, facts)
