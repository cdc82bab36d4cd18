"""What the bot and remote workers write to Redis: the keys, and the worker protocol's messages as stream entries.

The bot (one per cluster) and any number of ``sygil-bot worker`` processes share one Redis. All keys start with
``cluster.prefix`` (default ``sygil``):

``{prefix}:batches``                stream, bot → workers: one ``RenderBatch`` per entry, read through the consumer
                                    group ``workers``; an entry pending longer than its lease (the worker died or
                                    lost the network) is claimed by another worker (XAUTOCLAIM). A worker holding an
                                    entry renews its lease (XCLAIM … JUSTID) while it renders.
``{prefix}:events:{session}``       stream, workers → one bot session: ``Started``, ``Progress``, ``Rendered`` and
                                    ``Failed``, each naming its batch. The bot reads it alone (XREAD); an event for
                                    a batch it no longer waits for (a late duplicate) is dropped.
``{prefix}:bot``                    the bot's announcement (``BotInfo``, with a TTL): its session, model and the
                                    revision workers must serve. Without it, workers wait.
``{prefix}:worker:{name}``          a worker's heartbeat (``WorkerInfo``, with a TTL): what it serves and on what.
``{prefix}:stop:{session}:{batch}`` set when nobody wants a batch any more; the worker stops it at its next step.

A stream entry's fields: ``data``, the message's ``protocol.encode`` dict as JSON with every bytes value (PNGs,
init images) replaced by ``{"$blob": i}``; ``b{i}``, those bytes as they are (Redis values are binary-safe, so no
base64); and a few plain fields (``session``, ``worker``).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from bot.engine.protocol import Message, decode, encode

log = logging.getLogger(__name__)

GROUP = "workers"  # the consumer group of the batches stream
_BLOB = "$blob"
SHOWN_LENGTH = 64  # characters of a worker's text (name, host, device) kept for logs and /queue
_SAFE = frozenset(" .:,+-()/")
_EXACT_REVISION = re.compile(r"[0-9a-f]{40}|sha256:[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class Keys:
    """The Redis keys of one cluster."""

    prefix: str = "sygil"

    @property
    def batches(self) -> str:
        return f"{self.prefix}:batches"

    @property
    def bot(self) -> str:
        return f"{self.prefix}:bot"

    def events(self, session: str) -> str:
        return f"{self.prefix}:events:{session}"

    def worker(self, name: str) -> str:
        return f"{self.prefix}:worker:{name}"

    @property
    def workers(self) -> str:
        """The pattern matching every worker's heartbeat key (for SCAN)."""
        return f"{self.prefix}:worker:*"

    def stop(self, session: str, batch_id: int) -> str:
        return f"{self.prefix}:stop:{session}:{batch_id}"


