"""What the bot takes from remote workers, none of whom it trusts: a donated GPU may render, nothing more.

- ``Reader`` reads workers' heartbeats and events streams through Lua scripts that leave in Redis whatever is too
  large: a worker that writes a 300 MiB "image" costs the bot a marker, not 300 MiB of memory.
- ``checked`` lets a ``Rendered`` through only with one real PNG per spec, each of the size asked for and at most
  ``cluster.max_image_mib``; the seeds are the bot's own, never the worker's (its other facts are for the stats).
- ``checked_preview`` lets a preview frame through only as a JPEG that decodes, at most ``preview.max_side`` pixels a
  side and ``MAX_PREVIEW_BYTES``; the pool takes frames only from the worker holding the batch, a few a second at most.
- ``deadline`` is how long a worker may hold a batch: the lease plus ``cluster.seconds_per_step`` per step and
  megapixel.
- ``Strikes`` counts a worker's bad results and missed deadlines in a row; at ``cluster.strikes`` it is refused.
  ``once`` logs a kind of misbehaviour once per worker, so a hostile one cannot flood the log.

Every text a worker wrote reaches a log only through ``wire.shown``; none reaches Discord.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, cast

from PIL import Image

from bot.engine.images import check_rendered
from bot.engine.protocol import MAX_PREVIEW_BYTES, Preview, Rendered
from bot.engine.types import ImageSpec, RenderedImage

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

BEAT_BYTES = 4096  # a heartbeat is a few hundred bytes of JSON
_PLAIN_FIELDS = 4  # data, worker, nonce, session: the fields of an entry besides its blobs

# KEYS: events streams. ARGV: largest field, most fields, entries per stream, bytes in all.
# Returns per stream {key, entries} where an entry is {id, fields}, {id, {"$refused", size}} for one with a field or
# a count of fields over the limits, and entries is 0 for a key that is not a stream. Stops at the byte budget.
_EVENTS_LUA = """
local largest, most, count, budget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local out, spent = {}, 0
for _, key in ipairs(KEYS) do
  local read = redis.pcall('XRANGE', key, '-', '+', 'COUNT', count)
  if type(read) == 'table' and read.err then
    out[#out + 1] = {key, 0}
  else
    local kept = {}
    for _, entry in ipairs(read) do
      local fields, size, big = entry[2], 0, #entry[2] > 2 * most
      for i = 1, #fields do
        size = size + #fields[i]
        if #fields[i] > largest then big = true end
      end
      if big then
        kept[#kept + 1] = {entry[1], {'$refused', tostring(size)}}
      elseif spent + size > budget and spent > 0 then
        break
      else
        spent = spent + size
        kept[#kept + 1] = entry
      end
    end
    out[#out + 1] = {key, kept}
  end
  if spent >= budget then break end
end
return out
"""

# KEYS: heartbeat keys. ARGV: largest value. Returns per key {0} (gone), {1, value} or {2, size} (not a small string).
_BEATS_LUA = """
local largest, out = tonumber(ARGV[1]), {}
for i, key in ipairs(KEYS) do
  local size = redis.pcall('STRLEN', key)
  if type(size) == 'table' then
    out[i] = {2, -1}
  elseif size > largest then
    out[i] = {2, size}
  elseif size == 0 then
    out[i] = {0}
  else
    out[i] = {1, redis.call('GET', key)}
  end
end
return out
"""


@dataclass(frozen=True, slots=True)
class Entry:
    """One entry of a worker's events stream as the bot read it: its fields, or None with the size it refused."""

    id: bytes
    fields: dict[bytes, bytes] | None
    size: int = 0


class Reader:
    """Heartbeats and events streams, read with every value capped (the rest stays in Redis)."""

    def __init__(self, redis: Redis, *, max_image_bytes: int, max_images: int) -> None:
        self._largest = max_image_bytes
        self._most = max_images + _PLAIN_FIELDS
        self._budget = max_image_bytes * (max_images + 1)  # bytes one read may bring: one full batch
        self._events = redis.register_script(_EVENTS_LUA)
        self._beats = redis.register_script(_BEATS_LUA)

    async def events(self, keys: Sequence[str], *, count: int) -> dict[str, list[Entry] | None]:
        """Return the entries of each stream (None: the key is no stream), up to ``count`` each and a batch's worth of
        bytes in all; a stream left out by the budget is read next time."""
        if not keys:
            return {}
        reply: Any = await self._events(keys=list(keys), args=[self._largest, self._most, count, self._budget])
        found: dict[str, list[Entry] | None] = {}
        for key, items in reply:
            name = key.decode() if isinstance(key, bytes) else str(key)
            if not isinstance(items, list):
                found[name] = None
                continue
            entries: list[Entry] = []
            for item in cast(list[Any], items):
                entry_id: bytes = item[0]
                pairs: list[bytes] = list(item[1])
                if pairs and pairs[0] == b"$refused":
                    entries.append(Entry(entry_id, None, int(pairs[1])))
                else:
                    entries.append(Entry(entry_id, dict(zip(pairs[::2], pairs[1::2], strict=True))))
            found[name] = entries
        return found

    async def beats(self, keys: Sequence[str]) -> list[bytes | int | None]:
        """Return each heartbeat's value; None for one gone, or the size of one refused (-1: not a string)."""
        if not keys:
            return []
        reply: Any = await self._beats(keys=list(keys), args=[BEAT_BYTES])
        return [item[1] if item[0] == 1 else (int(item[1]) if item[0] == 2 else None) for item in reply]


def checked(event: Rendered, specs: Sequence[ImageSpec], *, max_bytes: int) -> Rendered | str:
    """Return a worker's ``Rendered`` fit to post (one checked PNG per spec, the specs' seeds), else why not."""
    if len(event.images) != len(specs):
        return f"{len(event.images)} images for a batch of {len(specs)}"
    images: list[RenderedImage] = []
    for index, (image, spec) in enumerate(zip(event.images, specs, strict=True)):
        settings = spec.settings
        problem = check_rendered(image.png, width=settings.width, height=settings.height, max_bytes=max_bytes)
        if problem is not None:
            return f"image {index + 1}: {problem}"
        images.append(replace(image, seed=spec.seed, nsfw=image.nsfw is True))
    return replace(event, images=tuple(images))


def checked_preview(event: Preview, *, max_side: int) -> str | None:
    """Return None for a worker's preview frame fit to show (a JPEG that decodes, at most ``max_side`` pixels a side
    and ``MAX_PREVIEW_BYTES``), else why not (for the log)."""
    jpeg = event.jpeg
    if len(jpeg) > MAX_PREVIEW_BYTES:
        return f"a frame of {len(jpeg)} bytes, over the limit of {MAX_PREVIEW_BYTES}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(jpeg), formats=["JPEG"]) as image:
                if max(image.size) > max_side:  # read from the header, before decoding anything
                    return f"a frame of {image.width}×{image.height} pixels, over {max_side} a side"
                image.load()
    except Exception as error:  # whatever Pillow raises for bytes it cannot decode
        return f"a frame that is not a JPEG that decodes ({type(error).__name__})"
    return None


def deadline(specs: Sequence[ImageSpec], *, lease: float, seconds_per_step: float) -> float:
    """Return the seconds a worker may hold a batch: the lease, plus ``seconds_per_step`` per step and megapixel."""
    work = sum(spec.settings.steps * spec.settings.width * spec.settings.height for spec in specs) / 1e6
    return lease + seconds_per_step * work


class Strikes:
    """Each worker's bad results in a row; at ``limit`` the worker is refused until the bot restarts."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._count: dict[str, int] = {}
        self.refused: set[str] = set()
        self._told: set[tuple[str, str]] = set()

    def strike(self, worker: str, why: str) -> bool:
        """Count one against ``worker`` (logged); return whether that refuses it."""
        if worker in self.refused:
            return False
        count = self._count[worker] = self._count.get(worker, 0) + 1
        log.warning("Worker %s: %s (strike %d of %d)", worker, why, count, self._limit)
        if count < self._limit:
            return False
        self.refused.add(worker)
        log.error(
            "Refused worker %s after %d strikes in a row: its heartbeats, batches and events are ignored until the "
            "bot restarts. Revoke its Redis user: sygil-bot cluster revoke-worker %s",
            worker,
            count,
            worker,
        )
        return True

    def clear(self, worker: str) -> None:
        """A good result: the strikes in a row start again from nothing."""
        self._count.pop(worker, None)

    def once(self, worker: str, kind: str, message: str, *args: object) -> None:
        """Log ``message`` the first time ``worker`` does ``kind``; later ones at debug level."""
        if (worker, kind) in self._told:
            log.debug(message, *args)
            return
        self._told.add((worker, kind))
        log.warning(message + " (said once per worker)", *args)
