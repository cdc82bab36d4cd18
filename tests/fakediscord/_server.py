"""The fake Discord: an aiohttp app serving REST routes and the gateway websocket on 127.0.0.1."""

# The public API takes timeouts the way asyncio.wait_for does, by design.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mimetypes
import re
import secrets
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Self, TypeVar, cast

from aiohttp import BodyPartReader, WSMsgType, web

from bot.config import DiscordConfig

from ._models import (
    EPHEMERAL,
    LOADING,
    Attachment,
    FakeInteraction,
    InteractionKind,
    Message,
    RecordedRequest,
    Revision,
    Snowflakes,
    Violation,
    iso_now,
    walk_components,
)
from ._rules import Refusal, check_choices, check_commands, check_message, invalid_form

log = logging.getLogger(__name__)

T = TypeVar("T")
_DEFAULT_PERMISSIONS = sum(1 << bit for bit in (6, 10, 11, 14, 15, 16, 18, 31))  # view, send, embed, attach, ...
_SUPPRESS_EMBEDS = 1 << 2
_ADMINISTRATOR = 1 << 3
# The bits of discord.py 2.7.1's Permissions.all(): what an administrator or the owner gets, so the two compare equal.
_ALL_PERMISSIONS = (1 << 53) - 1 & ~(1 << 47)
_BOT_PERMISSIONS = _ALL_PERMISSIONS & ~_ADMINISTRATOR
_SNOWFLAKE_OPTIONS = {6: "user", 7: "channel", 8: "role", 9: "mentionable"}
_CHANNEL_TYPES = {0: "text", 2: "voice", 4: "category", 5: "announcement"}
_INTERACTION_TYPES: dict[InteractionKind, int] = {"application_command": 2, "message_component": 3, "autocomplete": 4}
_ALLOWED_CALLBACKS: dict[InteractionKind, set[int]] = {
    "application_command": {4, 5, 9},
    "message_component": {4, 5, 6, 7, 9},
    "autocomplete": {8},
}


@dataclass(slots=True)
class _Upload:
    index: int
    filename: str
    data: bytes
    content_type: str


@dataclass(slots=True)
class _Call:
    params: dict[str, str]
    query: dict[str, str]
    body: Any
    uploads: list[_Upload]


@dataclass(slots=True)
class _User:
    id: int
    name: str
    roles: list[int]
    permissions: int
    bot: bool = False
    joined_at: str = field(default_factory=iso_now)

    def payload(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "username": self.name,
            "discriminator": "0",
            "global_name": None,
            "avatar": None,
            "bot": self.bot,
            "public_flags": 0,
        }

    def member(self) -> dict[str, Any]:
        return {
            "user": self.payload(),
            "roles": [str(r) for r in self.roles],
            "joined_at": self.joined_at,
            "nick": None,
            "avatar": None,
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "pending": False,
            "flags": 0,
            "communication_disabled_until": None,
        }

    def partial_member(self, permissions: int) -> dict[str, Any]:
        """Return the member as interaction ``resolved`` data has it: no user, deaf or mute; permissions added."""
        member = {k: v for k, v in self.member().items() if k not in ("user", "deaf", "mute")}
        return {**member, "permissions": str(permissions)}


class _Session:
    """One gateway connection; frames go out in order through a queue."""

    def __init__(self, ws: web.WebSocketResponse, session_id: str) -> None:
        self.ws = ws
        self.session_id = session_id
        self.seq = 0
        self.ready = False
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.writer = asyncio.create_task(self._write())

    def send(self, op: int, d: Any) -> None:
        self.queue.put_nowait(json.dumps({"op": op, "d": d, "s": None, "t": None}))

    def dispatch(self, event: str, d: Any) -> None:
        self.seq += 1
        self.queue.put_nowait(json.dumps({"op": 0, "d": d, "s": self.seq, "t": event}))

    async def _write(self) -> None:
        while True:
            frame = await self.queue.get()
            if self.ws.closed:
                return
            try:
                await self.ws.send_str(frame)
            except ConnectionError:  # the bot died (SIGKILL) after the check; its socket is gone, and so is the session
                return


_Handler = Callable[["FakeDiscord", _Call], Awaitable[Any]]
_ROUTES: list[tuple[str, re.Pattern[str], bool, str]] = []


def _route(method: str, pattern: str, *, auth: bool = True) -> Callable[[_Handler], _Handler]:
    def register(handler: _Handler) -> _Handler:
        _ROUTES.append((method, re.compile(f"^{pattern}$"), auth, handler.__name__))
        return handler

    return register


