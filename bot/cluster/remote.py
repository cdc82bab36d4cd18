"""The remote worker (``sygil-bot worker``): render the bot's batches from Redis on this host's GPUs.

The model runs here the way the bot would run it: one ``WorkerProcess`` per device, or any other executor with the
scheduler's ``Worker`` seam (a benchmark can plug in a cheap one). ``WorkerHost`` speaks the protocol of ``wire``:

- announce: every heartbeat, one ``WorkerInfo`` per device under ``{prefix}:worker:{name}``, with a TTL;
- pin: pull only while the bot's ``BotInfo`` names a revision; when it names another one than the local engine
  serves, stop and raise ``PinRefused``;
- pull: each device is a consumer of the group ``workers`` that holds at most ``depth`` entries (one rendering, the
  next being prepared); a consumer with room first claims an entry a silent worker held past its lease
  (XAUTOCLAIM), else reads a new one (XREADGROUP);
- render: ``Started``, ``Progress`` (at most four a second) and then ``Rendered`` or ``Failed`` go, in order, to
  ``{prefix}:events:{session}``; then the entry is acknowledged and deleted. While a batch is in hand its lease is
  renewed and its stop key checked every heartbeat; a renewal first checks that the entry is still this
  consumer's, so a worker that was unheard past its lease never takes a batch back from the one that took it over
  (it finishes its copy; the bot keeps the first result). A batch of an earlier bot session is dropped unrendered;
- give back: a batch this worker will not finish (its local process died, or the worker is stopping and the grace
  ran out) is made claimable at once (XCLAIM … IDLE lease) rather than after its lease, and nothing is published
  for it: ``Failed(STOPPED)`` would tell the bot that nobody wants it.

Redis may go away at any time: the model stays loaded, each loop retries with backoff (one warning, not one per
try), and work resumes when Redis is back, even empty. The broker URL is only ever logged ``redacted``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, AuthorizationError, ResponseError
from redis.exceptions import ConnectionError as BrokerConnectionError
from redis.exceptions import TimeoutError as BrokerTimeoutError
from redis.typing import EncodableT, FieldT, StreamIdT

from bot.cluster.broker import redacted
from bot.cluster.wire import GROUP, BotInfo, Keys, WorkerInfo, pack, unpack
from bot.config import ClusterConfig
from bot.engine.process import WorkerProcess
from bot.engine.protocol import Failed, FailureKind, Message, Progress, RenderBatch, Rendered, Started
from bot.errors import BotError, ConfigError, OutOfMemory
from bot.scheduler import Call, RenderStopped, Worker, WorkerLost

log = logging.getLogger(__name__)

_READ_BLOCK_MS = 1000  # a consumer with room waits this long for a new entry before it looks for stale ones again
_PROGRESS_INTERVAL = 0.25  # seconds between two progress events of one batch: Redis is not a progress bar
_EVENTS_MAXLEN = 10_000
_BACKOFF = (0.5, 1.0, 2.0, 4.0, 5.0)  # seconds between tries while Redis is away
_LAST_WRITES_SECONDS = 3.0  # for giving back batches and deleting heartbeats when stopping, Redis or not
_BROKER_ERRORS = (BrokerConnectionError, BrokerTimeoutError)


class PinRefused(BotError):
    """The bot is pinned to another model revision than this worker serves."""


@dataclass(frozen=True, slots=True)
class Served:
    """What a local executor serves: what its heartbeat says, and what the bot's pin is checked against."""

    device: str
    device_name: str
    revision: str | None
    dtype: str


@dataclass(frozen=True, slots=True)
class Executor:
    """A local executor (anything with the scheduler's ``Worker`` seam) and how to ask what it serves now."""

    worker: Worker
    served: Callable[[], Served]


def process_executor(process: WorkerProcess) -> Executor:
    """Return a started GPU worker process as an executor; what it serves comes from its latest ``Hello``."""

    def served() -> Served:
        hello = process.hello
        engine: Mapping[str, object] = hello.engine if hello is not None else {}
        revision, dtype = engine.get("revision"), engine.get("dtype")
        return Served(
            device=hello.device if hello is not None else process.settings.device,
            device_name=hello.device_name if hello is not None else "",
            revision=revision if isinstance(revision, str) else None,
            dtype=dtype if isinstance(dtype, str) else process.settings.dtype,
        )

    return Executor(process, served)