@dataclass(frozen=True, slots=True)
class BotInfo:
    """The bot's announcement: workers serve only the session and revision it names."""

    session: str  # new at every start: batches of an earlier session are dropped, not rendered
    model: str
    revision: str | None  # the exact revision workers must serve; None until the first worker pins it
    lease: float  # seconds a batch may stay with a silent worker before another claims it

    def dump(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def load(cls, text: str | bytes) -> BotInfo:
        data = json.loads(text)
        return cls(str(data["session"]), str(data["model"]), data["revision"], float(data["lease"]))

    @classmethod
    def read(cls, raw: object) -> BotInfo | None:
        """Return the announcement as read from Redis: None when there is none, or when it is malformed (logged)."""
        if not isinstance(raw, str | bytes):
            return None
        try:
            return cls.load(raw)
        except (ValueError, KeyError, TypeError) as error:
            log.warning("The bot's announcement in Redis is malformed (%r); treating it as absent", error)
            return None


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """A worker's heartbeat: who it is, what it serves, and whether it is rendering."""

    name: str
    host: str
    device: str
    device_name: str
    model: str
    revision: str | None
    dtype: str
    depth: int  # batches it takes at once
    busy: int  # batches it holds now
    started_at: float

    def describe(self) -> str:
        """What the worker serves, for the log: device, host, model, revision, dtype and depth."""
        batches = "batch" if self.depth == 1 else "batches"
        return (
            f"device {self.device_name} ({self.device}) on {self.host}, model {self.model}, revision {self.revision}, "
            f"{self.dtype}, {self.depth} {batches} at once"
        )

    def dump(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def load(cls, text: str | bytes) -> WorkerInfo:
        """Read a heartbeat; its text is made safe to log and show (``shown``), as a worker may be hostile."""
        data = json.loads(text)
        return cls(
            name=shown(str(data["name"])),
            host=shown(str(data["host"])),
            device=shown(str(data["device"])),
            device_name=shown(str(data["device_name"])),
            model=shown(str(data["model"])),
            revision=data["revision"],
            dtype=shown(str(data["dtype"])),
            depth=int(data["depth"]),
            busy=int(data["busy"]),
            started_at=float(data["started_at"]),
        )


def pack(message: Message, **plain: str) -> dict[str, str | bytes]:
    """Return a stream entry's fields for a protocol message, plus ``plain`` string fields."""
    blobs: list[bytes] = []

    def strip(value: Any) -> Any:
        if isinstance(value, bytes):
            blobs.append(value)
            return {_BLOB: len(blobs) - 1}
        if isinstance(value, dict):
            return {key: strip(item) for key, item in value.items()}  # pyright: ignore[reportUnknownVariableType]
        if isinstance(value, list | tuple):
            return [strip(item) for item in value]  # pyright: ignore[reportUnknownVariableType]
        return value

    fields: dict[str, str | bytes] = {"data": json.dumps(strip(encode(message)), ensure_ascii=False)}
    fields.update(plain)
    fields.update((f"b{index}", blob) for index, blob in enumerate(blobs))
    return fields


def unpack(fields: Mapping[bytes, bytes] | Mapping[str, bytes]) -> tuple[Message, dict[str, str]]:
    """Return the message of a stream entry and its plain fields; raise ValueError for a malformed entry."""
    raw = {(key.decode() if isinstance(key, bytes) else key): value for key, value in fields.items()}
    try:
        data = json.loads(raw["data"])
    except (KeyError, ValueError) as error:
        raise ValueError(f"a stream entry without its message: {error!r}") from None

    def restore(value: Any) -> Any:
        if isinstance(value, dict):
            if set(value) == {_BLOB}:  # pyright: ignore[reportUnknownArgumentType]
                try:
                    return raw[f"b{value[_BLOB]}"]
                except KeyError:
                    raise ValueError(f"a stream entry without its blob {value[_BLOB]}") from None
            return {key: restore(item) for key, item in value.items()}  # pyright: ignore[reportUnknownVariableType]
        if isinstance(value, list):
            return [restore(item) for item in value]  # pyright: ignore[reportUnknownVariableType]
        return value

    message = decode(restore(data))
    plain = {key: value.decode() for key, value in raw.items() if key != "data" and not _is_blob(key)}
    return message, plain


def shown(text: str) -> str:
    """Return a worker's text made safe for logs and Discord: at most 64 characters, letters, digits and ``.:,+-()/``
    with single spaces; any other character (markdown, mentions, newlines) becomes ``-``, and so does a link's
    ``//`` (Discord would make ``https://…`` a link)."""
    safe = "".join(char if char.isalnum() or char in _SAFE else "-" for char in " ".join(text.split()))
    safe = safe.replace("://", ":--")
    return safe if len(safe) <= SHOWN_LENGTH else safe[: SHOWN_LENGTH - 1] + "…"


def exact_revision(revision: str) -> bool:
    """Return whether a revision names exact weights (a commit, or a folder's hash) rather than a branch or tag."""
    return _EXACT_REVISION.fullmatch(revision) is not None


def _is_blob(key: str) -> bool:
    return key.startswith("b") and key[1:].isdigit()
