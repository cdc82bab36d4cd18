"""``sygil-bot cluster``: the Redis users of the cluster mode: add the bot's, add, list and revoke workers'.

Every subcommand talks to Redis as an admin (``--admin URL`` or ``SYGIL_REDIS_ADMIN``: a user that may run ACL
commands, such as the default user with ``REDIS_PASSWORD``); the rules themselves live in ``bot.cluster.acl``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from bot.cli import Commands
from bot.cluster.broker import BrokerURL, parse
from bot.errors import ConfigError

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from bot.cluster.wire import Keys

ADMIN_ENV = "SYGIL_REDIS_ADMIN"
_ADMIN_EXAMPLE = "like redis://:REDIS_PASSWORD@HOST:6379/0"


def add_parser(commands: Commands) -> None:
    """Add ``cluster`` and its subcommands to the command line."""
    cluster = commands.add_parser("cluster", help="the cluster mode's Redis users: the bot's and each worker's")
    actions = cluster.add_subparsers(required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--admin", metavar="URL", help=f"a Redis admin user's URL, {_ADMIN_EXAMPLE} (default: ${ADMIN_ENV})"
    )
    where = common.add_mutually_exclusive_group()
    where.add_argument("--config", type=Path, help="read cluster.prefix from these TOML settings")
    where.add_argument("--prefix", help="the cluster's key prefix (cluster.prefix; default: sygil)")
    printed = argparse.ArgumentParser(add_help=False)
    printed.add_argument("--host", help="the host in the printed URL, as workers reach Redis (default: the admin's)")
    printed.add_argument("--port", type=int, help="the port in the printed URL (default: the admin URL's)")
    printed.add_argument("--tls", action="store_true", help="print a rediss:// (TLS) URL")
    printed.add_argument(
        "--password-env",
        metavar="VAR",
        help="take the password from this environment variable (the URL is then printed without it); "
        "default: a new random one",
    )

    bot = actions.add_parser(
        "add-bot", parents=[common, printed], help="create the bot's Redis user (or give it a new password)"
    )
    bot.add_argument("--name", default="sygil-bot", help="the bot's user name (default: sygil-bot)")
    bot.set_defaults(handler=_add_bot)

    add = actions.add_parser(
        "add-worker", parents=[common, printed], help="create a worker's Redis user; print its SYGIL_BROKER URL"
    )
    add.add_argument("name", metavar="NAME", help="the worker's name (its cluster.name and its Redis user)")
    add.add_argument("--replace", action="store_true", help="reset this worker's user if it exists (new password)")
    add.set_defaults(handler=_add_worker)

    revoke = actions.add_parser(
        "revoke-worker", parents=[common], help="delete a worker's user, close its connections, remove its keys"
    )
    revoke.add_argument("name", metavar="NAME")
    revoke.set_defaults(handler=_revoke_worker)

    workers = actions.add_parser("workers", parents=[common], help="list the workers' users, connected or not")
    workers.set_defaults(handler=_workers)


def _add_bot(args: argparse.Namespace) -> int:
    from bot.cluster.acl import add_bot

    password = _password(args)

    async def act(redis: Redis, keys: Keys) -> None:
        url = await add_bot(redis, keys, _printed(args), name=args.name, password=password)
        _print_url(url, secret=password is None)
        print(f"The bot's Redis user {args.name} is ready: set the bot's SYGIL_BROKER to that URL.", file=sys.stderr)
        await _note_aclfile(redis)

    return _admin(args, act)


def _add_worker(args: argparse.Namespace) -> int:
    from bot.cluster.acl import add_worker, check_worker_name

    check_worker_name(args.name)
    password = _password(args)

    async def act(redis: Redis, keys: Keys) -> None:
        url = await add_worker(redis, keys, args.name, _printed(args), password=password, replace=args.replace)
        _print_url(url, secret=password is None)
        print(
            f"Worker {args.name} may now take batches: set SYGIL_BROKER to that URL on its host, and cluster.name "
            f"to {args.name}. Revoke it with: sygil-bot cluster revoke-worker {args.name}",
            file=sys.stderr,
        )
        await _note_aclfile(redis)

    return _admin(args, act)


def _revoke_worker(args: argparse.Namespace) -> int:
    from bot.cluster.acl import check_worker_name, revoke_worker

    check_worker_name(args.name)

    async def act(redis: Redis, keys: Keys) -> None:
        done = await revoke_worker(redis, keys, args.name)
        print(
            f"Revoked worker {args.name}: its user is deleted, {_count(done.connections, 'connection')} closed, "
            f"{_count(done.keys, 'key')} and {_count(done.consumers, 'consumer')} removed, "
            f"{_count(done.handed_back, 'batch', 'batches')} left for the other workers to take."
        )
        await _note_aclfile(redis)

    return _admin(args, act)


def _workers(args: argparse.Namespace) -> int:
    from bot.cluster.acl import list_workers

    async def act(redis: Redis, keys: Keys) -> None:
        workers = await list_workers(redis, keys)
        if not workers:
            print(f"No workers in this cluster (prefix {keys.prefix}): add one with sygil-bot cluster add-worker NAME")
        for worker in workers:
            connected = f"connected ({_count(worker.connections, 'connection')})" if worker.connections else "offline"
            devices = f", heartbeats from {', '.join(worker.devices)}" if worker.devices else ""
            print(f"{worker.name}: {connected}{devices}")

    return _admin(args, act)


def _admin(args: argparse.Namespace, act: Callable[[Redis, Keys], Awaitable[None]]) -> int:
    """Run ``act`` with a client of the admin URL and the cluster's keys; Redis's refusals become one line."""
    from bot.cluster.acl import AclError, check_prefix

    url = _admin_url(args)
    keys = check_prefix(args.prefix or (_config_prefix(args.config) if args.config else "sygil"))
    args.admin_url = url

    async def run() -> None:
        from redis.exceptions import AuthenticationError, AuthorizationError, NoPermissionError

        from bot.cluster.broker import connect, unreachable_errors

        broker = parse(url)
        shown = str(broker)
        async with connect(url) as redis:
            try:
                await redis.ping()  # pyright: ignore[reportUnknownMemberType] (typed as sync or async)
                await act(redis, keys)
            except (AuthenticationError, AuthorizationError) as error:
                raise AclError(
                    f"Redis at {shown} refused the admin user or password: {_clean(error, broker)}. "
                    f"Check --admin (or {ADMIN_ENV})"
                ) from None
            except NoPermissionError as error:
                raise AclError(
                    f"the admin user of {shown} may not do this: {_clean(error, broker)}. Use an admin user, such as "
                    "the default user with REDIS_PASSWORD"
                ) from None
            except unreachable_errors() as error:
                raise AclError(f"Cannot reach Redis at {shown}: {_clean(error, broker)}") from None

    asyncio.run(run())
    return 0


def _admin_url(args: argparse.Namespace) -> str:
    url = args.admin or os.environ.get(ADMIN_ENV, "")
    if not url.strip():
        raise ConfigError(
            f"no admin URL: pass --admin URL or set {ADMIN_ENV} (a Redis user that may run ACL commands, "
            f"{_ADMIN_EXAMPLE})"
        )
    try:
        parse(url)
    except ValueError as error:
        raise ConfigError(f"--admin (or {ADMIN_ENV}): {error}") from None
    return url


def _config_prefix(path: Path) -> str:
    from bot.config import Config

    return Config.load(path, require_token=False).cluster.prefix


def _printed(args: argparse.Namespace) -> BrokerURL:
    """Return where the printed URL points: the admin URL's place, with --host, --port and --tls applied."""
    admin = parse(args.admin_url)
    where = replace(admin, username=None, password=None)
    if args.host:
        where = replace(where, scheme="rediss" if admin.scheme == "rediss" else "redis", host=args.host, path="")
    if args.port:
        if where.scheme == "unix":
            raise ConfigError("--port: the admin URL is a unix socket; give --host too")
        where = replace(where, port=args.port)
    if args.tls:
        if where.scheme == "unix":
            raise ConfigError("--tls: the admin URL is a unix socket; give --host too")
        where = replace(where, scheme="rediss")
    return where


def _password(args: argparse.Namespace) -> str | None:
    if args.password_env is None:
        return None
    password = os.environ.get(args.password_env, "")
    if not password:
        raise ConfigError(f"--password-env: the environment variable {args.password_env} is not set, or empty")
    return password


def _print_url(url: str, *, secret: bool) -> None:
    """Print the user's URL once: in full with a password made here, else without the password the caller knows."""
    from bot.cluster.broker import redacted

    print(url if secret else redacted(url))


async def _note_aclfile(redis: Redis) -> None:
    from bot.cluster.acl import aclfile

    if not await aclfile(redis):
        print(
            "Note: this Redis has no aclfile (redis-server --aclfile): its users last only until it restarts.",
            file=sys.stderr,
        )


def _clean(error: BaseException, broker: BrokerURL) -> str:
    reason = str(error) or type(error).__name__
    return reason.replace(broker.password, "***") if broker.password else reason


def _count(number: int, one: str, many: str | None = None) -> str:
    return f"{number} {one if number == 1 else (many or one + 's')}"
