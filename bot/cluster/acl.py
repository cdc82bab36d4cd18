"""Who may do what on the cluster's Redis: the ACL users of the bot and of each worker, made and revoked by an admin.

A worker is a stranger's GPU. Its user (named as the worker) may only:

- take batches as a consumer of the group: XREADGROUP, XAUTOCLAIM, XCLAIM, XACK and XPENDING on ``{prefix}:batches``
  and the candidate revisions' ``{prefix}:batches:*`` (which one a worker pulls from is the revision it announces; the
  bot takes a batch's outcome only from a worker announcing the batch's revision);
- write its own keys, ``{prefix}:w:{name}:*`` (its heartbeats and events streams): SET, GET, DEL, EXPIRE, EXISTS,
  XADD;
- read the bot's announcement ``{prefix}:bot`` and the stop flags ``{prefix}:stop:*``: GET, EXISTS;
- PING, and SELECT when its URL names a database other than 0 (redis-py sends it on connecting).

Everything else is refused with NOPERM: adding, reading or deleting batches, the consumer group itself, the pin,
another worker's keys, KEYS, SCAN, scripts, CONFIG, ACL, pub/sub. Redis 7 checks a command against the root
permissions and then each selector ``(…)``, and runs it if one of them allows both the command and all its keys:
so XADD is allowed on the worker's own keys and never on the batches stream. The bot's user may use every key of
the cluster with any command but the dangerous ones (FLUSHALL, KEYS, CONFIG, ACL, DEBUG…). Passwords are stored
hashed (``#<sha256>``); a user added here is written to the server's aclfile (ACL SAVE) when it has one.

ACL users and key patterns span every database of a Redis: two clusters sharing one Redis need different prefixes.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bot.cluster.broker import BrokerURL
from bot.cluster.wire import GROUP, Keys, valid_name, worker_of
from bot.errors import BotError, ConfigError

if TYPE_CHECKING:
    from redis.asyncio import Redis

BOT_USER = "sygil-bot"
ADMIN_USER = "default"
BATCH_COMMANDS = ("xreadgroup", "xautoclaim", "xclaim", "xack", "xpending")
OWN_COMMANDS = ("set", "get", "del", "expire", "exists", "xadd")
READ_COMMANDS = ("get", "exists")
# Holds a revoked worker's batches until another worker claims them: not a worker name, so no events speak for it.
REVOKED_HOLDER = "-revoked"
_PREFIX = re.compile(r"[A-Za-z0-9_.-]+")  # as cluster.prefix: no glob characters, so the patterns are literal
_IDLE_MS = 365 * 24 * 3600 * 1000  # a handed-back entry looks idle for longer than any lease: claimed at once
_DELETE_CHUNK = 500


class AclError(BotError):
    """Redis refused an admin step, or a name is taken or unknown; the message says which and what to do."""


@dataclass(frozen=True, slots=True)
class Worker:
    """A worker user of the cluster, as ``workers`` lists it."""

    name: str
    connections: int  # clients connected as this user now
    devices: tuple[str, ...]  # devices with a live heartbeat


@dataclass(frozen=True, slots=True)
class Revoked:
    """What revoking a worker removed."""

    connections: int  # clients of its user that Redis closed
    keys: int  # its heartbeats and events streams
    consumers: int  # its devices' consumers in the group
    handed_back: int  # batches it held, left for another worker to claim at once


def check_prefix(prefix: str) -> Keys:
    """Return the keys of a cluster prefix; raise ConfigError for one the config would refuse."""
    if not _PREFIX.fullmatch(prefix):
        raise ConfigError(f"the prefix {prefix!r} is not letters, digits, '_', '.' and '-' (as cluster.prefix)")
    return Keys(prefix)


def check_worker_name(name: str, *, bot: str = BOT_USER) -> None:
    """Raise ConfigError, in one line, for a name a worker cannot have."""
    if not valid_name(name):
        raise ConfigError(
            f"{name!r} is not a worker name: 1 to 48 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    if name in (bot, ADMIN_USER):
        raise ConfigError(f"{name!r} is the bot's or the admin's Redis user, not a worker name: choose another")


def worker_rules(keys: Keys, name: str, *, select: bool = False) -> list[str]:
    """Return the ACL SETUSER rules of worker ``name`` (after ``reset on #<hash>``)."""
    check_worker_name(name)
    return [
        "resetchannels",
        "-@all",
        "+ping",
        *(["+select"] if select else []),
        f"~{keys.batches}",
        f"~{keys.candidate_batches}",
        *(f"+{command}" for command in BATCH_COMMANDS),
        f"(~{keys.own(name)} {_allow(OWN_COMMANDS)})",
        f"(%R~{keys.bot} %R~{keys.prefix}:stop:* {_allow(READ_COMMANDS)})",
    ]


def bot_rules(keys: Keys) -> list[str]:
    """Return the ACL SETUSER rules of the bot's user (after ``reset on #<hash>``)."""
    return [f"~{keys.prefix}:*", "resetchannels", "+@all", "-@dangerous"]


def new_password() -> str:
    """Return a random password that needs no escaping in a URL (43 characters of A-Z a-z 0-9 - _)."""
    return secrets.token_urlsafe(32)


def user_url(where: BrokerURL, user: str, password: str) -> str:
    """Return the broker URL of ``user`` at ``where`` (its scheme, host, port or socket, and database)."""
    if where.scheme == "unix":
        query = f"?db={where.db}" if where.db else ""
        return f"unix://{user}:{password}@{where.path}{query}"
    host = f"[{where.host}]" if ":" in where.host else where.host
    return f"{where.scheme}://{user}:{password}@{host}:{where.port}/{where.db}"


async def add_bot(
    redis: Redis, keys: Keys, where: BrokerURL, *, name: str = BOT_USER, password: str | None = None
) -> str:
    """Create the bot's user, or reset its rules and password; return its broker URL."""
    if not valid_name(name) or name == ADMIN_USER:
        raise ConfigError(f"{name!r} cannot be the bot's user name: letters, digits, '.', '_' or '-', not 'default'")
    if name in await _workers_of(redis, keys):
        raise AclError(f"{name!r} is a worker's user: choose another name for the bot")
    password = password or new_password()
    await _set_user(redis, name, password, bot_rules(keys))
    return user_url(where, name, password)


async def add_worker(
    redis: Redis,
    keys: Keys,
    name: str,
    where: BrokerURL,
    *,
    password: str | None = None,
    replace: bool = False,
    bot: str = BOT_USER,
) -> str:
    """Create the user of worker ``name`` (or, with ``replace``, reset an existing worker's); return its broker URL."""
    check_worker_name(name, bot=bot)
    users = await _users(redis)
    if name in users and not (replace and name in _worker_lines(users, keys)):
        if name in _worker_lines(users, keys):
            raise AclError(
                f"a worker named {name} exists already: choose another name, or revoke it first "
                f"(sygil-bot cluster revoke-worker {name})"
            )
        raise AclError(f"{name} is a Redis user already, and not a worker of this cluster: choose another name")
    password = password or new_password()
    await _set_user(redis, name, password, worker_rules(keys, name, select=where.db != 0))
    return user_url(where, name, password)


async def revoke_worker(redis: Redis, keys: Keys, name: str) -> Revoked:
    """Delete worker ``name``'s user (Redis closes its connections), its keys and its consumers; hand its batches on."""
    check_worker_name(name)
    if name not in await _workers_of(redis, keys):
        raise AclError(f"no worker named {name} in this cluster (prefix {keys.prefix}): see sygil-bot cluster workers")
    connections = sum(1 for client in await _clients(redis) if client.get("user") == name)
    await _command(redis, "ACL", "DELUSER", name)
    deleted = 0
    chunk: list[Any] = []
    found: AsyncIterator[Any] = redis.scan_iter(match=keys.own(name), count=_DELETE_CHUNK)  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
    async for key in found:
        chunk.append(key)
        if len(chunk) >= _DELETE_CHUNK:
            deleted += int(await redis.delete(*chunk))
            chunk = []
    if chunk:
        deleted += int(await redis.delete(*chunk))
    consumers, handed_back = await _remove_consumers(redis, keys, name)
    await save(redis)
    return Revoked(connections=connections, keys=deleted, consumers=consumers, handed_back=handed_back)


async def list_workers(redis: Redis, keys: Keys) -> list[Worker]:
    """Return the cluster's worker users, with their connections and live heartbeats, by name."""
    names = await _workers_of(redis, keys)
    connections: dict[str, int] = {}
    for client in await _clients(redis):
        user = client.get("user", "")
        connections[user] = connections.get(user, 0) + 1
    devices: dict[str, list[str]] = {}
    beats: AsyncIterator[Any] = redis.scan_iter(match=keys.beats, count=_DELETE_CHUNK)  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
    async for key in beats:
        beat = keys.beat_of(_text(key))
        if beat is not None:
            devices.setdefault(beat[0], []).append(beat[1])
    return [Worker(name, connections.get(name, 0), tuple(sorted(devices.get(name, ())))) for name in sorted(names)]


async def save(redis: Redis) -> bool:
    """Write the users to the server's aclfile (ACL SAVE); return False when it has none (they last until a restart)."""
    from redis.exceptions import ResponseError

    try:
        await _command(redis, "ACL", "SAVE")
    except ResponseError as error:
        if "not configured to use an ACL file" in str(error):
            return False
        raise AclError(f"Redis could not write its aclfile (ACL SAVE): {error}; see the Redis log") from None
    return True


async def aclfile(redis: Redis) -> str:
    """Return the server's aclfile, where ACL SAVE writes the users; "" when it has none."""
    reply: list[Any] = await _command(redis, "CONFIG", "GET", "aclfile")
    values = [_text(item) for item in reply]
    return values[1] if len(values) > 1 else ""


async def _set_user(redis: Redis, name: str, password: str, rules: list[str]) -> None:
    from redis.exceptions import ResponseError

    digest = hashlib.sha256(password.encode()).hexdigest()
    try:
        await _command(redis, "ACL", "SETUSER", name, "reset", "on", f"#{digest}", *rules)
    except ResponseError as error:
        raise AclError(f"Redis refused the rules of user {name}: {error} (Redis 7.0 or later is needed)") from None
    await save(redis)


async def _remove_consumers(redis: Redis, keys: Keys, name: str) -> tuple[int, int]:
    """Hand the batches the worker's consumers hold to ``REVOKED_HOLDER``, looking idle for a year, so that another
    worker claims them at its next XAUTOCLAIM (XGROUP DELCONSUMER alone would drop them from the group: lost), then
    delete the consumers. Return (consumers deleted, batches handed back)."""
    streams = [keys.batches]
    found: AsyncIterator[Any] = redis.scan_iter(match=keys.candidate_batches, count=_DELETE_CHUNK)  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
    streams += sorted([_text(key) async for key in found])
    handed_back = 0
    deleted = 0
    for stream in streams:
        removed, handed = await _remove_stream_consumers(redis, stream, name)
        deleted += removed
        handed_back += handed
    return deleted, handed_back


async def _remove_stream_consumers(redis: Redis, stream: str, name: str) -> tuple[int, int]:
    """Do what ``_remove_consumers`` does on one batches stream."""
    from redis.exceptions import ResponseError

    try:
        consumers: list[dict[str, Any]] = await redis.xinfo_consumers(stream, GROUP)  # pyright: ignore[reportUnknownMemberType]
    except ResponseError:
        return 0, 0  # no stream or no group yet: no consumers
    handed_back = 0
    deleted = 0
    for consumer in consumers:
        consumer_name = _text(consumer["name"])
        if worker_of(consumer_name) != name:
            continue
        pending = int(consumer.get("pending", 0))
        if pending:
            held: list[dict[str, Any]] = await redis.xpending_range(  # pyright: ignore[reportUnknownMemberType]
                stream, GROUP, "-", "+", pending, consumername=consumer_name
            )
            ids = [entry["message_id"] for entry in held]
            if ids:
                await redis.xclaim(stream, GROUP, REVOKED_HOLDER, 0, ids, idle=_IDLE_MS, justid=True)  # pyright: ignore[reportUnknownMemberType]
                handed_back += len(ids)
        await redis.xgroup_delconsumer(stream, GROUP, consumer_name)  # pyright: ignore[reportUnknownMemberType]
        deleted += 1
    return deleted, handed_back


async def _users(redis: Redis) -> dict[str, str]:
    """Return each Redis user's ACL LIST line, by name."""
    lines: list[Any] = await _command(redis, "ACL", "LIST")
    users: dict[str, str] = {}
    for raw in lines:
        line = _text(raw)
        _, _, rest = line.partition(" ")
        users[rest.partition(" ")[0]] = line
    return users


def _worker_lines(users: dict[str, str], keys: Keys) -> set[str]:
    """Return the names of the users that are workers of this cluster: their selector owns the worker's keys."""
    return {name for name, line in users.items() if valid_name(name) and f"(~{keys.own(name)} " in line}


async def _workers_of(redis: Redis, keys: Keys) -> set[str]:
    return _worker_lines(await _users(redis), keys)


async def _clients(redis: Redis) -> list[dict[str, str]]:
    return await redis.client_list()  # pyright: ignore[reportUnknownMemberType]


async def _command(redis: Redis, *args: str) -> Any:
    return await redis.execute_command(*args)  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _allow(commands: Iterable[str]) -> str:
    return " ".join(f"+{command}" for command in commands)
