"""The batches a remote worker holds: from the stream entry a consumer took until it is acknowledged or given back.

``Batches`` does for the worker host (``bot.cluster.remote``) all that happens to an entry in hand:

- render: a batch of an earlier bot session is dropped unrendered, one stopped before it started fails at once, and
  the rest render on the consumer's local executor;
- publish: ``Started``, ``Progress`` (at most four a second), ``Preview`` frames (as the local worker throttles them)
  and then ``Rendered`` or ``Failed`` go, in order, to
  this worker's ``{prefix}:w:{worker}:events:{session}``, each with the entry's nonce. The bot takes them only while
  this worker's consumer holds the entry, so the entry stays pending until the bot acknowledges and deletes it. The
  outcome is retried for up to a lease while Redis is away; the rest is tried once. An entry dropped unrendered (of an
  earlier session, or malformed) is acknowledged here;
- renew: while a batch is in hand its lease is renewed and its stop key checked every heartbeat; a renewal first
  checks that the entry is still this consumer's, so a worker that was unheard past its lease never takes a batch
  back from the one that took it over (it finishes its copy; the bot keeps the first result);
- give back: a batch this worker will not finish (its local process died, or the worker is stopping and the grace
  ran out) is made claimable at once (XCLAIM … IDLE lease) rather than after its lease, and nothing is published
  for it: ``Failed(STOPPED)`` would tell the bot that nobody wants it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.exceptions import ResponseError
from redis.typing import EncodableT, FieldT, StreamIdT

from bot.cluster.broker import UNREACHABLE, Retry, no_group, unreachable_errors
from bot.cluster.wire import GROUP, BotInfo, Keys, pack, unpack, worker_of
from bot.engine.executor import Call, Worker, WorkerLost, failed, rendered
from bot.engine.protocol import Failed, FailureKind, Message, Preview, Progress, RenderBatch, Rendered, Started

log = logging.getLogger(__name__)

_PROGRESS_INTERVAL = 0.25  # seconds between two progress events of one batch: Redis is not a progress bar
_EVENTS_MAXLEN = 10_000


@dataclass(eq=False, slots=True)
class Held:
    """A stream entry a consumer holds, from the read until it is acknowledged, given back or dropped."""

    entry: str
    session: str
    batch: RenderBatch | None  # None: a malformed entry, acknowledged without rendering
    stream: str = ""  # the batches stream it was read from (its revision's); "" stands for ``Keys.batches``
    nonce: str = ""  # new at every dispatch; the bot takes only events that repeat it
    call: Call | None = None  # once handed to the local executor
    renewing: bool = True  # False once the entry is no longer this consumer's (taken over, or Redis lost it)
    task: asyncio.Task[None] | None = None
    # When this consumer last took or renewed it (time.monotonic()): an entry still its own has been idle at least
    # this long in Redis, one taken by another worker since has not.
    claimed_at: float = field(default_factory=time.monotonic)

    @classmethod
    def read(cls, entry: str, fields: Mapping[bytes, bytes], stream: str = "") -> Held:
        """Take in an entry just read; a malformed one is logged and held for acknowledging only."""
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
        return cls(entry, plain.get("session", ""), batch, stream, plain.get("nonce", ""))


class Batches:
    """Render, publish, renew and give back the batches a worker host's consumers hold."""

    def __init__(self, redis: Redis, keys: Keys, *, lease: float, retry: Retry) -> None:
        self._redis = redis
        self._keys = keys
        self._lease = lease
        self._lease_ms = max(1, round(lease * 1000))
        self._events_ttl = math.ceil(max(60.0, 10 * lease))
        self._retry = retry  # tells the host whether the broker answers

    async def serve(self, consumer: str, worker: Worker, held: Held, *, lost_worker: Callable[[], None]) -> None:
        """Render one entry's batch on ``worker`` and publish its outcome; or drop it, or give it back (then call
        ``lost_worker``: the local executor is gone until it is ready again)."""
        batch = held.batch
        if batch is None:
            await self._acknowledge(self._stream(held), held.entry)
            return
        current, stopped = await self._check(held.session, batch.batch_id)
        if not current:
            log.info(
                "Dropping batch %d: it belongs to an earlier run of the bot (session %s)", batch.batch_id, held.session
            )
            await self._acknowledge(self._stream(held), held.entry)
            return
        session, nonce = held.session, held.nonce
        events = _Events(lambda message: self._publish(session, consumer, nonce, message))
        try:
            if stopped:
                outcome: Message | None = Failed(batch.batch_id, FailureKind.STOPPED, "stopped before it started")
            else:
                outcome = await self._render(consumer, worker, held, batch, events, lost_worker)
            if outcome is None:
                return
            if await events.finish(outcome):
                _log_outcome(outcome, consumer)  # the bot acknowledges the entry when it takes the outcome
            else:
                log.warning(
                    "Dropped the outcome of batch %d: Redis was away for a whole lease (%g s), so the batch is "
                    "rendered again elsewhere",
                    batch.batch_id,
                    self._lease,
                )
        finally:
            events.close()

    async def renew(self, consumer: str, held: Sequence[Held]) -> None:
        """Renew the lease of each entry still this consumer's, and stop the batches the bot no longer wants."""
        pipe = self._redis.pipeline(transaction=False)
        for item in held:
            assert item.batch is not None
            pipe.xpending_range(self._stream(item), GROUP, item.entry, item.entry, 1, consumername=consumer)
            pipe.exists(self._keys.stop(item.session, item.batch.batch_id))
        replies = await pipe.execute(raise_on_error=False)
        mine: list[Held] = []
        for index, item in enumerate(held):
            assert item.batch is not None
            pending, stop = replies[2 * index], replies[2 * index + 1]
            for reply in (pending, stop):
                if isinstance(reply, Exception) and not (isinstance(reply, ResponseError) and no_group(reply)):
                    raise reply
            if item.renewing and (isinstance(pending, Exception) or not pending):
                item.renewing = False
                log.warning(
                    "Batch %d is no longer this worker's: it was unheard past its lease and another worker took the "
                    "batch, or Redis lost it. Finishing it anyway; the bot keeps the first result",
                    item.batch.batch_id,
                )
            if item.renewing:
                mine.append(item)
            if stop is True or (isinstance(stop, int) and stop > 0):
                if item.call is not None and not item.call.stopping:
                    log.info("Stopping batch %d: the bot no longer wants it", item.batch.batch_id)
                    item.call.stop()
        if not mine:
            return
        # Checking and claiming are two commands, and another worker may take an entry between them (one that found
        # this worker unheard past its lease, or a hostile one): each claim asks for an entry idle at least as long
        # as it has been since this consumer last claimed it, which a taken entry has not been, so none is taken back.
        pipe = self._redis.pipeline(transaction=False)
        now = time.monotonic()
        for item in mine:
            idle_ms = max(0, int((now - item.claimed_at) * 1000) - 1)
            pipe.xclaim(self._stream(item), GROUP, consumer, idle_ms, [item.entry], justid=True)
        claims = await pipe.execute(raise_on_error=False)
        now = time.monotonic()
        for item, claimed in zip(mine, claims, strict=True):
            if isinstance(claimed, Exception):
                if not (isinstance(claimed, ResponseError) and no_group(claimed)):
                    raise claimed
            elif claimed:
                item.claimed_at = now
            else:
                assert item.batch is not None
                item.renewing = False
                log.warning(
                    "Batch %d is no longer this worker's: another worker took it as its lease was renewed. Finishing "
                    "it anyway; the bot keeps the first result",
                    item.batch.batch_id,
                )

    async def give_back(self, consumer: str, held: Sequence[Held]) -> None:
        """Make entries claimable by any worker now, instead of when their lease runs out."""
        entries = [item.entry for item in held]
        try:
            for stream in dict.fromkeys(self._stream(item) for item in held):
                ids: list[StreamIdT] = [item.entry for item in held if self._stream(item) == stream]
                await self._redis.xclaim(stream, GROUP, consumer, 0, ids, idle=self._lease_ms, justid=True)
        except (*unreachable_errors(), ResponseError) as error:
            log.info(
                "Could not give back %d batches (%s); another worker takes them when their lease runs out",
                len(entries),
                error,
            )

    async def _check(self, session: str, batch_id: int) -> tuple[bool, bool]:
        """Return whether a batch is of the bot's current session, and whether it was stopped before it started."""

        async def ask() -> list[object]:
            pipe = self._redis.pipeline(transaction=False)
            pipe.get(self._keys.bot)
            pipe.exists(self._keys.stop(session, batch_id))
            return await pipe.execute()

        replies = await self._retry.once(ask())
        if replies is UNREACHABLE:
            return True, False  # render it: a stop is still seen while it renders
        raw, stop = replies
        bot = BotInfo.read(raw)
        return bot is None or bot.session == session, bool(stop)

    async def _render(
        self,
        consumer: str,
        worker: Worker,
        held: Held,
        batch: RenderBatch,
        events: _Events,
        lost_worker: Callable[[], None],
    ) -> Message | None:
        """Render a batch on the local executor; return its outcome, or None when it was given back."""
        began: list[float] = []

        def on_started() -> None:
            began.append(time.perf_counter())
            events.send(Started(batch.batch_id))

        def on_progress(step: int, total: int) -> None:
            events.progress(batch.batch_id, step, total)

        def on_preview(index: int, step: int, total: int, jpeg: bytes) -> None:
            events.send(Preview(batch.batch_id, index, step, total, jpeg))

        call = Call(batch.specs, on_started, on_progress, previews=batch.previews, on_preview=on_preview)
        held.call = call
        try:
            images = await worker.render(call)
        except WorkerLost as error:
            # Rendering it again here would wait for the local restart; any worker with room can start it now.
            # The bot sees the new worker's Started; a batch that kills every worker is the bot's to give up on.
            lost_worker()
            log.warning("Lost batch %d with the local worker (%s); giving it back", batch.batch_id, error)
            if held.renewing:
                held.renewing = False
                await self.give_back(consumer, [held])
            return None
        except Exception as error:
            failure = failed(batch.batch_id, error)
            if failure is None:
                log.exception("Rendering batch %d failed on %s", batch.batch_id, consumer)
                failure = Failed(batch.batch_id, FailureKind.ERROR, f"Rendering failed on worker {consumer}.")
            return failure
        now = time.perf_counter()
        return rendered(batch.batch_id, images, call.facts, seconds=now - (began[0] if began else now))

    async def _publish(self, session: str, consumer: str, nonce: str, message: Message) -> bool:
        """Add an event to this worker's stream for the session; an outcome is retried for a lease, the rest tried
        once."""
        key = self._keys.events(worker_of(consumer), session)
        # Copied into the key and value types redis-py's annotations ask for.
        packed = pack(message, worker=consumer, nonce=nonce)
        fields: dict[FieldT, EncodableT] = {name: value for name, value in packed.items()}

        async def add() -> None:
            pipe = self._redis.pipeline(transaction=False)
            pipe.xadd(key, fields, maxlen=_EVENTS_MAXLEN, approximate=True)
            pipe.expire(key, self._events_ttl)  # outlives a bot that stopped only by this long
            await pipe.execute()

        if isinstance(message, Started | Progress | Preview):
            return await self._retry.once(add()) is not UNREACHABLE
        return await self._retry.persist(add, self._lease)

    async def _acknowledge(self, stream: str, entry: str) -> None:
        """Acknowledge an entry dropped unrendered (the bot deletes the stream's old entries when it starts)."""

        async def done() -> None:
            await self._redis.xack(stream, GROUP, entry)

        await self._retry.persist(done, self._lease)

    def _stream(self, held: Held) -> str:
        return held.stream or self._keys.batches


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
