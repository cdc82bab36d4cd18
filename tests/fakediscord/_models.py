"""What the fake Discord stores and hands to tests: messages, attachments, requests, violations."""

# The public API takes timeouts the way asyncio.wait_for does, by design.
# ruff: noqa: ASYNC109

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

EPHEMERAL = 1 << 6
LOADING = 1 << 7
COMPONENTS_V2 = 1 << 15
_DISCORD_EPOCH_MS = 1_420_070_400_000

InteractionKind = Literal["application_command", "message_component", "autocomplete"]


class Snowflakes:
    """Hand out increasing snowflakes whose timestamp part is the current time."""

    def __init__(self) -> None:
        self._last = 0

    def __call__(self) -> int:
        now = (int(time.time() * 1000) - _DISCORD_EPOCH_MS) << 22
        self._last = max(now, self._last + 1)
        return self._last


def iso_now() -> str:
    """Return the current UTC time as Discord writes timestamps."""
    return datetime.now(UTC).isoformat()


@dataclass(frozen=True, slots=True)
class Violation:
    """A Discord rule the bot broke, with the JSON error code Discord answers with."""

    code: int
    message: str
    method: str = ""
    path: str = ""


@dataclass(slots=True)
class RecordedRequest:
    """One HTTP request the bot made: path is relative to the API base (``/channels/1/messages``)."""

    method: str
    path: str
    query: dict[str, str]
    json: Any
    files: list[tuple[str, bytes]]
    status: int = 0


@dataclass(slots=True)
class Attachment:
    """A stored upload, served back over HTTP at ``url``."""

    id: int
    filename: str
    content_type: str
    data: bytes
    url: str
    width: int | None = None
    height: int | None = None
    description: str | None = None

    @property
    def size(self) -> int:
        """Return the size in bytes."""
        return len(self.data)

    def payload(self) -> dict[str, Any]:
        """Return the attachment object Discord puts in a message."""
        data: dict[str, Any] = {
            "id": str(self.id),
            "filename": self.filename,
            "size": self.size,
            "url": self.url,
            "proxy_url": self.url,
            "content_type": self.content_type,
        }
        if self.width is not None:
            data.update(width=self.width, height=self.height)
        if self.description is not None:
            data["description"] = self.description
        return data


def walk_components(components: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Yield every component, depth first, through rows, sections and containers."""
    for component in components:
        yield component
        yield from walk_components(component.get("components", []))
        if isinstance(component.get("accessory"), dict):
            yield component["accessory"]


@dataclass(frozen=True, slots=True)
class Revision:
    """What a message looked like after its creation or one edit, and when (``time.monotonic()`` at the fake)."""

    at: float
    content: str
    attachments: tuple[Attachment, ...]
    edit: bool

    @property
    def filenames(self) -> list[str]:
        return [attachment.filename for attachment in self.attachments]


@dataclass(slots=True, eq=False)
class Message:
    """A message in the fake's store; ``edits`` counts PATCHes, ``history`` keeps every version of it."""

    id: int
    channel_id: int
    author_id: int
    content: str = ""
    embeds: list[dict[str, Any]] = field(default_factory=list)
    components: list[dict[str, Any]] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)
    flags: int = 0
    allowed_mentions: dict[str, Any] | None = None
    interaction_id: int | None = None
    reference: dict[str, Any] | None = None
    tts: bool = False
    nonce: int | str | None = None
    type: int = 0
    edits: int = 0
    deleted: bool = False
    timestamp: str = field(default_factory=iso_now)
    edited_timestamp: str | None = None
    history: list[Revision] = field(default_factory=list)

    @property
    def ephemeral(self) -> bool:
        """Return whether only the invoking user can see the message."""
        return bool(self.flags & EPHEMERAL)

    @property
    def loading(self) -> bool:
        """Return whether this is a deferred response still showing "thinking"."""
        return bool(self.flags & LOADING)

    @property
    def custom_ids(self) -> list[str]:
        """Return every custom_id in the components, in order."""
        return [c["custom_id"] for c in walk_components(self.components) if "custom_id" in c]

    def has_answer(self) -> bool:
        """Return whether the message carries something for the user to see."""
        return not self.deleted and not self.loading and bool(self.content or self.attachments or self.embeds)


@dataclass(slots=True, eq=False)
class FakeInteraction:
    """An interaction the fake dispatched, and everything the bot answered to it."""

    id: int
    token: str
    kind: InteractionKind
    payload: dict[str, Any]
    user_id: int
    channel_id: int
    dispatched_at: float
    source_message: Message | None = None
    callbacks: list[dict[str, Any]] = field(default_factory=list)
    responded_at: float | None = None
    acknowledged: bool = False
    original: Message | None = None
    followups: list[Message] = field(default_factory=list)
    _wait: Callable[..., Any] | None = field(default=None, repr=False)

    @property
    def response(self) -> dict[str, Any] | None:
        """Return the first callback's body, or None before it came."""
        return self.callbacks[0] if self.callbacks else None

    @property
    def response_type(self) -> int | None:
        """Return the first callback's type (4 message, 5 deferred, 6 deferred update, 7 update, 8 choices)."""
        return None if self.response is None else self.response["type"]

    @property
    def response_delay(self) -> float | None:
        """Return seconds from dispatch to the first callback."""
        return None if self.responded_at is None else self.responded_at - self.dispatched_at

    @property
    def deferred(self) -> bool:
        """Return whether the first callback was a deferral (type 5 or 6)."""
        return self.response_type in (5, 6)

    @property
    def ephemeral(self) -> bool:
        """Return whether the first callback asked for an ephemeral message."""
        response = self.response or {}
        return bool((response.get("data") or {}).get("flags", 0) & EPHEMERAL)

    async def wait_response(self, timeout: float = 5) -> dict[str, Any]:
        """Wait for the first callback and return its body."""
        assert self._wait is not None
        return await self._wait(lambda: self.response, timeout, f"a callback to interaction {self.id}")

    async def wait_message(self, timeout: float = 30) -> Message:
        """Wait for the message holding the answer: the original once it has content, else the first followup."""
        assert self._wait is not None

        def check() -> Message | None:
            if self.original is not None and self.original.has_answer():
                return self.original
            return next((m for m in self.followups if not m.deleted), None)

        return await self._wait(check, timeout, f"an answer to interaction {self.id}")
