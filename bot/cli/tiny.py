"""``sygil-bot make-tiny-model``: write a tiny random-weights Sygil-shaped model into a new folder (for tests)."""

from __future__ import annotations

import argparse
from pathlib import Path

from bot.cli import Commands, usage


def add_parser(commands: Commands) -> None:
    """Add ``make-tiny-model`` to the command line."""
    tiny = commands.add_parser("make-tiny-model", help="write a tiny random-weights Sygil-shaped model (for tests)")
    tiny.add_argument("directory", type=Path)
    tiny.set_defaults(handler=_make_tiny_model)


def _make_tiny_model(args: argparse.Namespace) -> int:
    from bot.engine import make_tiny_model
    from bot.engine.loading import quiet_libraries

    directory: Path = args.directory
    if directory.exists() and not directory.is_dir():
        return usage(f"{directory} is a file: make-tiny-model writes a folder; name a new one")
    if directory.is_dir() and any(directory.iterdir()):
        return usage(
            f"{directory} is not empty: make-tiny-model writes only into a new or empty folder, so that "
            "it overwrites nothing"
        )
    quiet_libraries()
    try:
        make_tiny_model(directory)
    except OSError as exc:
        return usage(f"cannot write {directory}: {exc.strerror or exc}")
    print(f"wrote a tiny random-weights model to {directory}")
    return 0
