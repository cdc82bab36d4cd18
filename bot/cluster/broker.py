"""The broker (Redis), as both sides of the cluster talk to it: its URL, the client, and Redis going away.

- URL: a broker URL is ``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]``, ``rediss://…`` (TLS) or
  ``unix://[[USER]:PASSWORD@]/PATH/TO/SOCKET[?db=DB]``. The password is taken as written: it may hold ``/ : @ + =``
  (``openssl rand -base64 32`` makes such passwords, and compose passes them raw), because the user and password
  end at the last ``@``. A percent-encoded password (``%2F`` for ``/``) is decoded, so write a ``%`` in a password
  as ``%25``. ``urllib.parse`` cannot read such URLs: it ends the authority at the first ``/``, so a password with a
  ``/`` becomes part of the host, the port or the path, and is then logged in clear. It is only ever shown
  ``redacted``.
- client: ``connect`` makes the bot's and the workers' clients alike; ``check`` asks once, ``create_group`` makes the
  workers' consumer group, ``kept`` awaits a command without losing a cancellation.
- outages: the errors that mean the broker is away (``unreachable_errors``), the ``Backoff`` between tries, the
  ``Outage`` log (one warning, the password redacted, and one line when it ends) and ``Retry``, the loop around a
  command that every retrying loop of both sides goes through.

Parsing imports nothing heavy (the config reads every URL); what talks to Redis imports redis when first called.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import unquote

from bot.errors import BotError, ConfigError

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.typing import XReadResponse

T = TypeVar("T")

SCHEMES = ("redis", "rediss", "unix")
DEFAULT_PORT = 6379
# More than the longest blocking read (1 s), so only a silent broker times out.
_SOCKET_TIMEOUT = 10.0
_HOST = re.compile(r"[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]")
_EXAMPLE = "like redis://:PASSWORD@HOST:6379/0"
_BACKOFF = (0.5, 1.0, 2.0, 4.0, 5.0)  # seconds between tries while the broker is away


@dataclass(frozen=True, slots=True)
class BrokerURL:
    """A parsed broker URL; ``str()`` gives it with the password replaced by ``***``."""

    scheme: str  # redis, rediss (TLS) or unix
    host: str = ""  # redis and rediss: a name or an address (IPv6 without its brackets)
    port: int = DEFAULT_PORT
    path: str = ""  # unix: the socket
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    shown: str = field(default="", compare=False)  # the URL as written, its password replaced by ***

    def __str__(self) -> str:
        return self.shown


def parse(url: str) -> BrokerURL:
    """Read a broker URL; raise ValueError saying what is wrong, never quoting the URL (it may hold a password)."""
    scheme, separator, rest = url.strip().partition("://")
    scheme = scheme.lower()
    if not separator or scheme not in SCHEMES:
        raise ValueError(f"must be a redis://, rediss:// or unix:// URL, {_EXAMPLE}")
    userinfo, at, location = rest.rpartition("@")
    username: str | None = None
    password: str | None = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = (unquote(secret) or None) if colon else None
    shown = f"{scheme}://{_shown_userinfo(username, password)}{location}"
    if scheme == "unix":
        path, _, query = location.partition("?")
        if not path.startswith("/"):
            raise ValueError("a unix:// URL needs the socket's absolute path, like unix:///run/redis/redis.sock")
        if query and not query.startswith("db="):
            raise ValueError("the only option of a unix:// URL is ?db=N")
        db = _db(query.removeprefix("db=")) if query else 0
        return BrokerURL(scheme, path=path, db=db, username=username, password=password, shown=shown)
    address, slash, tail = location.partition("/")
    if "?" in address or "?" in tail:
        raise ValueError(f"options after ? are not read from a {scheme}:// URL; write it {_EXAMPLE}")
    host, port = _address(address)
    db = _db(tail) if slash and tail else 0
    return BrokerURL(scheme, host=host, port=port, db=db, username=username, password=password, shown=shown)


def redacted(url: str) -> str:
    """Return a broker URL fit for a log or a message: its password replaced by ``***``."""
    try:
        return str(parse(url))
    except ValueError:
        scheme = url.partition("://")[0].lower()
        return f"{scheme}://***" if scheme in SCHEMES else "***"


def connect(url: str) -> Redis:
    """Return a client for the broker whose commands fail at once while Redis is away: the callers' loops retry.

    A ``rediss://`` broker's certificate is checked against the system's CAs, or against ``SYGIL_BROKER_CA`` (a PEM
    file) when set: a private CA for the broker alone."""
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry as ClientRetry
    from redis.backoff import NoBackoff

    broker = parse(url)
    where: dict[str, Any] = (
        {"unix_socket_path": broker.path}
        if broker.scheme == "unix"
        else {"host": broker.host, "port": broker.port, "ssl": broker.scheme == "rediss"}
    )
    ca = os.environ.get("SYGIL_BROKER_CA", "")
    if broker.scheme == "rediss" and ca:
        if not os.path.isfile(ca):
            raise ConfigError(
                f"SYGIL_BROKER_CA: {ca} is not a file (the PEM of the CA that signed Redis's certificate)"
            )
        where["ssl_ca_certs"] = ca  # this broker's CA only; the process's other connections keep the system's
    return Redis(
        **where,
        db=broker.db,
        username=broker.username,
        password=broker.password,
        # One quick retry gets past a pooled connection the broker closed; waiting is the callers' business.
        retry=ClientRetry(NoBackoff(), 1),
        socket_timeout=_SOCKET_TIMEOUT,
        socket_connect_timeout=_SOCKET_TIMEOUT,
        protocol=2,  # replies shaped as the pool and the workers read them
    )


async def check(redis: Redis, url: str) -> None:
    """Ask the broker once (the password is sent first); raise ConfigError if it refuses it, BotError if it is away."""
    from redis.exceptions import AuthenticationError, AuthorizationError, ResponseError
    from redis.exceptions import ConnectionError as BrokerConnectionError
    from redis.exceptions import TimeoutError as BrokerTimeoutError

    shown = redacted(url)
    try:
        await redis.ping()  # pyright: ignore[reportUnknownMemberType] (redis types ping as sync or async)
    except (AuthenticationError, AuthorizationError) as error:
        raise refused(url, error) from None
    except ResponseError as error:
        raise ConfigError(f"The broker at {shown} refused this worker: {error}") from None
    except (BrokerConnectionError, BrokerTimeoutError, OSError) as error:
        raise BotError(
            f"Cannot reach the broker at {shown}: {error}. Check that Redis runs there, and the host and port in "
            "cluster.broker (or SYGIL_BROKER)"
        ) from None


def refused(url: str, error: Exception) -> ConfigError:
    """Return the one line for a broker that refused the user or the password: where to correct them."""
    return ConfigError(
        f"The broker at {redacted(url)} refused this worker: {error}. Check the user and password in cluster.broker "
        "(or SYGIL_BROKER)"
    )


async def create_group(redis: Redis, stream: str) -> None:
    """Create the workers' consumer group of the batches stream (and the stream), unless the group exists."""
    from redis.exceptions import ResponseError

    from bot.cluster.wire import GROUP

    try:
        await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except ResponseError as error:
        if "BUSYGROUP" not in str(error):
            raise


