"""The broker (Redis): read its URL, show it without its password, and connect the bot and the workers alike.

A broker URL is ``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]``, ``rediss://…`` (TLS) or
``unix://[[USER]:PASSWORD@]/PATH/TO/SOCKET[?db=DB]``. The password is taken as written: it may hold ``/ : @ + =``
(``openssl rand -base64 32`` makes such passwords, and compose passes them raw), because the user and password end
at the last ``@``. A percent-encoded password (``%2F`` for ``/``) is decoded, so write a ``%`` in a password as ``%25``.
``urllib.parse`` cannot read such URLs: it ends the authority at the first ``/``, so a password with a ``/`` becomes
part of the host, the port or the path, and is then logged in clear.

Parsing imports nothing heavy (the config reads every URL); ``connect`` imports redis.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import unquote

from bot.errors import BotError, ConfigError

if TYPE_CHECKING:
    from redis.asyncio import Redis

SCHEMES = ("redis", "rediss", "unix")
DEFAULT_PORT = 6379
# More than the longest blocking read (1 s), so only a silent broker times out.
_SOCKET_TIMEOUT = 10.0
_HOST = re.compile(r"[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]")
_EXAMPLE = "like redis://:PASSWORD@HOST:6379/0"


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
    """Return a client for the broker whose commands fail at once while Redis is away: the callers' loops retry."""
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    broker = parse(url)
    # One quick retry gets past a pooled connection the broker closed; waiting is the callers' business.
    retry = Retry(NoBackoff(), 1)
    if broker.scheme == "unix":
        return Redis(
            unix_socket_path=broker.path,
            db=broker.db,
            username=broker.username,
            password=broker.password,
            retry=retry,
            socket_timeout=_SOCKET_TIMEOUT,
            socket_connect_timeout=_SOCKET_TIMEOUT,
            protocol=2,  # replies shaped as the pool and the workers read them
        )
    return Redis(
        host=broker.host,
        port=broker.port,
        db=broker.db,
        username=broker.username,
        password=broker.password,
        ssl=broker.scheme == "rediss",
        retry=retry,
        socket_timeout=_SOCKET_TIMEOUT,
        socket_connect_timeout=_SOCKET_TIMEOUT,
        protocol=2,
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
        raise ConfigError(
            f"The broker at {shown} refused this worker: {error}. Check the user and password in cluster.broker "
            "(or SYGIL_BROKER)"
        ) from None
    except ResponseError as error:
        raise ConfigError(f"The broker at {shown} refused this worker: {error}") from None
    except (BrokerConnectionError, BrokerTimeoutError, OSError) as error:
        raise BotError(
            f"Cannot reach the broker at {shown}: {error}. Check that Redis runs there, and the host and port in "
            "cluster.broker (or SYGIL_BROKER)"
        ) from None


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