def default_name(cluster: ClusterConfig) -> str:
    """Return this worker's name: ``cluster.name``, else host name and process id (unique on one host too)."""
    return cluster.name or f"{socket.gethostname()}-{os.getpid()}"


class _Backoff:
    def __init__(self) -> None:
        self._tries = 0

    def next(self) -> float:
        delay = _BACKOFF[min(self._tries, len(_BACKOFF) - 1)]
        self._tries += 1
        return delay

    def reset(self) -> None:
        self._tries = 0


@dataclass(eq=False, slots=True)
class _Held:
    """A stream entry a consumer holds, from the read until it is acknowledged, given back or dropped."""

    entry: str
    session: str
    batch: RenderBatch | None  # None: a malformed entry, acknowledged without rendering
    call: Call | None = None  # once handed to the local executor
    renewing: bool = True  # False once the entry is no longer this consumer's (taken over, or Redis lost it)
    task: asyncio.Task[None] | None = None


@dataclass(eq=False, slots=True)
class _Consumer:
    """One local executor as a consumer of the group: its name in Redis and the entries it holds."""

    name: str
    executor: Executor
    held: dict[str, _Held] = field(default_factory=lambda: dict[str, _Held]())
    room: asyncio.Event = field(default_factory=asyncio.Event)  # set while it holds fewer entries than its depth
    up: bool = True  # False from losing its local process until that is ready again
    cursor: str = "0-0"  # where the next look for stale entries starts in the group's pending list

    @property
    def depth(self) -> int:
        return self.executor.worker.depth

    def update(self) -> None:
        if len(self.held) < self.depth:
            self.room.set()
        else:
            self.room.clear()


class _Events:
    """One batch's events, published in order by their own task."""

    def __init__(self, publish: Callable[[Message], Awaitable[bool]]) -> None:
        self._publish = publish
        self._queue: asyncio.Queue[Message | None] = asyncio.Queue()
        self._last_progress = -math.inf
        self._task = asyncio.create_task(self._run())

    def send(self, message: Message) -> None:
        self._queue.put_nowait(message)

    def progress(self, batch_id: int, step: int, total: int) -> None:
        now = time.monotonic()
        if step < total and now - self._last_progress < _PROGRESS_INTERVAL:
            return
        self._last_progress = now
        self.send(Progress(batch_id, step, total))

    async def finish(self, outcome: Message) -> bool:
        """Publish the outcome after the events before it; return whether it reached Redis."""
        self.send(outcome)
        self._queue.put_nowait(None)
        return await self._task

    def close(self) -> None:
        self._task.cancel()

    async def _run(self) -> bool:
        published = False
        while (message := await self._queue.get()) is not None:
            published = await self._publish(message)
        return published


