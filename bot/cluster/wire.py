"""What the bot and remote workers write to Redis: the keys, and the worker protocol's messages as stream entries.

The bot (one per cluster) and any number of ``sygil-bot worker`` processes share one Redis. All keys start with
``cluster.prefix`` (default ``sygil``):

``{prefix}:batches``                stream, bot → workers: one ``RenderBatch`` per entry, read through the consumer
                                    group ``workers``; an entry pending longer than its lease (the worker died or
                                    lost the network) is claimed by another worker (XAUTOCLAIM). A worker holding an
                                    entry renews its lease (XCLAIM … JUSTID) while it renders; the bot acknowledges
                                    and deletes it once it took the outcome. Each entry carries a ``nonce``, new at
                                    every dispatch, that the worker's events must repeat.
``{prefix}:batches:{tag}``          the same, for the batches of a candidate revision (``model.candidates``), ``tag``
                                    its short form (``revision.tag``): a worker pulls only from its revision's stream,
                                    and the bot takes outcomes only from workers announcing that revision.
``{prefix}:bot``                    the bot's announcement (``BotInfo``, with a TTL): its session, model, the revision
                                    workers must serve and the candidates they may serve. Without it, workers wait.
``{prefix}:stop:{session}:{batch}`` set when nobody wants a batch any more; the worker stops it at its next step.
``{prefix}:w:{worker}:…``           what worker ``worker`` writes, and it alone (its Redis ACL user has that name):
``{prefix}:w:{worker}:beat:{device}``  a heartbeat per device (``WorkerInfo``, with a TTL);
``{prefix}:w:{worker}:events:{session}``  stream, that worker → one bot session: ``Started``, ``Progress``,
                                    ``Rendered`` and ``Failed``, each naming its batch and nonce. The bot takes an
                                    event only from the worker whose consumer holds the batch's entry.

Each device of a worker is a consumer of the group named ``{worker}/{device}``, so the holder of an entry
(XPENDING) names the worker whose events stream may speak for it. Worker names are ``NAME_PATTERN``: no ``:``, ``/``
or glob characters, so one worker's keys never match another's ACL pattern.

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
from bot.engine.revision import tag

log = logging.getLogger(__name__)

GROUP = "workers"  # the consumer group of the batches stream
_BLOB = "$blob"
SHOWN_LENGTH = 64  # characters of a worker's text (name, host, device) kept for logs and /queue
_SAFE = frozenset(" .:,+-()/")
_EXACT_REVISION = re.compile(r"[0-9a-f]{40}|sha256:[0-9a-f]{64}")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,47}")
_DEVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,31}")


@dataclass(frozen=True, slots=True)
class Keys:
    """The Redis keys of one cluster."""

    prefix: str = "sygil"

    @property
    def batches(self) -> str:
        return f"{self.prefix}:batches"

    def batches_of(self, candidate: str | None) -> str:
        """The batches stream of a revision: the production one's (None), or a candidate's (an exact revision)."""
        return self.batches if candidate is None else f"{self.batches}:{tag(candidate)}"

    @property
    def candidate_batches(self) -> str:
        """The pattern matching every candidate revision's batches stream."""
        return f"{self.batches}:*"

    @property
    def bot(self) -> str:
        return f"{self.prefix}:bot"

    def stop(self, session: str, batch_id: int) -> str:
        return f"{self.prefix}:stop:{session}:{batch_id}"

    def own(self, worker: str) -> str:
        """The pattern of every key worker ``worker`` writes (its ACL user's key pattern)."""
        return f"{self.prefix}:w:{worker}:*"

    def beat(self, worker: str, device: str) -> str:
        return f"{self.prefix}:w:{worker}:beat:{device}"

    @property
    def beats(self) -> str:
        """The pattern matching every worker's heartbeats (for SCAN)."""
        return f"{self.prefix}:w:*:beat:*"

    def beat_of(self, key: str) -> tuple[str, str] | None:
        """Return the (worker, device) a heartbeat key belongs to; None for a key that is not one."""
        head = f"{self.prefix}:w:"
        worker, beat, device = key.removeprefix(head).partition(":beat:")
        if not key.startswith(head) or not beat or not valid_name(worker) or not valid_device(device):
            return None
        return worker, device

    def events(self, worker: str, session: str) -> str:
        return f"{self.prefix}:w:{worker}:events:{session}"


def consumer(worker: str, device: str) -> str:
    """The consumer name of one device of a worker in the group."""
    return f"{worker}/{device}"


def worker_of(consumer_name: str) -> str:
    """The worker a consumer belongs to (its name up to the first ``/``)."""
    return consumer_name.partition("/")[0]


def valid_name(name: str) -> bool:
    """Whether a worker name is ``NAME_PATTERN``: 1 to 48 letters, digits, ``.``, ``_`` or ``-``."""
    return NAME_PATTERN.fullmatch(name) is not None


def valid_device(device: str) -> bool:
    """Whether a device as a worker names it is plain (``cuda:0``, ``cpu``, ``mps``): at most 32 safe characters."""
    return _DEVICE.fullmatch(device) is not None


@dataclass(frozen=True, slots=True)
class BotInfo:
    """The bot's announcement: workers serve only the session and revision it names."""

    session: str  # new at every start: batches of an earlier session are dropped, not rendered
    model: str
    revision: str | None  # the exact revision workers must serve; None until the first worker pins it
    lease: float  # seconds a batch may stay with a silent worker before another claims it
    candidates: tuple[str, ...] = ()  # exact revisions a worker may serve instead, pulling from their own streams

    def dump(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def load(cls, text: str | bytes) -> BotInfo:
        data = json.loads(text)
        candidates = data.get("candidates", [])  # an older bot announces none
        if not isinstance(candidates, list) or not all(isinstance(item, str) for item in candidates):  # pyright: ignore[reportUnknownVariableType]
            raise TypeError("candidates must be a list of revisions")
        return cls(
            str(data["session"]),
            str(data["model"]),
            data["revision"],
            float(data["lease"]),
            tuple(candidates),  # pyright: ignore[reportUnknownArgumentType]
        )

    def stream_of(self, keys: Keys, revision: str | None) -> str | None:
        """Return the batches stream a worker serving ``revision`` pulls from; None when the bot wants none of it."""
        if revision is None:
            return None
        if revision == self.revision:
            return keys.batches
        return keys.batches_of(revision) if revision in self.candidates else None

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
