"""The bot's side of the GPU cluster: hand batches to remote workers through Redis, and read back what they did.

``ClusterPool`` is one scheduler ``Worker`` standing for every remote worker of the production revision, and each of its
``lanes`` beyond the first stands for those of one candidate revision (``model.candidates``): a lane's batches go to its
revision's stream, only its workers' room lets them out, and only its workers' outcomes count. The scheduler keeps
admission, fairness and batching, and SQLite keeps every job; the pool lets a slot take a batch only while a live worker
has room for it (``ready``), so the fair order is decided as late as with local workers. Redis carries only the batches
in flight: when it goes away, their jobs go back to the front of the queue without counting an attempt, ``ready`` waits,
and the pool reconnects by itself. The keys and entries are those of ``bot.cluster.wire``.

No worker is trusted (``bot.cluster.guard``): an event counts only from the worker whose consumer holds the batch's
entry (XPENDING) and only with the nonce of that dispatch; a result is checked before it is posted, and users see
fixed messages, never a worker's text. A batch held past its deadline goes back in line, one that stopped workers
``MAX_CRASHES`` times fails, and a worker with ``cluster.strikes`` bad results in a row is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import secrets
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Self

from redis.typing import EncodableT, FieldT

from bot.cluster.broker import Backoff, Outage, connect, create_group, end, kept, redacted, unreachable_errors
from bot.cluster.guard import Reader, Strikes, checked, checked_preview, deadline
from bot.cluster.wire import (
    GROUP,
    BotInfo,
    Keys,
    WorkerInfo,
    consumer,
    exact_revision,
    pack,
    shown,
    unpack,
    worker_of,
)
from bot.config import ClusterConfig, PreviewConfig
from bot.engine.executor import BatchEvent, Call, RenderStopped, WorkerLost, answer
from bot.engine.protocol import Failed, FailureKind, Preview, Progress, RenderBatch, Rendered, Started
from bot.engine.revision import tag
from bot.engine.types import RenderedImage
from bot.errors import RenderFailed

log = logging.getLogger(__name__)

DEPTH = 64  # scheduler slots; how many of them may hold a batch is what the live workers can take
MAX_DEPTH = 2  # batches one device of a worker is given at once, whatever depth its heartbeat declares
MAX_DEVICES = 8  # devices (consumers) counted per worker
MAX_CRASHES = 3  # times a started batch may be taken over from a worker that died holding it
_BROKEN = unreachable_errors()
_PREVIEW_FLOOR = 0.25  # seconds between two frames of one image the bot takes from a worker, at least
# Between two reads of the workers' events streams that found nothing: with batches out, and with none. Not a
# blocking XREAD: that would hand the bot whatever a worker wrote, however large (``guard.Reader`` caps it).
_POLL_SECONDS = (0.005, 0.1)
_READ_COUNT = 100
_KNOWN_SECONDS = 600.0  # a worker's events stream is read this long after its last heartbeat
_MAX_BEATS = 1000  # heartbeat keys read per scan
_BROKEN_IMAGE = "A GPU worker sent back a broken image, so this job did not finish. Try again."
_FIXED: Mapping[FailureKind, str] = {  # what users see when a worker says a batch failed: never the worker's words
    FailureKind.OUT_OF_MEMORY: "The GPU ran out of memory.",
    FailureKind.STOPPED: "stopped",
    FailureKind.ERROR: "A GPU worker could not render this job. Try again, or try other settings.",
}
_STOP_SECONDS = 300  # how long a stop key waits for a worker to take its batch
_WORKERS_SHOWN = 8


@dataclass(eq=False, slots=True)
class _Flight:
    """A batch sent to the cluster and awaited."""

    batch_id: int
    call: Call
    future: asyncio.Future[list[RenderedImage]]
    nonce: str  # new at every dispatch: events must repeat it
    deadline: float  # seconds a worker may hold it
    stream: str  # the batches stream of its revision
    revision: str | None  # the exact revision it must be rendered with (None: production, not pinned yet)
    entry_id: bytes | None = None  # its entry in the batches stream, once Redis answered the XADD
    started: bool = False
    holder: str | None = None  # the consumer whose Started was taken
    holding: str | None = None  # the consumer holding its entry when last looked at
    held_since: float | None = None  # time.monotonic() when that consumer was first seen holding it
    deliveries: int = 0  # the entry's delivery count when it started
    framed: dict[int, float] = field(default_factory=lambda: dict[int, float]())  # spec index → last frame taken


class _Trouble(Exception):
    """A command outside the supervisor's tasks found the broker gone; the supervisor reconnects."""


