"""The remote worker (``sygil-bot worker``): serve the bot's batches from Redis on this host's GPUs.

The model runs here the way the bot would run it: one ``WorkerProcess`` per device, or any other executor with the
scheduler's ``Worker`` seam (a benchmark can plug in a cheap one). ``WorkerHost`` owns the worker's life on the
cluster, in the protocol of ``wire``:

- announce: every heartbeat, one ``WorkerInfo`` per device under ``{prefix}:worker:{name}``, with a TTL;
- pin: pull only while the bot's ``BotInfo`` names a revision; pull from the production revision's batches stream
  when the local engine serves it, from a candidate's when it serves that candidate (``BotInfo.candidates``), and
  otherwise stop and raise ``PinRefused``;
- pull: each device is a consumer of the group ``workers`` that holds at most ``depth`` entries (one rendering, the
  next being prepared); a consumer with room first claims an entry a silent worker held past its lease
  (XAUTOCLAIM), else reads a new one (XREADGROUP), and hands it to ``held.Batches`` (render, publish, renew, give
  back);
- stop: take no more entries, finish those in hand within the grace, give back the rest, delete the heartbeats.

Redis may go away at any time: the model stays loaded, each loop retries through ``broker.Retry`` (one warning, not
one per try), and work resumes when Redis is back, even empty. The broker URL is only ever logged ``redacted``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, AuthorizationError, ResponseError

from bot.cluster.broker import (
    UNREACHABLE,
    Outage,
    Retry,
    entries,
    no_group,
    parse,
    pause,
    redacted,
    refused,
    unreachable_errors,
)
from bot.cluster.held import Batches, Held
from bot.cluster.wire import GROUP, BotInfo, Keys, WorkerInfo, valid_name
from bot.cluster.wire import consumer as consumer_name
from bot.config import ClusterConfig
from bot.engine.executor import Worker
from bot.engine.process import WorkerProcess
from bot.errors import BotError, ConfigError

log = logging.getLogger(__name__)

_READ_BLOCK_MS = 1000  # a consumer with room waits this long for a new entry before it looks for stale ones again
_LAST_WRITES_SECONDS = 3.0  # for giving back batches and deleting heartbeats when stopping, Redis or not


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
    """Return this worker's name: ``cluster.name``, else the broker URL's user (its Redis ACL user), else host name
    and process id (unique on one host too), made to fit ``wire.NAME_PATTERN``."""
    if cluster.name:
        return cluster.name
    user = parse(cluster.broker).username if cluster.broker else None
    if user and user != "default":
        if not valid_name(user):
            raise ConfigError(
                f"The broker user {user!r} cannot name a worker: give cluster.name (1 to 48 letters, digits, '.', "
                "'_' or '-'), and a Redis user of that name (sygil-bot cluster add-worker NAME)"
            )
        return user
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).lstrip("._-")[:40] or "worker"
    return f"{host}-{os.getpid()}"


@dataclass(eq=False, slots=True)
class _Consumer:
    """One local executor as a consumer of the group: its name in Redis and the entries it holds."""

    name: str  # in the group: ``{worker}/{device}``
    device: str  # the device part, which names its heartbeat key
    executor: Executor
    held: dict[str, Held] = field(default_factory=lambda: dict[str, Held]())
    room: asyncio.Event = field(default_factory=asyncio.Event)  # set while it holds fewer entries than its depth
    up: bool = True  # False from losing its local process until that is ready again
    cursor: str = "0-0"  # where the next look for stale entries starts in the group's pending list
    stream: str = ""  # the batches stream of the revision it serves, once the bot announced it

    @property
    def depth(self) -> int:
        return self.executor.worker.depth

    def update(self) -> None:
        if len(self.held) < self.depth:
            self.room.set()
        else:
            self.room.clear()


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
        if not valid_name(self.name):
            raise ConfigError(f"A worker's name is 1 to 48 letters, digits, '.', '_' or '-', not {self.name!r}")
        self._redis = redis
        self._cluster = cluster
        self._keys = Keys(cluster.prefix)
        self._model = model
        self._grace = grace
        self._host = socket.gethostname()
        self._lease_ms = max(1, round(cluster.lease * 1000))
        self._ttl = max(1, math.ceil(3 * cluster.heartbeat))
        self._outage = Outage(
            log,
            cluster.broker,
            begins="Lost the broker at %(url)s (%(reason)s); the model stays loaded, retrying until it is back",
            lasts="The broker is still away: %(reason)s",
            ends="The broker at %(url)s is back",
        )
        self._broker = Retry(self._lost, self._back)  # for commands tried once
        self._batches = Batches(redis, self._keys, lease=cluster.lease, retry=self._broker)
        devices = [executor.served().device for executor in executors]
        unique = len(set(devices)) == len(devices)
        tags = [device if unique else f"{index}-{device}" for index, device in enumerate(devices)]
        self.consumers = [
            _Consumer(consumer_name(self.name, tag), tag, executor)
            for tag, executor in zip(tags, executors, strict=True)
        ]
        for consumer in self.consumers:
            consumer.update()
        self._stopping = asyncio.Event()  # take no more entries
        self._hurry = asyncio.Event()  # a second stop: give back what is in hand now, without the grace
        self._closed = asyncio.Event()  # the end: no more heartbeats or renewals
        self._pinned = asyncio.Event()  # the bot is pinned to the revision served here
        self._waiting_for: str | None = None  # what the log last said the worker waits for
        self._error: Exception | None = None
        self._heard = False  # the broker answered a heartbeat at least once
        self._claimed: set[str] = set()  # heartbeat keys this host wrote: the ones it deletes when it stops
        self._started_at = time.time()

    @property
    def names(self) -> list[str]:
        return [consumer.name for consumer in self.consumers]

    @property
    def broker_ok(self) -> bool:
        """Whether the broker answered the latest heartbeat."""
        return self._heard and not self._outage.down

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
        retry = Retry(self._lost, self._back, wake=self._closed)
        while not self._closed.is_set():
            replies = await retry.attempt(self._heartbeat(self.consumers))
            if replies is UNREACHABLE:
                continue
            self._follow(replies[-1])
            await pause(self._cluster.heartbeat, self._closed)

    async def _claim_names(self) -> None:
        """Write the first heartbeats where no other worker's lives, waiting out that of one that just stopped."""
        waiting = {consumer.name for consumer in self.consumers}
        give_up: float | None = None
        retry = Retry(self._lost, self._back, wake=self._closed)
        while waiting and not self._closed.is_set():
            named = [consumer for consumer in self.consumers if consumer.name in waiting]
            replies = await retry.attempt(self._heartbeat(named, first=True))
            if replies is UNREACHABLE:
                continue
            claimed = {consumer.name for consumer, reply in zip(named, replies, strict=True) if reply}
            self._claimed |= {self._keys.beat(self.name, c.device) for c in named if c.name in claimed}
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
            await pause(self._cluster.heartbeat, self._closed)

    async def _heartbeat(self, consumers: Sequence[_Consumer], *, first: bool = False) -> list[Any]:
        """Write the heartbeats, the first ones only where none lives; after them, read the bot's announcement."""
        pipe = self._redis.pipeline(transaction=False)
        for consumer in consumers:
            pipe.set(self._keys.beat(self.name, consumer.device), self._info(consumer).dump(), ex=self._ttl, nx=first)
        if not first:
            pipe.get(self._keys.bot)
        return await pipe.execute()

    def _follow(self, raw: object) -> None:
        """Take in the bot's announcement: pull while it is pinned to the revision served here, refuse another."""
        bot = BotInfo.read(raw)
        if bot is None or bot.revision is None:
            self._pinned.clear()
            self._waiting("no bot" if bot is None else "no pin")
            return
        streams: list[str] = []
        for consumer in self.consumers:
            served = consumer.executor.served().revision
            stream = bot.stream_of(self._keys, served)
            if stream is None:
                candidates = f" (or a candidate: {', '.join(bot.candidates)})" if bot.candidates else ""
                self._fail(
                    PinRefused(
                        f"Refused by the bot: this worker serves revision {served}, the bot is pinned to "
                        f"{bot.revision}{candidates}"
                    )
                )
                return
            streams.append(stream)
        for consumer, stream in zip(self.consumers, streams, strict=True):
            if consumer.stream != stream:
                consumer.stream, consumer.cursor = stream, "0-0"
        if not self._pinned.is_set():
            served = self.consumers[0].executor.served().revision
            role = "production" if served == bot.revision else "candidate"
            log.info("Serving the bot's session %s (model %s, %s revision %s)", bot.session, bot.model, role, served)
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
        retry = Retry(self._lost, self._back, wake=self._stopping)
        while await self._may_pull(consumer):
            entry = await retry.attempt(self._take(consumer))
            if entry is UNREACHABLE or entry is None:
                continue
            if self._stopping.is_set():
                # Brought by a read that began before the stop: not started, so given back with the rest.
                consumer.held[entry[0]] = Held(entry[0], "", None, consumer.stream, renewing=True)
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
            if not no_group(error):
                raise
        # The bot makes the group when it connects (a worker may not): Redis restarted empty, or the bot is new.
        await pause(self._cluster.heartbeat, self._stopping)
        return None

    async def _claim_stale(self, consumer: _Consumer) -> tuple[str, Mapping[bytes, bytes]] | None:
        reply: Any = await self._redis.xautoclaim(
            consumer.stream, GROUP, consumer.name, self._lease_ms, start_id=consumer.cursor, count=1
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
            GROUP, consumer.name, {consumer.stream: ">"}, count=1, block=_READ_BLOCK_MS
        )
        for entry, fields in entries(reply):
            return _text(entry), fields
        return None

    async def _tend(self, consumer: _Consumer) -> None:
        """Every heartbeat: renew the lease of each entry in hand, and stop those the bot no longer wants."""
        while not self._closed.is_set():
            await pause(self._cluster.heartbeat, self._closed)
            held = [held for held in consumer.held.values() if held.batch is not None]
            if held and not self._closed.is_set():
                await self._broker.once(self._batches.renew(consumer.name, held))

    # One batch

    def _hold(self, consumer: _Consumer, entry: str, fields: Mapping[bytes, bytes]) -> None:
        held = Held.read(entry, fields, consumer.stream)
        consumer.held[entry] = held
        consumer.update()
        held.task = asyncio.create_task(self._serve(consumer, held), name=f"cluster-batch-{entry}")

    async def _serve(self, consumer: _Consumer, held: Held) -> None:
        def lost_worker() -> None:
            consumer.up = False

        try:
            await self._batches.serve(consumer.name, consumer.executor.worker, held, lost_worker=lost_worker)
        finally:
            consumer.held.pop(held.entry, None)
            consumer.update()

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
        with contextlib.suppress(*unreachable_errors(), ResponseError, TimeoutError):
            async with asyncio.timeout(_LAST_WRITES_SECONDS):
                for consumer in self.consumers:
                    given = [held for owner, held in unfinished if owner is consumer and held.renewing]
                    if given:
                        await self._batches.give_back(consumer.name, given)
                        log.info("Gave back %d batch(es) for another worker to take at once", len(given))
                if self._claimed:
                    await self._redis.delete(*sorted(self._claimed))

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
            self._fail(refused(self._cluster.broker, error))
        else:
            self._outage.failed(error)

    def _back(self) -> None:
        self._heard = True
        self._outage.answered()

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


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _cancel(tasks: Sequence[asyncio.Task[None]] | set[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