def no_group(error: Exception) -> bool:
    """Return whether a command failed for want of the consumer group: nobody made it yet, or Redis restarted empty."""
    return str(error).startswith("NOGROUP")


def entries(reply: XReadResponse) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Return the (id, fields) entries of an XREAD(GROUP) reply: in RESP2, a [stream, entries] pair per stream."""
    found: list[tuple[bytes, dict[bytes, bytes]]] = []
    if isinstance(reply, list):
        for _stream, items in reply:
            found.extend(items)
    return found


async def kept(command: Awaitable[T]) -> T:
    """Await a Redis command without losing a cancellation: redis-py's asyncio client (8.1) can swallow one that lands
    while it tidies up a connection, and the cancelled task would then run on."""
    try:
        result = await command
    except Exception:
        if _cancelling():
            raise asyncio.CancelledError from None
        raise
    if _cancelling():
        raise asyncio.CancelledError
    return result


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def end(task: asyncio.Task[None]) -> None:
    """Cancel a task and wait for it to end, asking again if a cancellation got lost on the way (see ``kept``)."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)


# Outages


@functools.cache
def unreachable_errors() -> tuple[type[Exception], ...]:
    """Return the errors that mean the broker did not answer (it is down, or the network is), not a bug."""
    from redis.exceptions import ConnectionError as BrokerConnectionError
    from redis.exceptions import TimeoutError as BrokerTimeoutError

    return (BrokerConnectionError, BrokerTimeoutError, OSError)


class Backoff:
    """The waits between tries while the broker is away: half a second, doubled after each failure up to five."""

    def __init__(self) -> None:
        self._tries = 0

    def next(self) -> float:
        """Return how long to wait before the next try."""
        delay = _BACKOFF[min(self._tries, len(_BACKOFF) - 1)]
        self._tries += 1
        return delay

    def reset(self) -> None:
        """Start again from the shortest wait: the broker answered."""
        self._tries = 0


