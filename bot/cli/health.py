"""``sygil-bot health``: read the heartbeat of ``sygil-bot run`` (or ``worker``) for a container HEALTHCHECK."""

from __future__ import annotations

import argparse

from bot.cli import EXIT_REFUSED, Commands, add_config
from bot.config import Config
from bot.errors import ConfigError


def add_parser(commands: Commands) -> None:
    """Add ``health`` to the command line."""
    health = commands.add_parser(
        "health", help="exit 0 while `sygil-bot run` of this config serves, else 1 (for a container HEALTHCHECK)"
    )
    add_config(health, "config.toml")
    health.add_argument("--worker", action="store_true", help="check `sygil-bot worker` of this config instead")
    health.set_defaults(handler=_health)


def _health(args: argparse.Namespace) -> int:
    from bot.health import check, heartbeat_file

    try:
        config = Config.load(args.config, require_token=False)
    except ConfigError as exc:
        # A HEALTHCHECK reads 1 as unhealthy; Docker reserves 2.
        print(f"unhealthy: {exc}")
        return EXIT_REFUSED
    command = "sygil-bot worker" if args.worker else "sygil-bot run"
    health = check(heartbeat_file(config, worker=args.worker), command=command)
    print(health.line())
    return 0 if health.ok else EXIT_REFUSED