class _Lane:
    """The scheduler ``Worker`` for the remote workers of one candidate revision: the pool's room and streams for it."""

    depth = DEPTH

    def __init__(self, pool: ClusterPool, candidate: str) -> None:
        self.name = f"{pool.name}+{tag(candidate)}"
        self.serves = candidate  # the scheduler hands it only the candidate's batches
        self._pool = pool

    async def ready(self) -> None:
        await self._pool.wait_for_room(self.serves)

    async def render(self, call: Call) -> list[RenderedImage]:
        return await self._pool.send(call, self.serves)


class ClusterPool:
    """Every remote worker of the cluster as one scheduler ``Worker``: a batch goes out when a live worker has room."""

    depth = DEPTH

    def __init__(
        self,
        config: ClusterConfig,
        *,
        model: str,
        revision: str,
        name: str = "cluster",
        max_images: int = 8,
        candidates: Sequence[str] = (),
        preview: PreviewConfig | None = None,
    ) -> None:
        if not config.enabled:
            raise ValueError("a cluster needs cluster.broker")
        if candidates and not all(exact_revision(item) for item in (revision, *candidates)):
            raise ValueError("with candidates, the production revision and each candidate must be exact")
        self.name = name
        self.session = secrets.token_hex(8)  # new at every start: workers drop batches of an earlier session
        # The revision every worker must serve: the configured one when exact, else the first worker's.
        self.revision: str | None = revision if exact_revision(revision) else None
        self._config = config
        self._keys = Keys(config.prefix)
        self._candidates = tuple(candidates)  # exact revisions served beside the production one
        self.lanes: list[ClusterPool | _Lane] = [self, *(_Lane(self, candidate) for candidate in self._candidates)]
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
        self._workers: dict[str, WorkerInfo] = {}  # alive and serving the pinned revision or a candidate
        self._refused: dict[str, str] = {}  # consumer → the revision it was refused for (logged once)
        self._strikes = Strikes(config.strikes)
        self._known: dict[str, float] = {}  # worker → when its heartbeat was last seen: its events stream is read
        self._first_seen: dict[str, float] = {}  # consumer → when first seen: the first pins a branch's revision
        self._max_bytes = round(config.max_image_mib * 2**20)
        preview = preview or PreviewConfig()
        self._preview_side = preview.max_side
        self._preview_gap = max(_PREVIEW_FLOOR, preview.min_interval / 2)
        self._reader = Reader(self._redis, max_image_bytes=self._max_bytes, max_images=max_images)
        self._started_ms = int(time.time() * 1000)
        self._finished: list[tuple[str, bytes]] = []  # (stream, entry) whose outcome was taken: ack and delete them
        # Slots holding a place, from ready() to their next ready(), by the revision they send (None: production).
        self._holders: dict[str | None, set[asyncio.Task[Any]]] = {None: set()}
        self._holders.update((candidate, set()) for candidate in self._candidates)
        self._changed = asyncio.Event()  # set and replaced whenever room may have changed
        self._up = False
        self._connected_once = False
        self._alone_since: float | None = None  # when the last accepted worker left
        self._grace_until = 0.0  # after a reconnect, workers have a heartbeat's time to announce themselves again
        self._abandoned: list[tuple[int, str, bytes | None]] = []  # batches given up, and their stream: stop them
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
        """The live workers serving the pinned revision or a candidate, by name."""
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
        """Return once a live worker of the production revision has room for one more batch."""
        await self.wait_for_room(None)

    async def render(self, call: Call) -> list[RenderedImage]:
        return await self.send(call, None)

    async def wait_for_room(self, candidate: str | None) -> None:
        """Return once a live worker of the revision (None: production) has room for one more batch; the calling
        slot holds that room until it asks again (so a batch split after running out of memory keeps its place)."""
        slot = asyncio.current_task()
        assert slot is not None
        if slot in self._holders[candidate]:
            self._holders[candidate].discard(slot)
            self._notify()
        while not self._has_room(candidate):  # which replaces the set of holders with those still alive
            await self._changed.wait()
        self._holders[candidate].add(slot)

    async def send(self, call: Call, candidate: str | None) -> list[RenderedImage]:
        """Send a batch to the workers of a revision (None: production) through its stream, and await its outcome."""
        if not self._up:
            raise WorkerLost("the cluster's broker is unreachable", blameless=True)
        if call.stopping:
            raise RenderStopped
        batch_id = next(self._ids)
        limit = deadline(call.specs, lease=self._config.lease, seconds_per_step=self._config.seconds_per_step)
        future = asyncio.get_running_loop().create_future()
        stream = self._keys.batches_of(candidate)
        revision = self.revision if candidate is None else candidate
        flight = _Flight(batch_id, call, future, secrets.token_hex(16), limit, stream, revision)
        self._flights[batch_id] = flight
        call.when_stopped(lambda: self._stop(flight))
        try:
            try:
                batch = RenderBatch(batch_id, call.specs, call.previews)
                fields = pack(batch, session=self.session, nonce=flight.nonce)
                entry: dict[FieldT, EncodableT] = {**fields}
                entry_id = await kept(self._redis.xadd(stream, entry))
            except _BROKEN as error:
                self._lost(error)  # which fails this flight too
            else:
                flight.entry_id = entry_id if isinstance(entry_id, bytes) else entry_id.encode()
                if flight.future.done() and self._up:  # stopped while its entry was on the way: delete it too
                    self._abandoned.append((batch_id, stream, flight.entry_id))
                    self._spawn(self._send_stops())
            return await flight.future
        finally:
            del self._flights[batch_id]
            if not flight.future.done():  # the slot was cancelled (the scheduler is closing): stop it for workers
                flight.future.cancel()
                self._abandoned.append((batch_id, stream, flight.entry_id))

    # Room

    def _has_room(self, candidate: str | None) -> bool:
        holders = self._holders[candidate] = {slot for slot in self._holders[candidate] if not slot.done()}
        revision = self.revision if candidate is None else candidate
        if not self._up or revision is None:
            return False
        room = sum(min(info.depth, MAX_DEPTH) for info in self._workers.values() if info.revision == revision)
        return len(holders) < room

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
        for stream in self._streams():
            await kept(create_group(self._redis, stream))
            if not self._connected_once:  # entries older than this bot are an earlier session's: nobody wants them
                await kept(self._redis.xtrim(stream, minid=f"{self._started_ms}-0", approximate=False))
        self._trouble.clear()
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

    def _streams(self) -> list[str]:
        """The batches streams: the production revision's, then each candidate's."""
        return [self._keys.batches_of(None), *(self._keys.batches_of(candidate) for candidate in self._candidates)]

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
            await self._sweep()

    async def _announce(self) -> None:
        info = BotInfo(self.session, self._model, self.revision, self._config.lease, self._candidates)
        heartbeat = self._config.heartbeat
        await kept(self._redis.set(self._keys.bot, info.dump(), ex=math.ceil(3 * heartbeat)))

    async def _scan(self) -> None:
        """Read every worker's heartbeats: the worker and device come from the key (which only that worker's Redis user
        may write), never from what the heartbeat says."""
        keys: list[str] = []
        cursor = 0
        while True:
            cursor, found = await kept(
                self._redis.scan(  # pyright: ignore[reportUnknownMemberType] (untyped **kwargs)
                    cursor, match=self._keys.beats, count=100
                )
            )
            keys += [key.decode() if isinstance(key, bytes) else str(key) for key in found]
            if not cursor or len(keys) >= _MAX_BEATS:
                break
        owners = {key: owner for key in sorted(keys)[:_MAX_BEATS] if (owner := self._keys.beat_of(key))}
        values = await kept(self._reader.beats(list(owners)))
        now = time.monotonic()
        seen: dict[str, WorkerInfo] = {}
        devices: dict[str, int] = {}
        for (key, (worker, device)), value in zip(owners.items(), values, strict=True):
            self._known[worker] = now
            if value is None or worker in self._strikes.refused:
                continue  # it expired between the two commands, or the worker is refused
            if isinstance(value, int):
                self._strikes.once(
                    worker, "beat", "Ignoring a heartbeat of worker %s: %d bytes, not a heartbeat", worker, value
                )
                continue
            try:
                info = WorkerInfo.load(value)
            except Exception as error:  # whatever a hostile heartbeat makes json or int() raise
                self._strikes.once(
                    worker, "beat", "Ignoring an unreadable heartbeat at %s: %s", key, shown(repr(error))
                )
                continue
            devices[worker] = devices.get(worker, 0) + 1
            if devices[worker] > MAX_DEVICES:
                self._strikes.once(
                    worker, "devices", "Worker %s has over %d devices: the rest are ignored", worker, MAX_DEVICES
                )
                continue
            name = consumer(worker, device)
            seen[name] = replace(info, name=name, depth=max(0, min(info.depth, MAX_DEPTH)))
        for worker in [worker for worker, last in self._known.items() if now - last > _KNOWN_SECONDS]:
            del self._known[worker]
        self._update_workers(seen)

    def _update_workers(self, seen: Mapping[str, WorkerInfo]) -> None:
        """Take in the heartbeats just read: pin a revision, accept or refuse workers, and note who left."""
        now = time.monotonic()
        accepted: set[str] = set()
        for name in seen:
            self._first_seen.setdefault(name, now)
        # In the order the bot first saw them, not the start time a heartbeat claims: the first pins a branch.
        for info in sorted(seen.values(), key=lambda info: (self._first_seen[info.name], info.name)):
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
            if info.revision != self.revision and info.revision not in self._candidates:
                if self._refused.get(info.name) != info.revision:
                    self._refused[info.name] = info.revision
                    log.warning(
                        "Refused worker %s: it serves revision %s; the bot is pinned to %s%s",
                        info.name,
                        info.revision,
                        self.revision,
                        f" (candidates {', '.join(self._candidates)})" if self._candidates else "",
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
        for name in [name for name in self._first_seen if name not in seen and name not in self._workers]:
            del self._first_seen[name]
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
                self._abandoned.append((flight.batch_id, flight.stream, flight.entry_id))

    def _stop(self, flight: _Flight) -> None:
        """Stop a batch nobody wants any more: one not yet started is answered at once, since no worker may ever
        take it (the bot may be shutting down with none up); one started ends with the worker's answer."""
        if self._flights.get(flight.batch_id) is not flight or flight.future.done():
            return
        if not flight.started:
            flight.future.set_exception(RenderStopped())
            self._abandoned.append((flight.batch_id, flight.stream, flight.entry_id))
        else:
            self._abandoned.append((flight.batch_id, flight.stream, None))  # its holder answers the stop
        if self._up:
            self._spawn(self._send_stops())

    async def _send_stops(self) -> None:
        """Set the stop keys of the batches given up and delete those not started, so no worker renders them; and
        acknowledge and delete the entries whose outcome was taken."""
        if not self._abandoned and not self._finished:
            return
        abandoned, self._abandoned = self._abandoned, []
        finished, self._finished = self._finished, []
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for batch_id, _, _ in abandoned:
                    pipe.set(self._keys.stop(self.session, batch_id), 1, ex=_STOP_SECONDS)
                entries = [(stream, entry_id) for _, stream, entry_id in abandoned if entry_id is not None] + finished
                for stream in dict.fromkeys(stream for stream, _ in entries):
                    ids = [entry_id for other, entry_id in entries if other == stream]
                    pipe.xack(stream, GROUP, *ids)
                    pipe.xdel(stream, *ids)
                await kept(pipe.execute())
        except _BROKEN:
            self._abandoned.extend(abandoned)  # sent once the broker is back
            self._finished.extend(finished)
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
        """Read the events streams of this session, one per worker, and hand each event to the batch it names; delete
        what was read. A stream's owner is its key's worker, the one Redis user that may write it."""
        while True:
            owners = {self._keys.events(worker, self.session): worker for worker in sorted(self._known)}
            found = await kept(self._reader.events(list(owners), count=_READ_COUNT))
            if not any(found.values()) and all(entries is not None for entries in found.values()):
                await asyncio.sleep(_POLL_SECONDS[0] if self._flights else _POLL_SECONDS[1])
                continue
            events: list[tuple[str, BatchEvent, dict[str, str]]] = []
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, entries in found.items():
                    worker = owners[key]
                    if entries is None:
                        self._strikes.once(worker, "stream", "Deleted %s: worker %s made it no stream", key, worker)
                        pipe.delete(key)
                        continue
                    if entries:
                        pipe.xdel(key, *(entry.id for entry in entries))
                    if worker in self._strikes.refused:
                        continue
                    for entry in entries:
                        if entry.fields is None:
                            self._strike(worker, f"an event of {entry.size} bytes, over the limits (dropped unread)")
                        elif (event := self._parse(worker, entry.fields)) is not None:
                            events.append((worker, *event))
                await kept(pipe.execute())
            holders = await self._holders_of(
                [flight for _, message, _ in events if (flight := self._awaited(message.batch_id))]
            )
            for worker, message, plain in events:
                try:
                    self._dispatch(worker, message, plain, holders)
                except Exception as error:  # one bad event never stops the pool
                    log.error("Dropped an event of worker %s that could not be taken", worker, exc_info=error)

    def _parse(self, worker: str, fields: Mapping[bytes, bytes]) -> tuple[BatchEvent, dict[str, str]] | None:
        try:
            message, plain = unpack(fields)
        except Exception as error:  # a malformed entry is dropped, whatever it makes the parser raise
            self._strikes.once(
                worker, "malformed", "Dropped a malformed event of worker %s: %s", worker, shown(str(error))
            )
            return None
        if not isinstance(message, BatchEvent):
            self._strikes.once(
                worker, "kind", "Dropped a %s message of worker %s: not a batch event", type(message).__name__, worker
            )
            return None
        return message, plain

    def _awaited(self, batch_id: int) -> _Flight | None:
        flight = self._flights.get(batch_id)
        return flight if flight is not None and not flight.future.done() and flight.entry_id is not None else None

    async def _holders_of(self, flights: Sequence[_Flight]) -> dict[tuple[str, bytes], tuple[str, int]]:
        """Return the consumer holding each flight's entry and its delivery count (XPENDING), by stream and entry;
        one nobody holds is left out."""
        ids = sorted({(flight.stream, flight.entry_id) for flight in flights if flight.entry_id is not None})
        if not ids:
            return {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for stream, entry_id in ids:
                pipe.xpending_range(stream, GROUP, entry_id, entry_id, 1)
            replies = await kept(pipe.execute())
        holders: dict[tuple[str, bytes], tuple[str, int]] = {}
        for key, reply in zip(ids, replies, strict=True):
            for item in reply:
                name = item["consumer"]
                holders[key] = (
                    name.decode() if isinstance(name, bytes) else str(name),
                    int(item["times_delivered"]),
                )
        return holders

    def _dispatch(
        self,
        worker: str,
        message: BatchEvent,
        plain: Mapping[str, str],
        holders: Mapping[tuple[str, bytes], tuple[str, int]],
    ) -> None:
        """Take one event of ``worker``'s stream for the batch it names, if that worker may speak for the batch."""
        flight = self._awaited(message.batch_id)
        if flight is None:
            log.debug(
                "Dropped %s of batch %d from worker %s: nobody awaits it",
                type(message).__name__,
                message.batch_id,
                worker,
            )
            return
        sender = plain.get("worker", "")
        if worker_of(sender) != worker or plain.get("nonce") != flight.nonce:
            self._strikes.once(
                worker,
                "forged",
                "Dropped events of worker %s for batches it was not given (wrong nonce or consumer)",
                worker,
            )
            return
        assert flight.entry_id is not None
        holder, deliveries = holders.get((flight.stream, flight.entry_id), ("", 0))
        if (flight.holder if isinstance(message, Progress | Preview) else holder) != sender:
            self._strikes.once(
                worker,
                "holder",
                "Dropped events of worker %s for batches it does not hold (another worker took them over, or none)",
                worker,
            )
            return
        facts: dict[str, object] = {}
        if isinstance(message, Started):
            if not flight.started:  # the crashes of a batch count from its first start, whoever starts it again
                flight.started, flight.deliveries = True, deliveries
            flight.holder = sender
            flight.call.facts["worker"] = sender
        elif isinstance(message, Rendered):
            if sender in self._refused:
                log.warning("Dropped batch %d from worker %s: it serves another revision", message.batch_id, sender)
                self._give_up(flight, WorkerLost(f"worker {sender} serves another revision", blameless=True))
                return
            if (mismatch := self._serves_other(sender, flight)) is not None:
                self._strike(
                    worker, f"rendered batch {message.batch_id} of another revision than it serves ({mismatch})"
                )
                self._give_up(flight, WorkerLost(f"worker {sender} serves another revision", blameless=True))
                return
            result = checked(message, flight.call.specs, max_bytes=self._max_bytes)
            if isinstance(result, str):
                self._strike(worker, f"batch {message.batch_id} came back with {result}")
                self._give_up(flight, RenderFailed(_BROKEN_IMAGE))
                return
            self._strikes.clear(worker)
            info = self._workers.get(sender)
            facts = {"worker": sender, "revision": flight.revision, "dtype": info.dtype if info is not None else None}
            message = result
        elif isinstance(message, Preview):
            if not self._take_frame(worker, flight, message):
                return
        elif isinstance(message, Failed):
            if message.kind not in _FIXED:
                return
            log.info(
                "Batch %d failed on %s (%s): %s", message.batch_id, sender, message.kind, shown(str(message.message))
            )
            message = Failed(message.batch_id, message.kind, _FIXED[message.kind])
        answer(flight.call, flight.future, message, facts)
        if isinstance(message, Rendered | Failed):
            self._finished.append((flight.stream, flight.entry_id))
            self._spawn(self._send_stops())

    def _take_frame(self, worker: str, flight: _Flight, frame: Preview) -> bool:
        """Return whether to show a worker's preview frame: of an image asked for, not too soon after that image's
        last one, and a small JPEG that decodes. A bad frame is dropped (said once per worker); the batch goes on."""
        now = time.monotonic()
        if (
            frame.index not in flight.call.previews
            or now - flight.framed.get(frame.index, -math.inf) < self._preview_gap
        ):
            return False
        problem = checked_preview(frame, max_side=self._preview_side)
        if problem is not None:
            self._strikes.once(worker, "preview", "Dropped preview frames of worker %s: %s", worker, problem)
            return False
        flight.framed[frame.index] = now
        return True

    # Batches held too long, taken over, or by a refused worker

    async def _sweep(self) -> None:
        """Look at who holds each batch sent: give up those past their deadline, held by a refused worker, or taken
        from the bot's hands; fail those that stopped ``MAX_CRASHES`` workers."""
        flights = [flight for flight in self._flights.values() if self._awaited(flight.batch_id) is flight]
        holders = await self._holders_of(flights)
        now = time.monotonic()
        for flight in flights:
            if flight.future.done():
                continue
            assert flight.entry_id is not None
            holding = holders.get((flight.stream, flight.entry_id))
            if holding is None:
                if flight.holding is not None:
                    log.warning(
                        "Batch %d left the workers' hands without an outcome (its entry was acknowledged or deleted): "
                        "it goes back in line",
                        flight.batch_id,
                    )
                    self._give_up(flight, WorkerLost("its entry was taken from the stream", blameless=True))
                continue
            holder, deliveries = holding
            worker = worker_of(holder)
            if flight.holding is None or worker_of(flight.holding) != worker:
                flight.held_since = now  # a new worker's deadline; its own consumers passing it on restart nothing
            flight.holding = holder
            if worker in self._strikes.refused:
                self._give_up(flight, WorkerLost(f"worker {worker} is refused", blameless=True))
            elif (mismatch := self._serves_other(holder, flight)) is not None:
                self._strike(worker, f"took batch {flight.batch_id} of another revision than it serves ({mismatch})")
                self._give_up(flight, WorkerLost(f"worker {worker} serves another revision", blameless=True))
            elif flight.started and deliveries - flight.deliveries >= MAX_CRASHES:
                log.warning(
                    "Batch %d stopped %d workers: its jobs fail", flight.batch_id, deliveries - flight.deliveries
                )
                self._give_up(
                    flight,
                    RenderFailed(
                        f"Rendering this job stopped GPU workers {MAX_CRASHES} times, so it was given up. Try other "
                        "settings, or tell the bot's operator."
                    ),
                )
            elif flight.held_since is not None and now - flight.held_since > flight.deadline:
                self._strike(worker, f"held batch {flight.batch_id} past its deadline of {flight.deadline:.0f} s")
                self._give_up(flight, WorkerLost(f"worker {worker} held it past its deadline", blameless=True))

    def _serves_other(self, holder: str, flight: _Flight) -> str | None:
        """Return the revision a consumer holding a batch announces when it is not the batch's (every batches stream
        is open to every worker); None when it is, or when it announces none (as before candidates)."""
        info = self._workers.get(holder)
        return None if info is None or info.revision == flight.revision else str(info.revision)

    def _give_up(self, flight: _Flight, error: Exception) -> None:
        """Fail a batch (the scheduler puts its jobs back in line, or fails them) and take it back from the workers."""
        if not flight.future.done():
            flight.future.set_exception(error)
        self._abandoned.append((flight.batch_id, flight.stream, flight.entry_id))
        self._spawn(self._send_stops())

    def _strike(self, worker: str, why: str) -> None:
        if self._strikes.strike(worker, why):
            for name in [name for name in self._workers if worker_of(name) == worker]:
                del self._workers[name]
            self._notify()
