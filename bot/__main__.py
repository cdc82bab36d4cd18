"""The ``sygil-bot`` entry point: build the command line from ``bot/cli``, run a command, return its exit status.

Owns what every command shares: logging, and turning an expected error into one line and an exit status
(2 for a wrong setting, 1 for a refusal). Each command lives in its own module under ``bot/cli``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from bot.cli import EXIT_REFUSED, cluster, export, health, imagine, prompt, run, tiny, usage, worker
from bot.errors import BotError, ConfigError


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sygil-bot`` command line and return its exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    # Read when transformers is first imported: some of its notices are printed at import time.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    try:
        return args.handler(args)
    except ConfigError as exc:
        return usage(str(exc))
    except BotError as exc:
        print(f"sygil-bot: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sygil-bot", description="A Discord bot for Sygil Diffusion.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    for command in (run, worker, cluster, health, imagine, prompt, export, tiny):
        command.add_parser(commands)
    return parser


if __name__ == "__main__":
    sys.exit(main())