class WorkerHost:
    """Serve the bot's batches from Redis on local executors until ``stop``.

    The executors are started and closed by whoever made them; the host only hands them batches.
    """

    def __init__(
        self,
        redis: Redis,
        cluster: ClusterConfig,
        *,
        model: str,
        executors: Sequence[Executor],
        grace: float = 30.0,
        name: str | None = None,
    ) -> None:
        if not executors:
            raise ValueError("a worker host needs at least one executor")
        self.name = name or default_name(cluster)
        self._redis = redis
        self._cluster = cluster
        self._keys = Keys(cluster.prefix)
        self._model = model
        self._grace = grace
        self._host = socket.gethostname()
        self._lease_ms = max(1, round(cluster.lease * 1000))
        self._ttl = max(1, math.ceil(3 * cluster.heartbeat))
        devices = [executor.served().device for executor in executors]
        unique = len(set(devices)) == len(devices)
        self.consumers = [
            _Consumer(f"{self.name}-{device}" if unique else f"{self.name}-{index}-{device}", executor)
            for index, (device, executor) in enumerate(zip(devices, executors, strict=True))
        ]
        for consumer in self.consumers:
            consumer.update()
        self._stopping = asyncio.Event()  # take no more entries
        self._hurry = asyncio.Event()  # a second stop: give back what is in hand now, without the grace
        self._closed = asyncio.Event()  # the end: no more heartbeats or renewals
        self._pinned = asyncio.Event()  # the bot is pinned to the revision served here
        self._waiting_for: str | None = None  # what the log last said the worker waits for
        self._error: Exception | None = None
        self._broker_ok = True
        self._heard = False  # the broker answered a heartbeat at least once
        self._claimed: set[str] = set()  # heartbeat keys this host wrote: the ones it deletes when it stops
        self._started_at = time.time()

    @property
    def names(self) -> list[str]:
        return [consumer.name for consumer in self.consumers]

    @property
    def broker_ok(self) -> bool:
        """Whether the broker answered the latest heartbeat."""
        return self._heard and self._broker_ok

    def stop(self) -> None:
        """Take no more batches; ``run`` finishes those in hand within the grace, gives back the rest, and returns.

        A second call gives back what is in hand at once.
        """
        if self._stopping.is_set():
            self._hurry.set()
            return
        log.info("Stopping: taking no more batches")
        self._stopping.set()

    async def run(self) -> None:
        """Serve until ``stop``; raise PinRefused, or ConfigError when the broker or the name is refused."""
        self._started_at = time.time()
        for consumer in self.consumers:
            served = consumer.executor.served()
            log.info(
                "Cluster worker %s ready on %s (%s): model %s, revision %s, %d batches at once; broker %s",
                consumer.name,
                served.device,
                served.device_name,
                self._model,
                served.revision,
                consumer.depth,
                redacted(self._cluster.broker),
            )
        tending = [asyncio.create_task(self._guard(self._announce()), name="cluster-heartbeat")]
        tending += [
            asyncio.create_task(self._guard(self._tend(consumer)), name=f"cluster-tend-{consumer.name}")
            for consumer in self.consumers
        ]
        pulling = [
            asyncio.create_task(self._guard(self._pull(consumer)), name=f"cluster-pull-{consumer.name}")
            for consumer in self.consumers
        ]
        try:
            await self._stopping.wait()
        finally:
            await self._close(pulling, tending)
        if self._error is not None:
            raise self._error

    # Loops

    async def _guard(self, work: Awaitable[None]) -> None:
        """Run one of the host's loops; whatever ends it stops the host, and ``run`` raises it."""
        try:
            await work
        except Exception as error:
            self._fail(error)

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        self._stopping.set()
        self._hurry.set()

    async def _announce(self) -> None:
        """Every heartbeat: say who this worker is and how busy, and read what the bot wants."""
        await self._claim_names()
        backoff = _Backoff()
        while not self._closed.is_set():
            try:
                pipe = self._redis.pipeline(transaction=False)
                for consumer in self.consumers:
                    pipe.set(self._keys.worker(consumer.name), self._info(consumer).dump(), ex=self._ttl)
                pipe.get(self._keys.bot)
                replies = await pipe.execute()
            except _BROKER_ERRORS as error:
                self._lost(error)
                await _sleep(self._closed, backoff.next())
                continue
            self._back()
            backoff.reset()
            self._follow(replies[-1])
            await _sleep(self._closed, self._cluster.heartbeat)

    async def _claim_names(self) -> None:
        """Write the first heartbeats where no other worker's lives, waiting out that of one that just stopped."""
        waiting = {consumer.name for consumer in self.consumers}
        give_up: float | None = None
        backoff = _Backoff()
        while waiting and not self._closed.is_set():
            named = [consumer for consumer in self.consumers if consumer.name in waiting]
            try:
                pipe = self._redis.pipeline(transaction=False)
                for consumer in named:
                    pipe.set(self._keys.worker(consumer.name), self._info(consumer).dump(), ex=self._ttl, nx=True)
                replies = await pipe.execute()
            except _BROKER_ERRORS as error:
                self._lost(error)
                await _sleep(self._closed, backoff.next())
                continue
            self._back()
            backoff.reset()
            claimed = {consumer.name for consumer, reply in zip(named, replies, strict=True) if reply}
            self._claimed |= claimed
            waiting -= claimed
            if not waiting:
                return
            name = min(waiting)
            if give_up is None:
                give_up = time.monotonic() + self._ttl + self._cluster.heartbeat
                log.info("A worker named %s was heard from lately; waiting for its heartbeat to end", name)
            elif time.monotonic() > give_up:
                raise ConfigError(
                    f"Another worker named {name} is running (its heartbeat is in Redis): give each worker its own "
                    "cluster.name, or leave it empty for host name and process id"
                )
            await _sleep(self._closed, self._cluster.heartbeat)

    def _follow(self, raw: object) -> None:
        """Take in the bot's announcement: pull while it is pinned to the revision served here, refuse another."""
        bot = _bot_info(raw)
        if bot is None or bot.revision is None:
            self._pinned.clear()
            self._waiting("no bot" if bot is None else "no pin")
            return
        for consumer in self.consumers:
            served = consumer.executor.served().revision
            if served != bot.revision:
                self._fail(
                    PinRefused(
                        f"Refused by the bot: this worker serves revision {served}, the bot is pinned to {bot.revision}"
                    )
                )
                return
        if not self._pinned.is_set():
            log.info("Serving the bot's session %s (model %s, revision %s)", bot.session, bot.model, bot.revision)
            self._waiting_for = None
            self._pinned.set()

    def _waiting(self, why: str) -> None:
        if self._waiting_for == why:
            return
        self._waiting_for = why
        if why == "no bot":
            log.info("Waiting for the bot: it has not announced itself in Redis (or it stopped)")
        else:
            log.info("Waiting for the bot to pin a model revision (it pins the first worker's)")

    async def _pull(self, consumer: _Consumer) -> None:
        """Take entries for one consumer while it has room, its executor is up and the bot is pinned."""
        backoff = _Backoff()
        while await self._may_pull(consumer):
            try:
                entry = await self._take(consumer)
            except _BROKER_ERRORS as error:
                self._lost(error)
                await _sleep(self._stopping, backoff.next())
                continue
            self._back()
            backoff.reset()
            if entry is None:
                continue
            if self._stopping.is_set():
                # Brought by a read that began before the stop: not started, so given back with the rest.
                consumer.held[entry[0]] = _Held(entry[0], "", None, renewing=True)
                continue
            self._hold(consumer, *entry)

    async def _may_pull(self, consumer: _Consumer) -> bool:
        """Wait until the consumer may take an entry; return False when the host stops first."""
        while not self._stopping.is_set():
            if not consumer.room.is_set() and not await self._unless_stopping(consumer.room.wait):
                return False
            if not await self._unless_stopping(consumer.executor.worker.ready):
                return False
            consumer.up = True
            if not self._pinned.is_set() and not await self._unless_stopping(self._pinned.wait):
                return False
            if consumer.room.is_set() and self._pinned.is_set() and not self._stopping.is_set():
                return True
        return False

    async def _take(self, consumer: _Consumer) -> tuple[str, Mapping[bytes, bytes]] | None:
        """Return an entry a silent worker held past its lease, else a new one, else None after a short wait."""
        try:
            return await self._claim_stale(consumer) or await self._read(consumer)
        except ResponseError as error:
            if not _no_group(error):
                raise
        # Nobody made the group yet, or Redis restarted empty.
        try:
            await self._redis.xgroup_create(self._keys.batches, GROUP, id="0", mkstream=True)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise
        return None

    async def _claim_stale(self, consumer: _Consumer) -> tuple[str, Mapping[bytes, bytes]] | None:
        reply: Any = await self._redis.xautoclaim(
            self._keys.batches, GROUP, consumer.name, self._lease_ms, start_id=consumer.cursor, count=1
        )
        consumer.cursor = _text(reply[0])
        for entry, fields in reply[1]:
            if entry is not None and fields is not None:
                log.warning(
                    "Took over batch entry %s: its worker went unheard for a lease (%g s), or gave it back",
                    _text(entry),
                    self._cluster.lease,
                )
                return _text(entry), fields
        return None

    async def _read(self, consumer: _Consumer) -> tuple[str, Mapping[bytes, bytes]] | None:
        # [[stream, [(entry, fields)]]] in RESP2, what ``connect`` speaks; None when nothing came.
        reply: Any = await self._redis.xreadgroup(
            GROUP, consumer.name, {self._keys.batches: ">"}, count=1, block=_READ_BLOCK_MS
        )
        for _stream, entries in reply or ():
            for entry, fields in entries:
                return _text(entry), fields
        return None

    async def _tend(self, consumer: _Consumer) -> None:
        """Every heartbeat: renew the lease of each entry in hand, and stop those the bot no longer wants."""
        while not self._closed.is_set():
            await _sleep(self._closed, self._cluster.heartbeat)
            held = [held for held in consumer.held.values() if held.batch is not None]
            if not held or self._closed.is_set():
                continue
            try:
                await self._renew(consumer, held)
            except _BROKER_ERRORS as error:
                self._lost(error)
            else:
                self._back()

    async def _renew(self, consumer: _Consumer, held: list[_Held]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for item in held:
            assert item.batch is not None
            pipe.xpending_range(self._keys.batches, GROUP, item.entry, item.entry, 1, consumername=consumer.name)
            pipe.exists(self._keys.stop(item.session, item.batch.batch_id))
        replies = await pipe.execute(raise_on_error=False)
        mine: list[str] = []
        for index, item in enumerate(held):
            assert item.batch is not None
            pending, stop = replies[2 * index], replies[2 * index + 1]
            for reply in (pending, stop):
                if isinstance(reply, Exception) and not (isinstance(reply, ResponseError) and _no_group(reply)):
                    raise reply
            if item.renewing and (isinstance(pending, Exception) or not pending):
                item.renewing = False
                log.warning(
                    "Batch %d is no longer this worker's: it was unheard past its lease and another worker took the "
                    "batch, or Redis lost it. Finishing it anyway; the bot keeps the first result",
                    item.batch.batch_id,
                )
            if item.renewing:
                mine.append(item.entry)
            if stop is True or (isinstance(stop, int) and stop > 0):
                if item.call is not None and not item.call.stopping:
                    log.info("Stopping batch %d: the bot no longer wants it", item.batch.batch_id)
                    item.call.stop()
        if mine:
            ids: list[StreamIdT] = list(mine)
            await self._redis.xclaim(self._keys.batches, GROUP, consumer.name, 0, ids, justid=True)

    # One batch

    def _hold(self, consumer: _Consumer, entry: str, fields: Mapping[bytes, bytes]) -> None:
        batch: RenderBatch | None = None
        plain: dict[str, str] = {}
        try:
            message, plain = unpack(fields)
        except ValueError as error:
            log.error("Dropping batch entry %s: %s", entry, error)
        else:
            if isinstance(message, RenderBatch):
                batch = message
            else:
                log.error("Dropping batch entry %s: a %s message, not a batch", entry, type(message).__name__)
        held = _Held(entry, plain.get("session", ""), batch)
        consumer.held[entry] = held
        consumer.update()
        held.task = asyncio.create_task(self._serve(consumer, held), name=f"cluster-batch-{entry}")

    async def _serve(self, consumer: _Consumer, held: _Held) -> None:
        try:
            await self._handle(consumer, held)
        finally:
            consumer.held.pop(held.entry, None)
            consumer.update()

    async def _handle(self, consumer: _Consumer, held: _Held) -> None:
        """Render one entry's batch and publish its outcome; or drop it, or give it back."""
        batch = held.batch
        if batch is None:
            await self._acknowledge(held.entry)
            return
        current, stopped = await self._check(held.session, batch.batch_id)
        if not current:
            log.info(
                "Dropping batch %d: it belongs to an earlier run of the bot (session %s)", batch.batch_id, held.session
            )
            await self._acknowledge(held.entry)
            return
        session, worker = held.session, consumer.name
        events = _Events(lambda message: self._publish(session, worker, message))
        try:
            if stopped:
                outcome: Message | None = Failed(batch.batch_id, FailureKind.STOPPED, "stopped before it started")
            else:
                outcome = await self._render(consumer, held, batch, events)
            if outcome is None:
                return
            if await events.finish(outcome):
                await self._acknowledge(held.entry)
                _log_outcome(outcome, worker)
            else:
                log.warning(
                    "Dropped the outcome of batch %d: Redis was away for a whole lease (%g s), so the batch is "
                    "rendered again elsewhere",
                    batch.batch_id,
                    self._cluster.lease,
                )
        finally:
            events.close()

    async def _check(self, session: str, batch_id: int) -> tuple[bool, bool]:
        """Return whether a batch is of the bot's current session, and whether it was stopped before it started."""
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.get(self._keys.bot)
            pipe.exists(self._keys.stop(session, batch_id))
            raw, stop = await pipe.execute()
        except _BROKER_ERRORS as error:
            self._lost(error)
            return True, False  # render it: a stop is still seen while it renders
        self._back()
        bot = _bot_info(raw)
        return bot is None or bot.session == session, bool(stop)

    async def _render(self, consumer: _Consumer, held: _Held, batch: RenderBatch, events: _Events) -> Message | None:
        """Render a batch on the local executor; return its outcome, or None when it was given back."""
        began: list[float] = []

        def on_started() -> None:
            began.append(time.perf_counter())
            events.send(Started(batch.batch_id))

        def on_progress(step: int, total: int) -> None:
            events.progress(batch.batch_id, step, total)

        call = Call(batch.specs, on_started, on_progress)
        held.call = call
        try:
            images = await consumer.executor.worker.render(call)
        except WorkerLost as error:
            # Rendering it again here would wait for the local restart; any worker with room can start it now.
            # The bot sees the new worker's Started; a batch that kills every worker is the bot's to give up on.
            consumer.up = False
            log.warning("Lost batch %d with the local worker (%s); giving it back", batch.batch_id, error)
            if held.renewing:
                held.renewing = False
                await self._give_back(consumer, [held.entry])
            return None
        except OutOfMemory as error:
            return Failed(batch.batch_id, FailureKind.OUT_OF_MEMORY, str(error))
        except RenderStopped:
            return Failed(batch.batch_id, FailureKind.STOPPED, "stopped")
        except BotError as error:
            return Failed(batch.batch_id, FailureKind.ERROR, str(error))
        except Exception:
            log.exception("Rendering batch %d failed on %s", batch.batch_id, consumer.name)
            return Failed(batch.batch_id, FailureKind.ERROR, f"Rendering failed on worker {consumer.name}.")
        facts = call.facts
        seconds, peak = facts.get("seconds"), facts.get("peak_memory")
        if not isinstance(seconds, int | float) or isinstance(seconds, bool):
            seconds = time.perf_counter() - (began[0] if began else time.perf_counter())
        return Rendered(
            batch.batch_id,
            tuple(images),
            float(seconds),
            peak if isinstance(peak, int) and not isinstance(peak, bool) else None,
            facts.get("compiled") is True,
        )

    async def _publish(self, session: str, worker: str, message: Message) -> bool:
        """Add an event to the session's stream; an outcome is retried for a lease, the rest tried once."""
        key = self._keys.events(session)
        # Copied into the key and value types redis-py's annotations ask for.
        fields: dict[FieldT, EncodableT] = {key: value for key, value in pack(message, worker=worker).items()}

        async def add() -> None:
            await self._redis.xadd(key, fields, maxlen=_EVENTS_MAXLEN, approximate=True)

        if isinstance(message, Started | Progress):
            try:
                await add()
            except _BROKER_ERRORS as error:
                self._lost(error)
                return False
            self._back()
            return True
        return await self._persist(add)

    async def _acknowledge(self, entry: str) -> None:
        async def done() -> None:
            pipe = self._redis.pipeline(transaction=False)
            pipe.xack(self._keys.batches, GROUP, entry)
            pipe.xdel(self._keys.batches, entry)
            await pipe.execute()

        await self._persist(done)

    async def _persist(self, write: Callable[[], Awaitable[None]]) -> bool:
        """Make a write that must reach Redis, retrying while it is away for up to a lease; return whether it did."""
        deadline = time.monotonic() + self._cluster.lease
        backoff = _Backoff()
        while True:
            try:
                await write()
            except _BROKER_ERRORS as error:
                self._lost(error)
                delay = backoff.next()
                if time.monotonic() + delay > deadline:
                    return False
                await asyncio.sleep(delay)
                continue
            self._back()
            return True

    async def _give_back(self, consumer: _Consumer, entries: list[str]) -> None:
        """Make entries claimable by any worker now, instead of when their lease runs out."""
        ids: list[StreamIdT] = list(entries)
        try:
            await self._redis.xclaim(self._keys.batches, GROUP, consumer.name, 0, ids, idle=self._lease_ms, justid=True)
        except (*_BROKER_ERRORS, ResponseError) as error:
            log.info(
                "Could not give back %d batches (%s); another worker takes them when their lease runs out",
                len(entries),
                error,
            )

    # Stopping

    async def _close(self, pulling: list[asyncio.Task[None]], tending: list[asyncio.Task[None]]) -> None:
        self._stopping.set()
        # The grace counts from the stop, not from the end of a read that was in progress then.
        deadline = time.monotonic() + self._grace
        # A read in progress ends within its block time (an entry it brings is given back below, unrendered).
        # Cancelled mid-read, an entry Redis had already handed over would wait out its lease.
        _, late = await asyncio.wait(pulling, timeout=_READ_BLOCK_MS / 1000 + 5)
        await _cancel(late)
        batches = [held.task for consumer in self.consumers for held in consumer.held.values() if held.task]
        if batches and not self._hurry.is_set():
            log.info("Finishing the %d batch(es) in hand (for up to %g s)", len(batches), self._grace)
            finished = asyncio.ensure_future(asyncio.wait(batches))
            hurry = asyncio.ensure_future(self._hurry.wait())
            left = max(0.0, deadline - time.monotonic())
            await asyncio.wait([finished, hurry], timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finished.cancel()  # cancels the waiting only, not the batches
            hurry.cancel()
        unfinished = [(consumer, held) for consumer in self.consumers for held in list(consumer.held.values())]
        for _, held in unfinished:
            if held.call is not None:
                held.call.stop()
        await _cancel([held.task for _, held in unfinished if held.task is not None])
        self._closed.set()
        await _cancel(tending)
        with contextlib.suppress(*_BROKER_ERRORS, ResponseError, TimeoutError):
            async with asyncio.timeout(_LAST_WRITES_SECONDS):
                for consumer in self.consumers:
                    entries = [held.entry for owner, held in unfinished if owner is consumer and held.renewing]
                    if entries:
                        await self._give_back(consumer, entries)
                        log.info("Gave back %d batch(es) for another worker to take at once", len(entries))
                if self._claimed:
                    await self._redis.delete(*(self._keys.worker(name) for name in sorted(self._claimed)))

    async def _unless_stopping(self, wait: Callable[[], Awaitable[object]]) -> bool:
        """Await ``wait()`` unless the host stops first; return whether it finished and the host still runs."""
        if self._stopping.is_set():
            return False
        waiting = asyncio.ensure_future(wait())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait([waiting, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
            stopping.cancel()
        if not waiting.done() or waiting.cancelled():
            return False
        waiting.result()  # what it raised ends the loop, and so the host
        return not self._stopping.is_set()

    # Redis coming and going

    def _lost(self, error: Exception) -> None:
        if isinstance(error, AuthenticationError | AuthorizationError):
            self._fail(
                ConfigError(
                    f"The broker at {redacted(self._cluster.broker)} refused this worker: {error}. Check the user and "
                    "password in cluster.broker (or SYGIL_BROKER)"
                )
            )
            return
        if self._broker_ok:
            self._broker_ok = False
            log.warning(
                "Lost the broker at %s (%s); the model stays loaded, retrying until it is back",
                redacted(self._cluster.broker),
                error,
            )
        else:
            log.debug("The broker is still away: %s", error)

    def _back(self) -> None:
        self._heard = True
        if not self._broker_ok:
            self._broker_ok = True
            log.info("The broker at %s is back", redacted(self._cluster.broker))

    def _info(self, consumer: _Consumer) -> WorkerInfo:
        served = consumer.executor.served()
        # A worker that is stopping or restarting its local process says it is full, so the bot sends it nothing.
        full = self._stopping.is_set() or not consumer.up
        return WorkerInfo(
            name=consumer.name,
            host=self._host,
            device=served.device,
            device_name=served.device_name,
            model=self._model,
            revision=served.revision,
            dtype=served.dtype,
            depth=consumer.depth,
            busy=consumer.depth if full else len(consumer.held),
            started_at=self._started_at,
        )


def _log_outcome(outcome: Message, worker: str) -> None:
    if isinstance(outcome, Rendered):
        log.info(
            "Rendered batch %d on %s: %d images in %.2f s",
            outcome.batch_id,
            worker,
            len(outcome.images),
            outcome.seconds,
        )
    elif isinstance(outcome, Failed):
        log.info("Batch %d did not render on %s (%s): %s", outcome.batch_id, worker, outcome.kind, outcome.message)


def _bot_info(raw: object) -> BotInfo | None:
    if not isinstance(raw, str | bytes):
        return None
    try:
        return BotInfo.load(raw)
    except (ValueError, KeyError, TypeError) as error:
        log.warning("The bot's announcement in Redis is malformed (%r); treating it as absent", error)
        return None


def _no_group(error: ResponseError) -> bool:
    return str(error).startswith("NOGROUP")


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _sleep(event: asyncio.Event, seconds: float) -> None:
    """Sleep, waking early when ``event`` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)


async def _cancel(tasks: Sequence[asyncio.Task[None]] | set[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