class Outage:
    """The broker being away, as one side's log tells it: one warning when it goes, each failure after that at debug
    level, one line when it answers again. The password never appears, not even where an error's text holds it.

    The lines are %-style with named fields: ``begins`` gets ``url`` and ``reason``, ``lasts`` ``reason``, and
    ``ends`` ``url`` and ``seconds`` (how long it was away).
    """

    def __init__(self, log: logging.Logger, url: str, *, begins: str, lasts: str, ends: str) -> None:
        broker = parse(url)
        self._log = log
        self._url = str(broker)
        self._password = broker.password
        self._begins = begins
        self._lasts = lasts
        self._ends = ends
        self._since: float | None = None  # time.monotonic() at the first failure; None while the broker answers

    @property
    def down(self) -> bool:
        """Whether the latest command failed for want of the broker."""
        return self._since is not None

    def failed(self, error: BaseException) -> None:
        """Note a command the broker did not answer: the first of an outage is a warning, the next ones debug lines."""
        reason = str(error) or type(error).__name__
        if self._password:
            reason = reason.replace(self._password, "***")
        if self._since is None:
            self._since = time.monotonic()
            self._log.warning(self._begins, {"url": self._url, "reason": reason})
        else:
            self._log.debug(self._lasts, {"reason": reason})

    def answered(self, *, quiet: bool = False) -> None:
        """Note that the broker answered: the outage, if any, ends, with its line unless ``quiet``."""
        if self._since is None:
            return
        seconds, self._since = time.monotonic() - self._since, None
        if not quiet:
            self._log.info(self._ends, {"url": self._url, "seconds": seconds})


class Unreachable(Enum):
    """What a try returns when the broker did not answer."""

    UNREACHABLE = "unreachable"


UNREACHABLE: Final = Unreachable.UNREACHABLE


class Retry:
    """Commands on the broker as every retrying loop of both sides tries them.

    A failure that means the broker is away goes to ``lost`` (which tells the ``Outage``, and may end the loop), any
    other answer to ``back``. One ``Retry`` per loop: its backoff grows with the loop's failures in a row and starts
    again when a command gets through; ``wake`` cuts a wait short (the loop is ending).
    """

    def __init__(
        self, lost: Callable[[Exception], None], back: Callable[[], None], *, wake: asyncio.Event | None = None
    ) -> None:
        self._lost = lost
        self._back = back
        self._wake = wake
        self._backoff = Backoff()

    async def once(self, command: Awaitable[T]) -> T | Unreachable:
        """Await one command; return its result, or UNREACHABLE at once."""
        try:
            result = await command
        except unreachable_errors() as error:
            self._lost(error)
            return UNREACHABLE
        self._back()
        return result

    async def attempt(self, command: Awaitable[T]) -> T | Unreachable:
        """Await one command; return its result, or UNREACHABLE after the backoff's wait."""
        result = await self.once(command)
        if result is UNREACHABLE:
            await pause(self._backoff.next(), self._wake)
        else:
            self._backoff.reset()
        return result

    async def persist(self, write: Callable[[], Awaitable[None]], within: float) -> bool:
        """Make a write that must reach the broker, again and again while it is away for up to ``within`` seconds;
        return whether it did."""
        deadline = time.monotonic() + within
        backoff = Backoff()
        while await self.once(write()) is UNREACHABLE:
            delay = backoff.next()
            if time.monotonic() + delay > deadline:
                return False
            await asyncio.sleep(delay)
        return True


async def pause(seconds: float, wake: asyncio.Event | None = None) -> None:
    """Sleep, waking early when ``wake`` is set."""
    if wake is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(wake.wait(), seconds)


def _shown_userinfo(username: str | None, password: str | None) -> str:
    if password is not None:
        return f"{username or ''}:***@"
    return f"{username}@" if username else ""


def _address(address: str) -> tuple[str, int]:
    """Split ``HOST[:PORT]`` (an IPv6 host in brackets); raise ValueError without quoting either."""
    if address.startswith("["):
        host, bracket, rest = address.partition("]")
        host += bracket
        port_text = rest.removeprefix(":") if rest.startswith(":") else None
        if rest and port_text is None:
            raise ValueError(f"an IPv6 host in brackets may only be followed by :PORT; {_EXAMPLE}")
    else:
        host, colon, port_text = address.partition(":")
        port_text = port_text if colon else None
    if not host:
        raise ValueError(f"no host (it comes after the last '@', so a password may hold '@' and '/'); {_EXAMPLE}")
    if not _HOST.fullmatch(host):
        raise ValueError(f"the host is not a host name or address; {_EXAMPLE}")
    if port_text is None:
        return host.strip("[]"), DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"the port is not a number from 1 to 65535; {_EXAMPLE}")
    return host.strip("[]"), int(port_text)


def _db(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"the database (after the host's '/') is not a number; {_EXAMPLE}")
    return int(text)