def _image_size(data: bytes) -> tuple[int, int] | None:
    """Read width and height from a PNG, GIF or JPEG header."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return struct.unpack("<HH", data[6:10])
    if data.startswith(b"\xff\xd8"):
        index = 2
        while index + 9 < len(data) and data[index] == 0xFF:
            marker, length = data[index + 1], struct.unpack(">H", data[index + 2 : index + 4])[0]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                height, width = struct.unpack(">HH", data[index + 5 : index + 9])
                return width, height
            index += 2 + length
    return None


class FakeDiscord:
    """A fake Discord server for one guild; use as ``async with FakeDiscord() as server``."""

    def __init__(
        self,
        token: str | None = None,
        *,
        interaction_token_ttl: float = 15 * 60,
        ack_timeout: float = 3.0,
        attachment_size_limit: int = 10 * 1024 * 1024,
        heartbeat_interval: float = 41.25,
        nonce_ttl: float = 10 * 60,
    ) -> None:
        self.token = token or f"FAKE.{secrets.token_hex(12)}"
        self.interaction_token_ttl = interaction_token_ttl
        self.ack_timeout = ack_timeout
        self.attachment_size_limit = attachment_size_limit
        self.heartbeat_interval = heartbeat_interval
        self.nonce_ttl = nonce_ttl
        self._ids = Snowflakes()
        self.application_id = self.bot_user_id = self._ids()
        self.guild_id = self._ids()
        self.requests: list[RecordedRequest] = []
        self.violations: list[Violation] = []
        self.command_syncs = 0
        self.interactions: list[FakeInteraction] = []
        self._global_commands: dict[str, dict[str, Any]] = {}
        self._guild_commands: dict[str, dict[str, Any]] = {}
        self._users: dict[int, _User] = {}
        self._roles: dict[int, dict[str, Any]] = {}
        self._channels: dict[int, dict[str, Any]] = {}
        self._messages: dict[int, Message] = {}
        self._attachments: dict[int, Attachment] = {}
        self._by_token: dict[str, FakeInteraction] = {}
        self._created: dict[int, float] = {}
        self._nonces: dict[tuple[int, int, int | str], tuple[Message, float]] = {}
        self._sessions: list[_Session] = []
        self._sockets: set[web.WebSocketResponse] = set()
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._port = 0
        self._roles[self.guild_id] = self._role(self.guild_id, "@everyone", _DEFAULT_PERMISSIONS)
        self._users[self.bot_user_id] = _User(self.bot_user_id, "sygil-bot", [], _BOT_PERMISSIONS, bot=True)
        self.user_id = self.add_user("tester")
        # The owner has every permission whatever its roles; a separate member keeps the tester an ordinary one.
        self.owner_id = self.add_user("owner")
        self.channel_id = self.add_channel("general")

    # -- lifecycle and addresses

    async def __aenter__(self) -> Self:
        app = web.Application(client_max_size=1024**3)
        app.router.add_get("/", self._gateway)
        app.router.add_route("*", "/{tail:.*}", self._http)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", 0))
            self._port = sock.getsockname()[1]
            await web.SockSite(self._runner, sock).start()
        except BaseException:
            sock.close()
            await self._runner.cleanup()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for ws in list(self._sockets):
            await ws.close(code=1001)
        writers = [session.writer for session in self._sessions]
        for writer in writers:
            writer.cancel()
        await asyncio.gather(*writers, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def http_base_url(self) -> str:
        """Return ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self._port}"

    @property
    def api_base_url(self) -> str:
        """Return the value for ``discord.http.Route.BASE``."""
        return f"{self.http_base_url}/api/v10"

    @property
    def gateway_url(self) -> str:
        """Return the value (as ``yarl.URL``) for ``discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY``."""
        return f"ws://127.0.0.1:{self._port}/"

    def bot_settings(self) -> DiscordConfig:
        """Return the bot's ``[discord]`` settings for this server: its URLs, its one guild, no wait for more."""
        return DiscordConfig(
            api_base_url=self.api_base_url,
            gateway_url=self.gateway_url,
            guild_ids=(self.guild_id,),
            guild_ready_timeout=0.1,
        )

    # -- the guild

    def _role(self, role_id: int, name: str, permissions: int) -> dict[str, Any]:
        return {"id": str(role_id), "name": name, "permissions": str(permissions), "position": len(self._roles)}

    def add_role(self, name: str, permissions: int = 0) -> int:
        """Add a guild role and return its id."""
        role_id = self._ids()
        self._roles[role_id] = self._role(role_id, name, permissions)
        self._broadcast("GUILD_ROLE_CREATE", {"guild_id": str(self.guild_id), "role": self._roles[role_id]})
        return role_id

    def add_user(self, name: str, *, roles: Iterable[int | str] = (), permissions: int = _DEFAULT_PERMISSIONS) -> int:
        """Add a guild member and return its id; roles are ids or names (created when missing)."""
        user = _User(self._ids(), name, self._role_ids(roles), permissions)
        self._users[user.id] = user
        self._broadcast("GUILD_MEMBER_ADD", {**user.member(), "guild_id": str(self.guild_id)})
        return user.id

    def set_roles(self, user_id: int, roles: Iterable[int | str]) -> None:
        """Replace a member's roles (ids or names, created when missing) and send GUILD_MEMBER_UPDATE."""
        user = self._users.get(user_id)
        if user is None:
            raise LookupError(f"no user {user_id}")
        user.roles = self._role_ids(roles)
        self._broadcast("GUILD_MEMBER_UPDATE", {**user.member(), "guild_id": str(self.guild_id)})

    def _role_ids(self, roles: Iterable[int | str]) -> list[int]:
        by_name = {role["name"]: role_id for role_id, role in self._roles.items()}
        role_ids = [r if isinstance(r, int) else by_name.get(r) or self.add_role(r) for r in roles]
        unknown = [r for r in role_ids if r not in self._roles or r == self.guild_id]
        if unknown:  # @everyone is implicit: Discord never lists it among a member's roles
            raise ValueError(f"unknown roles {unknown}; add them with add_role (@everyone is implicit)")
        return role_ids

    def add_channel(self, name: str = "channel", nsfw: bool = False, *, type: int = 0) -> int:
        """Add a channel (0 text, 2 voice, 4 category, 5 announcement) and return its id."""
        if type not in _CHANNEL_TYPES:
            raise ValueError(f"channel type {type} is not one of {_CHANNEL_TYPES}")
        channel_id = self._ids()
        channel: dict[str, Any] = {
            "id": str(channel_id),
            "type": type,
            "guild_id": str(self.guild_id),
            "name": name,
            "position": len(self._channels),
            "permission_overwrites": [],
            "nsfw": nsfw,
            "parent_id": None,
            "flags": 0,
        }
        if type != 4:  # categories hold channels, not messages
            channel.update(topic=None, rate_limit_per_user=0, last_message_id=None)
        if type == 2:
            channel.update(bitrate=64000, user_limit=0, rtc_region=None)
        self._channels[channel_id] = channel
        self._broadcast("CHANNEL_CREATE", channel)
        return channel_id

    def _permissions(self, user: _User) -> int:
        """Return a member's permissions; channels have no overwrites, so these hold in every channel."""
        if user.id == self.owner_id:
            return _ALL_PERMISSIONS
        value = user.permissions | int(self._roles[self.guild_id]["permissions"])
        for role_id in user.roles:
            value |= int(self._roles[role_id]["permissions"])
        return _ALL_PERMISSIONS if value & _ADMINISTRATOR else value

    def _guild(self) -> dict[str, Any]:
        members = [u.member() for u in self._users.values()]
        return {
            "id": str(self.guild_id),
            "name": "Fake Guild",
            "owner_id": str(self.owner_id),
            "unavailable": False,
            "member_count": len(members),
            "large": False,
            "joined_at": iso_now(),
            "roles": list(self._roles.values()),
            "channels": list(self._channels.values()),
            "members": members,
            "features": [],
            "emojis": [],
            "stickers": [],
            "threads": [],
            "voice_states": [],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
            "preferred_locale": "en-US",
            "premium_tier": 0,
            "system_channel_id": None,
        }

    # -- waiting

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_for(self, check: Callable[[], T | None], timeout: float, what: str) -> T:
        deadline = time.monotonic() + timeout
        while (result := check()) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return result

    async def wait_until_connected(self, timeout: float = 10) -> None:
        """Wait until a gateway session has IDENTIFYed and been sent READY and GUILD_CREATE."""
        await self._wait_for(lambda: self._live() or None, timeout, "the bot to connect to the gateway")

    async def wait_for_message(self, predicate: Callable[[Message], bool], timeout: float = 30) -> Message:
        """Return the first message (stored already or yet to come, ephemeral included) matching predicate."""
        check = lambda: next((m for m in self._messages.values() if predicate(m)), None)  # noqa: E731
        return await self._wait_for(check, timeout, "a matching message")

    def messages(
        self, channel_id: int, *, include_ephemeral: bool = False, include_deleted: bool = False
    ) -> list[Message]:
        """Return the messages in a channel, oldest first."""
        return [
            m
            for m in self._messages.values()
            if m.channel_id == channel_id
            and (include_ephemeral or not m.ephemeral)
            and (include_deleted or not m.deleted)
        ]

    def message(self, message_id: int) -> Message:
        """Return a stored message by id."""
        return self._messages[message_id]

    @property
    def commands(self) -> dict[str, dict[str, Any]]:
        """Return the synced application commands by name, as the bot sent them plus ids (guild ones win)."""
        return {**self._global_commands, **self._guild_commands}

    def assert_no_violations(self) -> None:
        """Fail when the bot broke a Discord rule."""
        assert not self.violations, "\n".join(f"{v.code} {v.method} {v.path}: {v.message}" for v in self.violations)

    # -- gateway

    def _live(self) -> _Session | None:
        return next((s for s in reversed(self._sessions) if s.ready and not s.ws.closed), None)

    def _broadcast(self, event: str, data: dict[str, Any]) -> None:
        for session in self._sessions:
            if session.ready and not session.ws.closed:
                session.dispatch(event, data)

    async def _gateway(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        if not ws.can_prepare(request).ok:
            return web.Response(status=400, text="websocket only")
        await ws.prepare(request)
        self._sockets.add(ws)
        session = _Session(ws, secrets.token_hex(16))
        session.send(10, {"heartbeat_interval": int(self.heartbeat_interval * 1000)})
        try:
            async for frame in ws:
                if frame.type is WSMsgType.TEXT:
                    await self._gateway_frame(session, json.loads(frame.data))
        finally:
            self._sockets.discard(ws)
            session.writer.cancel()
        return ws

    async def _gateway_frame(self, session: _Session, frame: dict[str, Any]) -> None:
        op, data = frame.get("op"), cast(Any, frame.get("d"))
        if op == 1:
            session.send(11, None)
        elif op == 2:
            if data["token"] != self.token:
                await session.ws.close(code=4004, message=b"Authentication failed.")
                return
            session.dispatch("READY", self._ready(session, data.get("shard") or [0, 1]))
            session.dispatch("GUILD_CREATE", self._guild())
            session.ready = True
            self._sessions.append(session)
            self._notify()
        elif op == 6:
            old = next((s for s in self._sessions if s.session_id == data.get("session_id")), None)
            if old is None or data.get("token") != self.token:
                session.send(9, False)
                return
            session.session_id, session.seq, session.ready = old.session_id, old.seq, True
            self._sessions.append(session)
            session.dispatch("RESUMED", {})
            self._notify()
        elif op == 8:
            wanted = {int(u) for u in data.get("user_ids") or []}
            query = (data.get("query") or "").lower()
            members = [
                u.member()
                for u in self._users.values()
                if (not wanted or u.id in wanted) and u.name.lower().startswith(query)
            ]
            chunk = {"guild_id": str(self.guild_id), "members": members, "chunk_index": 0, "chunk_count": 1}
            session.dispatch("GUILD_MEMBERS_CHUNK", {**chunk, "nonce": data.get("nonce"), "not_found": []})

    def _ready(self, session: _Session, shard: list[int]) -> dict[str, Any]:
        return {
            "v": 10,
            "user": {**self._users[self.bot_user_id].payload(), "verified": True, "mfa_enabled": False, "flags": 0},
            "guilds": [{"id": str(self.guild_id), "unavailable": True}],
            "session_id": session.session_id,
            "resume_gateway_url": self.gateway_url,
            "application": {"id": str(self.application_id), "flags": 0},
            "shard": shard,
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "geo_ordered_rtc_regions": [],
            "guild_join_requests": [],
            "_trace": ["fakediscord"],
        }

    # -- driving the bot like a user

    async def slash(
        self,
        name: str,
        options: dict[str, Any] | None = None,
        *,
        user_id: int | None = None,
        channel_id: int | None = None,
        timeout: float = 5,
    ) -> FakeInteraction:
        """Send an APPLICATION_COMMAND interaction; name subcommands as ``"group sub"``.

        User, channel, role and mentionable options take the id of a user, channel or role the fake knows.
        """
        data = await self._command_data(name, options or {}, None, timeout)
        user = self._users[user_id or self.user_id]
        resolved = self._resolved(_leaf_options(data["options"]), user)
        if resolved:
            data["resolved"] = resolved
        return self._dispatch("application_command", data, user_id, channel_id)

    async def autocomplete(
        self,
        name: str,
        options: dict[str, Any],
        *,
        focused: str,
        user_id: int | None = None,
        channel_id: int | None = None,
        timeout: float = 5,
    ) -> list[dict[str, Any]]:
        """Send an APPLICATION_COMMAND_AUTOCOMPLETE interaction and return the choices the bot answered."""
        data = await self._command_data(name, options, focused, timeout)
        interaction = self._dispatch("autocomplete", data, user_id, channel_id)
        response = await interaction.wait_response(timeout)
        if response["type"] != 8:
            raise AssertionError(f"autocomplete answered with callback type {response['type']}, not 8")
        return response.get("data", {}).get("choices", [])

    async def click(
        self,
        message_id: int,
        custom_id: str,
        *,
        values: list[str] | None = None,
        user_id: int | None = None,
        channel_id: int | None = None,
        forged: bool = False,
    ) -> FakeInteraction:
        """Send a MESSAGE_COMPONENT interaction for a component on a stored message.

        ``forged`` sends a button ``custom_id`` that the message does not carry, with the interaction's copy of the
        message showing that button too: discord.py ignores a custom_id its message lacks, so this is how a forgery
        would reach the bot's own code.
        """
        message = self._messages.get(message_id)
        if message is None or message.deleted:
            raise LookupError(f"no message {message_id}")
        component = next((c for c in walk_components(message.components) if c.get("custom_id") == custom_id), None)
        shown: list[dict[str, Any]] | None = None
        if component is None and forged:
            component = {"type": 2, "style": 2, "label": "Forged", "custom_id": custom_id}
            shown = [*message.components, {"type": 1, "components": [component]}]
        if component is None:
            raise LookupError(f"message {message_id} has no component {custom_id!r}; it has {message.custom_ids}")
        if component.get("disabled"):
            raise ValueError(f"component {custom_id!r} is disabled")
        data: dict[str, Any] = {"custom_id": custom_id, "component_type": component["type"]}
        if values is not None:
            data["values"] = values
        return self._dispatch("message_component", data, user_id, channel_id or message.channel_id, message, shown)

    async def _command_data(
        self, name: str, values: dict[str, Any], focused: str | None, timeout: float
    ) -> dict[str, Any]:
        root, *path = name.split()
        command = await self._wait_for(lambda: self.commands.get(root), timeout, f"command {root!r} to be synced")
        schema: list[dict[str, Any]] = command.get("options") or []
        chain: list[dict[str, Any]] = []
        for sub in path:
            option = next((o for o in schema if o["name"] == sub and o["type"] in (1, 2)), None)
            if option is None:
                raise LookupError(f"{root!r} has no subcommand {sub!r}")
            chain.append(option)
            schema = option.get("options") or []
        if any(o["type"] in (1, 2) for o in schema):
            raise ValueError(f"{name!r} is a group: name one of its subcommands")
        options = _typed_options(schema, values, focused, self._snowflake)
        for option in reversed(chain):
            options = [{"type": option["type"], "name": option["name"], "options": options}]
        data: dict[str, Any] = {"id": command["id"], "name": root, "type": command.get("type", 1), "options": options}
        if "guild_id" in command:
            data["guild_id"] = command["guild_id"]
        return data

    def _snowflake(self, option: dict[str, Any], value: Any) -> str:
        """Return the id string for a user, channel, role or mentionable option, refusing ids the fake lacks."""
        kind, name = option["type"], option["name"]
        if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).isdigit():
            raise ValueError(f"option {name!r} takes the id of a {_SNOWFLAKE_OPTIONS[kind]}, not {value!r}")
        entity_id = int(value)
        if kind == 6 and entity_id not in self._users:
            raise ValueError(f"option {name!r}: no user {entity_id}; add one with add_user")
        if kind == 8 and entity_id not in self._roles:
            raise ValueError(f"option {name!r}: no role {entity_id}; add one with add_role")
        if kind == 9 and entity_id not in self._users and entity_id not in self._roles:
            raise ValueError(f"option {name!r}: no user or role {entity_id}")
        if kind == 7:
            channel = self._channels.get(entity_id)
            if channel is None:
                raise ValueError(f"option {name!r}: no channel {entity_id}; add one with add_channel")
            allowed = option.get("channel_types")
            if allowed and channel["type"] not in allowed:
                raise ValueError(f"option {name!r}: channel {entity_id} has type {channel['type']}, not in {allowed}")
        return str(entity_id)

    def _resolved(self, options: list[dict[str, Any]], invoker: _User) -> dict[str, Any]:
        """Return the ``resolved`` map Discord sends with the users, members, roles and channels options name."""
        resolved: dict[str, dict[str, Any]] = {}
        for option in options:
            kind, key = option["type"], option.get("value")
            if kind not in _SNOWFLAKE_OPTIONS or not isinstance(key, str):
                continue
            entity_id = int(key)
            if kind in (6, 9) and entity_id in self._users:
                target = self._users[entity_id]
                resolved.setdefault("users", {})[key] = target.payload()
                resolved.setdefault("members", {})[key] = target.partial_member(self._permissions(target))
            elif kind in (8, 9):
                resolved.setdefault("roles", {})[key] = dict(self._roles[entity_id])
            elif kind == 7:
                # Discord documents id, name, type and permissions (the invoker's, there); it sends these too.
                channel = self._channels[entity_id]
                partial = {k: v for k, v in channel.items() if k != "permission_overwrites"}
                resolved.setdefault("channels", {})[key] = {**partial, "permissions": str(self._permissions(invoker))}
        return resolved

    def _dispatch(
        self,
        kind: InteractionKind,
        data: dict[str, Any],
        user_id: int | None,
        channel_id: int | None,
        message: Message | None = None,
        shown_components: list[dict[str, Any]] | None = None,
    ) -> FakeInteraction:
        session = self._live()
        if session is None:
            raise RuntimeError("no bot is connected to the gateway; await server.wait_until_connected() first")
        user = self._users[user_id or self.user_id]
        channel_id = channel_id or self.channel_id
        interaction_id, token = self._ids(), f"itoken.{secrets.token_urlsafe(24)}"
        payload: dict[str, Any] = {
            "id": str(interaction_id),
            "application_id": str(self.application_id),
            "type": _INTERACTION_TYPES[kind],
            "data": data,
            "guild_id": str(self.guild_id),
            "guild": {"id": str(self.guild_id), "locale": "en-US", "features": []},
            "channel": self._channels[channel_id],
            "channel_id": str(channel_id),
            "member": {**user.member(), "permissions": str(self._permissions(user))},
            "token": token,
            "version": 1,
            "app_permissions": str(_BOT_PERMISSIONS),
            "locale": "en-US",
            "guild_locale": "en-US",
            "entitlements": [],
            "authorizing_integration_owners": {"0": str(self.guild_id)},
            "context": 0,
            "attachment_size_limit": self.attachment_size_limit,
        }
        if message is not None:
            payload["message"] = self._message_payload(message)
            if shown_components is not None:
                payload["message"]["components"] = shown_components
        interaction = FakeInteraction(
            interaction_id, token, kind, payload, user.id, channel_id, time.monotonic(), message, _wait=self._wait_for
        )
        self.interactions.append(interaction)
        self._by_token[token] = interaction
        session.dispatch("INTERACTION_CREATE", payload)
        return interaction

    # -- HTTP plumbing

    async def _http(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        match_ = re.match(r"^/api/v\d+(/.*)$", path)
        api_path = match_.group(1) if match_ else path
        call = _Call({}, dict(request.query), None, [])
        await self._read_body(request, call)
        record = RecordedRequest(
            request.method, api_path, call.query, call.body, [(u.filename, u.data) for u in call.uploads]
        )
        self.requests.append(record)
        response = await self._answer(request, record, call, api_path if match_ else None)
        record.status = response.status
        self._notify()
        return response

    async def _answer(
        self, request: web.Request, record: RecordedRequest, call: _Call, api_path: str | None
    ) -> web.StreamResponse:
        if api_path is None:
            found = re.match(r"^/attachments/\d+/(\d+)/[^/]+$", request.path)
            attachment = self._attachments.get(int(found.group(1))) if found else None
            if attachment is not None and request.method == "GET":
                return web.Response(body=attachment.data, headers={"Content-Type": attachment.content_type})
            return _json({"message": "404: Not Found", "code": 0}, 404)
        for method, pattern, auth, name in _ROUTES:
            found = pattern.match(api_path)
            if found is None or method != request.method:
                continue
            if auth and request.headers.get("Authorization") != f"Bot {self.token}":
                return _json({"message": "401: Unauthorized", "code": 0}, 401)
            call.params = found.groupdict()
            try:
                result = await getattr(self, name)(call)
            except Refusal as refusal:
                self.violations.append(Violation(refusal.code, refusal.message, record.method, record.path))
                log.info("refused %s %s: %s", record.method, record.path, refusal.message)
                return _json(refusal.body(), refusal.status)
            except Exception as error:  # a 5xx would make discord.py sleep and retry; answer 400 and record it
                log.exception("FakeDiscord failed on %s %s", record.method, record.path)
                self.violations.append(Violation(0, f"FakeDiscord bug: {error!r}", record.method, record.path))
                return _json({"message": f"FakeDiscord bug: {error!r}", "code": 0}, 400)
            return web.Response(status=204) if result is None else _json(result)
        message = f"route not implemented by FakeDiscord: {request.method} {api_path}"
        self.violations.append(Violation(0, message, record.method, record.path))
        return _json({"message": "404: Not Found", "code": 0}, 404)

    async def _read_body(self, request: web.Request, call: _Call) -> None:
        if request.content_type.startswith("multipart/"):
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    continue
                if part.name == "payload_json":
                    call.body = json.loads(await part.text())
                elif part.filename is not None:
                    found = re.fullmatch(r"files\[(\d+)\]", part.name or "")
                    index = int(found.group(1)) if found else len(call.uploads)
                    data = bytes(await part.read())
                    guessed = mimetypes.guess_type(part.filename)[0]
                    sent = part.headers.get("Content-Type", "application/octet-stream")
                    content_type = guessed or sent
                    call.uploads.append(_Upload(index, part.filename, data, content_type))
        elif request.can_read_body:
            raw = await request.read()
            call.body = json.loads(raw) if raw else None

    # -- messages

    def _message_payload(self, message: Message) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": str(message.id),
            "channel_id": str(message.channel_id),
            "author": self._users[message.author_id].payload(),
            "content": message.content,
            "timestamp": message.timestamp,
            "edited_timestamp": message.edited_timestamp,
            "tts": message.tts,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [a.payload() for a in message.attachments],
            "embeds": message.embeds,
            "pinned": False,
            "type": message.type,
            "flags": message.flags,
            "components": message.components,
        }
        if message.reference is not None:
            data["message_reference"] = message.reference
        interaction = next((i for i in self.interactions if i.id == message.interaction_id), None)
        if interaction is not None:
            data["webhook_id"] = data["application_id"] = str(self.application_id)
            data["interaction_metadata"] = {
                "id": str(interaction.id),
                "type": _INTERACTION_TYPES[interaction.kind],
                "user": self._users[interaction.user_id].payload(),
                "authorizing_integration_owners": {"0": str(self.guild_id)},
            }
        return data

    def _new_attachment(self, channel_id: int, upload: _Upload, entry: dict[str, Any]) -> Attachment:
        if len(upload.data) > self.attachment_size_limit:
            raise Refusal(413, 40005, f"Request entity too large: {upload.filename} is {len(upload.data)} bytes")
        attachment_id = self._ids()
        filename = entry.get("filename") or upload.filename
        url = f"{self.http_base_url}/attachments/{channel_id}/{attachment_id}/{filename}"
        size = _image_size(upload.data)
        attachment = Attachment(attachment_id, filename, upload.content_type, upload.data, url)
        attachment.description = entry.get("description")
        if size is not None:
            attachment.width, attachment.height = size
        return attachment

    def _build_attachments(self, message: Message, call: _Call, *, edit: bool) -> list[Attachment] | None:
        by_index = {u.index: u for u in call.uploads}
        entries = (call.body or {}).get("attachments")
        if entries is None:
            if not call.uploads:
                return None
            kept = message.attachments if edit else []
            return kept + [self._new_attachment(message.channel_id, u, {}) for u in call.uploads]
        kept_by_id = {a.id: a for a in message.attachments}
        result: list[Attachment] = []
        for position, entry in enumerate(entries):
            ident = int(entry["id"])
            if ident in kept_by_id:
                result.append(kept_by_id[ident])
            elif ident in by_index:
                result.append(self._new_attachment(message.channel_id, by_index[ident], entry))
            else:
                raise Refusal(400, 50035, f"Invalid Form Body (attachments.{position}: unknown id {ident})")
        return result

    def _write(self, message: Message, call: _Call, *, edit: bool) -> Message:
        """Check a create or edit body, then apply it to message; nothing changes when it is refused."""
        body: dict[str, Any] = call.body or {}
        check_message(body)
        reference = None if edit else self._reference(message.channel_id, body.get("message_reference"))
        attachments = self._build_attachments(message, call, edit=edit)
        if attachments is not None:
            message.attachments = attachments
            self._attachments.update((a.id, a) for a in attachments)
        for key in ("content", "embeds", "components"):
            if key in body:
                setattr(message, key, body[key] if body[key] is not None else type(getattr(message, key))())
        if "allowed_mentions" in body or not edit:
            message.allowed_mentions = body.get("allowed_mentions")
        if edit:
            message.flags &= ~LOADING
            if "flags" in body:  # of the flags an edit may set, the fake keeps only SUPPRESS_EMBEDS
                message.flags = message.flags & ~_SUPPRESS_EMBEDS | (body["flags"] or 0) & _SUPPRESS_EMBEDS
            message.edits += 1
            message.edited_timestamp = iso_now()
        else:
            message.tts = bool(body.get("tts"))
            message.reference = reference
            if reference is not None:
                message.type = 19  # REPLY
            message.flags = body.get("flags") or 0
            if not (message.content or message.embeds or message.attachments or message.components):
                raise Refusal(400, 50006, "Cannot send an empty message")
        message.history.append(Revision(time.monotonic(), message.content, tuple(message.attachments), edit))
        self._messages.setdefault(message.id, message)
        return message

    def _reference(self, channel_id: int, reference: dict[str, Any] | None) -> dict[str, Any] | None:
        """Resolve a reply's ``message_reference`` as Discord does: a missing message fails the send unless
        ``fail_if_not_exists`` is false, which sends it as a plain message."""
        if reference is None:
            return None
        target = self._messages.get(int(reference.get("message_id") or 0))
        if target is None or target.deleted or target.ephemeral or target.channel_id != channel_id:
            if reference.get("fail_if_not_exists", True):
                raise invalid_form("message_reference", "MESSAGE_REFERENCE_UNKNOWN_MESSAGE", "Unknown message")
            return None
        return {"type": 0, "channel_id": str(channel_id), "message_id": str(target.id), "guild_id": str(self.guild_id)}

    def _create(self, channel_id: int, call: _Call, interaction: FakeInteraction | None = None) -> Message:
        message = Message(self._ids(), channel_id, self.bot_user_id)
        if interaction is not None:
            message.interaction_id = interaction.id
            message.type = 20 if interaction.kind == "application_command" else 0
        return self._write(message, call, edit=False)

    def _channel(self, call: _Call) -> int:
        channel_id = int(call.params["channel_id"])
        if channel_id not in self._channels:
            raise Refusal(404, 10003, "Unknown Channel")
        return channel_id

    def _channel_message(self, call: _Call) -> Message:
        message = self._messages.get(int(call.params["message_id"]))
        if message is None or message.deleted or message.ephemeral or message.channel_id != self._channel(call):
            raise Refusal(404, 10008, "Unknown Message")
        return message

    # -- REST routes: login and application

    @_route("GET", r"/users/@me")
    async def _get_me(self, call: _Call) -> Any:
        return {**self._users[self.bot_user_id].payload(), "verified": True, "mfa_enabled": False, "flags": 0}

    @_route("GET", r"/users/(?P<user_id>\d+)")
    async def _get_user(self, call: _Call) -> Any:
        user = self._users.get(int(call.params["user_id"]))
        if user is None:
            raise Refusal(404, 10013, "Unknown User")
        return user.payload()

    @_route("GET", r"/gateway", auth=False)
    async def _get_gateway(self, call: _Call) -> Any:
        return {"url": self.gateway_url}

    @_route("GET", r"/gateway/bot")
    async def _get_gateway_bot(self, call: _Call) -> Any:
        limit = {"total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1}
        return {"url": self.gateway_url, "shards": 1, "session_start_limit": limit}

    @_route("GET", r"/(?:oauth2/)?applications/@me")
    async def _get_application(self, call: _Call) -> Any:
        return {
            "id": str(self.application_id),
            "name": "sygil-bot",
            "description": "",
            "icon": None,
            "bot_public": True,
            "bot_require_code_grant": False,
            "owner": self._users[self.user_id].payload(),
            "team": None,
            "verify_key": "0" * 64,
            "flags": 0,
            "interactions_endpoint_url": None,
        }

    @_route("GET", r"/applications/(?P<app_id>\d+)(?:/guilds/(?P<guild_id>\d+))?/commands")
    async def _get_commands(self, call: _Call) -> Any:
        commands = self._guild_commands if call.params.get("guild_id") else self._global_commands
        return list(commands.values())

    @_route("PUT", r"/applications/(?P<app_id>\d+)(?:/guilds/(?P<guild_id>\d+))?/commands")
    async def _put_commands(self, call: _Call) -> Any:
        if int(call.params["app_id"]) != self.application_id:
            raise Refusal(403, 50001, "Missing Access")
        guild_id = call.params.get("guild_id")
        if guild_id is not None and int(guild_id) != self.guild_id:
            raise Refusal(403, 50001, "Missing Access")
        body: list[dict[str, Any]] = call.body or []
        check_commands(body)
        old = self._guild_commands if guild_id else self._global_commands
        new: dict[str, dict[str, Any]] = {}
        for command in body:
            previous = old.get(command["name"])
            echoed = {
                "type": 1,
                "default_member_permissions": None,
                "nsfw": False,
                **command,
                "id": previous["id"] if previous else str(self._ids()),
                "application_id": str(self.application_id),
                "version": str(self._ids()),
            }
            if guild_id is not None:
                echoed["guild_id"] = guild_id
            new[command["name"]] = echoed
        if guild_id:
            self._guild_commands = new
        else:
            self._global_commands = new
        self.command_syncs += 1
        return list(new.values())

    # -- REST routes: guild and channels

    @_route("GET", r"/guilds/(?P<guild_id>\d+)")
    async def _get_guild(self, call: _Call) -> Any:
        if int(call.params["guild_id"]) != self.guild_id:
            raise Refusal(404, 10004, "Unknown Guild")
        return self._guild()

    @_route("GET", r"/guilds/(?P<guild_id>\d+)/members/(?P<user_id>\d+)")
    async def _get_member(self, call: _Call) -> Any:
        user = self._users.get(int(call.params["user_id"]))
        if user is None or int(call.params["guild_id"]) != self.guild_id:
            raise Refusal(404, 10007, "Unknown Member")
        return user.member()

    @_route("GET", r"/channels/(?P<channel_id>\d+)")
    async def _get_channel(self, call: _Call) -> Any:
        return self._channels[self._channel(call)]

    @_route("POST", r"/channels/(?P<channel_id>\d+)/messages")
    async def _post_message(self, call: _Call) -> Any:
        channel_id = self._channel(call)
        if self._channels[channel_id]["type"] == 4:
            raise Refusal(400, 50008, "Cannot send messages in a non-text channel")
        body: dict[str, Any] = call.body or {}
        nonce: int | str | None = body.get("nonce")
        if nonce is None:
            return self._message_payload(self._create(channel_id, call))
        if isinstance(nonce, str) and len(nonce) > 25:
            raise invalid_form("nonce", "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")
        key, now = (channel_id, self.bot_user_id, nonce), time.monotonic()
        earlier, sent_at = self._nonces.get(key, (None, 0.0))
        if body.get("enforce_nonce") and earlier is not None and not earlier.deleted and now - sent_at < self.nonce_ttl:
            # Discord answers a retried send with the message the first one created, and creates nothing.
            return {**self._message_payload(earlier), "nonce": nonce}
        message = self._create(channel_id, call)
        message.nonce = nonce
        self._nonces[key] = (message, now)
        return {**self._message_payload(message), "nonce": nonce}

    @_route("GET", r"/channels/(?P<channel_id>\d+)/messages/(?P<message_id>\d+)")
    async def _get_message(self, call: _Call) -> Any:
        return self._message_payload(self._channel_message(call))

    @_route("PATCH", r"/channels/(?P<channel_id>\d+)/messages/(?P<message_id>\d+)")
    async def _patch_message(self, call: _Call) -> Any:
        message = self._channel_message(call)
        if message.author_id != self.bot_user_id:
            raise Refusal(403, 50005, "Cannot edit a message authored by another user")
        return self._message_payload(self._write(message, call, edit=True))

    @_route("DELETE", r"/channels/(?P<channel_id>\d+)/messages/(?P<message_id>\d+)")
    async def _delete_message(self, call: _Call) -> Any:
        self._channel_message(call).deleted = True
        return None

    # -- REST routes: interactions

    @_route("POST", r"/interactions/(?P<interaction_id>\d+)/(?P<token>[^/]+)/callback", auth=False)
    async def _callback(self, call: _Call) -> Any:
        interaction = self._by_token.get(call.params["token"])
        if interaction is None or interaction.id != int(call.params["interaction_id"]):
            raise Refusal(404, 10062, "Unknown interaction")
        body: dict[str, Any] = call.body or {}
        now = time.monotonic()
        interaction.callbacks.append(body)
        if interaction.responded_at is None:
            interaction.responded_at = now
        if interaction.acknowledged:
            raise Refusal(400, 40060, "Interaction has already been acknowledged.")
        if now - interaction.dispatched_at > self.ack_timeout:
            late = now - interaction.dispatched_at
            raise Refusal(404, 10062, f"Unknown interaction (callback {late:.2f} s after dispatch)")
        kind, callback_type = interaction.kind, body.get("type")
        if callback_type not in _ALLOWED_CALLBACKS[kind]:
            raise Refusal(400, 50035, f"Invalid Form Body (type: callback type {callback_type} invalid for {kind})")
        data: dict[str, Any] = body.get("data") or {}
        message_call = _Call(call.params, call.query, data, call.uploads)
        message: Message | None = None
        if callback_type == 4:
            message = self._create(interaction.channel_id, message_call, interaction)
        elif callback_type == 5:
            message = Message(self._ids(), interaction.channel_id, self.bot_user_id, interaction_id=interaction.id)
            message.flags = LOADING | (data.get("flags") or 0) & EPHEMERAL
            message.type = 20 if kind == "application_command" else 0
            self._messages[message.id] = message
        elif callback_type in (6, 7):
            message = interaction.source_message
            if callback_type == 7 and message is not None:
                self._write(message, message_call, edit=True)
        elif callback_type == 8:
            check_choices(data.get("choices") or [])
        interaction.acknowledged = True
        interaction.original = message
        response: dict[str, Any] = {
            "id": str(interaction.id),
            "type": _INTERACTION_TYPES[kind],
            "response_message_loading": callback_type == 5,
            "response_message_ephemeral": bool(message and message.ephemeral),
        }
        resource: dict[str, Any] = {"type": callback_type}
        if message is not None:
            response["response_message_id"] = str(message.id)
            resource["message"] = self._message_payload(message)
        return {"interaction": response, "resource": resource}

    def _webhook(self, call: _Call) -> FakeInteraction:
        interaction = self._by_token.get(call.params["token"])
        if int(call.params["app_id"]) != self.application_id:
            raise Refusal(404, 10015, "Unknown Webhook")
        if interaction is None:
            raise Refusal(401, 50027, "Invalid Webhook Token")
        if time.monotonic() - interaction.dispatched_at > self.interaction_token_ttl:
            raise Refusal(401, 50027, "Invalid Webhook Token (the interaction token expired)")
        if not interaction.acknowledged or interaction.kind == "autocomplete":
            raise Refusal(404, 10015, "Unknown Webhook (the interaction has not been acknowledged yet)")
        return interaction

    def _webhook_message(self, call: _Call) -> tuple[FakeInteraction, Message]:
        interaction = self._webhook(call)
        target = call.params["message_id"]
        if target == "@original":
            message = interaction.original
        else:
            message = next(
                (m for m in [interaction.original, *interaction.followups] if m and m.id == int(target)), None
            )
        if message is None or message.deleted:
            raise Refusal(404, 10008, "Unknown Message")
        return interaction, message

    @_route("POST", r"/webhooks/(?P<app_id>\d+)/(?P<token>[^/]+)", auth=False)
    async def _followup(self, call: _Call) -> Any:
        interaction = self._webhook(call)
        original = interaction.original
        if original is not None and original.loading and not original.deleted:
            # Discord reads the first followup after a deferral as resolving the "thinking" message.
            self._write(original, call, edit=True)
            original.edits -= 1
            original.edited_timestamp = None
            original.allowed_mentions = (call.body or {}).get("allowed_mentions")
            message = original
        else:
            message = self._create(interaction.channel_id, call, interaction)
        interaction.followups.append(message)
        return self._message_payload(message)

    @_route("GET", r"/webhooks/(?P<app_id>\d+)/(?P<token>[^/]+)/messages/(?P<message_id>@original|\d+)", auth=False)
    async def _get_webhook_message(self, call: _Call) -> Any:
        return self._message_payload(self._webhook_message(call)[1])

    @_route("PATCH", r"/webhooks/(?P<app_id>\d+)/(?P<token>[^/]+)/messages/(?P<message_id>@original|\d+)", auth=False)
    async def _patch_webhook_message(self, call: _Call) -> Any:
        _, message = self._webhook_message(call)
        return self._message_payload(self._write(message, call, edit=True))

    @_route("DELETE", r"/webhooks/(?P<app_id>\d+)/(?P<token>[^/]+)/messages/(?P<message_id>@original|\d+)", auth=False)
    async def _delete_webhook_message(self, call: _Call) -> Any:
        self._webhook_message(call)[1].deleted = True
        return None


def _json(data: Any, status: int = 200) -> web.Response:
    """Answer JSON with the exact Content-Type discord.py checks for (no charset)."""
    return web.Response(status=status, body=json.dumps(data).encode(), headers={"Content-Type": "application/json"})


def _leaf_options(options: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return the value options under any subcommand group and subcommand."""
    while options and options[0]["type"] in (1, 2):
        options = options[0].get("options") or []
    return options


def _typed_options(
    schema: list[dict[str, Any]],
    values: dict[str, Any],
    focused: str | None,
    snowflake: Callable[[dict[str, Any], Any], str],
) -> list[dict[str, Any]]:
    """Build interaction options typed from the synced schema, refusing what the Discord client would not send."""
    by_name = {o["name"]: o for o in schema}
    unknown = set(values) - set(by_name)
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}; the command has {sorted(by_name)}")
    if focused is None:
        missing = [o["name"] for o in schema if o.get("required") and o["name"] not in values]
        if missing:
            raise ValueError(f"missing required options {missing}")
    elif focused not in values:
        raise ValueError(f"the focused option {focused!r} needs a value (the text typed so far)")
    options: list[dict[str, Any]] = []
    for name, value in values.items():
        option = by_name[name]
        if name == focused:
            if not option.get("autocomplete"):
                raise ValueError(f"option {name!r} has no autocomplete")
            options.append({"type": option["type"], "name": name, "value": str(value), "focused": True})
        else:
            options.append({"type": option["type"], "name": name, "value": _coerce(option, value, snowflake)})
    return options


def _coerce(option: dict[str, Any], value: Any, snowflake: Callable[[dict[str, Any], Any], str]) -> Any:
    kind, name = option["type"], option["name"]
    if kind in _SNOWFLAKE_OPTIONS:
        return snowflake(option, value)
    if kind == 3:
        value = str(value)
        if not option.get("min_length", 0) <= len(value) <= option.get("max_length", 6000):
            raise ValueError(f"option {name!r}: length {len(value)} out of range")
    elif kind == 4:
        if isinstance(value, bool) or int(value) != value:
            raise ValueError(f"option {name!r} takes an integer, not {value!r}")
        value = int(value)
    elif kind == 10:
        value = float(value)
    elif kind == 5:
        if not isinstance(value, bool):
            raise ValueError(f"option {name!r} takes a boolean, not {value!r}")
    else:
        raise NotImplementedError(f"option {name!r} has type {kind}; FakeDiscord types only 3 to 10")
    if kind in (4, 10) and not option.get("min_value", value) <= value <= option.get("max_value", value):
        raise ValueError(f"option {name!r}: {value} out of range")
    choices = option.get("choices")
    if choices and value not in [c["value"] for c in choices]:
        raise ValueError(f"option {name!r}: {value!r} is not one of the choices")
    return value
