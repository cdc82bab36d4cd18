"""The ``sygil-bot`` commands, one module each; here what they share: exit statuses, usage errors, --config, signals.

``bot/__main__.py`` builds the parser from each module's ``add_parser`` and turns errors into exit statuses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeAlias

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_WRONG_REVISION = 3  # `sygil-bot worker`: the bot is pinned to another model revision

# What ``add_subparsers`` returns: each command module adds its parser to it.
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def add_config(parser: argparse.ArgumentParser, default: str) -> None:
    """Add ``--config``, the TOML settings a long-running command (or its health check) reads."""
    parser.add_argument("--config", type=Path, default=Path(default), help=f"TOML settings (default: {default})")


def usage(message: str) -> int:
    """Print one line saying what was wrong with the command line and return the usage exit status."""
    print(f"sygil-bot: {message}", file=sys.stderr)
    return EXIT_USAGE


def on_signal(stop: Callable[[], object]) -> None:
    """Call ``stop`` on SIGTERM and SIGINT, from now on, in place of what was called before."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop)
