"""``sygil-bot export-feedback``: write one record per image with its votes (JSONL, CSV or Parquet), for training.

Owns checking the command line before the database is opened, and writing beside the target so a failed
export leaves no half file; the records themselves come from ``bot.feedback``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.cli import Commands, usage
from bot.config import Config

if TYPE_CHECKING:
    from bot.feedback import Exported


def add_parser(commands: Commands) -> None:
    """Add ``export-feedback`` to the command line."""
    export = commands.add_parser("export-feedback", help="write one record per image with its votes, for training")
    export.add_argument("--out", type=Path, required=True, help="file to write (- for standard output)")
    export.add_argument(
        "--format", choices=["jsonl", "csv", "parquet"], default=None, help="default: from --out's suffix, else jsonl"
    )
    export.add_argument("--since", type=_date, default=None, help="images made on or after this date (YYYY-MM-DD)")
    export.add_argument("--until", type=_date, default=None, help="images made before this date (YYYY-MM-DD)")
    export.add_argument("--min-votes", type=int, default=0, help="only images with at least this many votes")
    export.add_argument("--revision", default=None, help="only images made by this model revision")
    export.add_argument(
        "--images", type=Path, default=None, metavar="DIR", help="also put each image's kept PNG in this folder"
    )
    export.add_argument("--config", type=Path, default=Path("config.toml"), help="where storage.path is set")
    export.add_argument("--database", type=Path, default=None, help="the SQLite file (default: the config's)")
    export.set_defaults(handler=_export_feedback)


def _date(text: str) -> float:
    """Read a YYYY-MM-DD date (UTC) as Unix time, for argparse."""
    try:
        day = datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date like 2026-11-30: {text!r}") from None
    return datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.UTC).timestamp()


def _export_feedback(args: argparse.Namespace) -> int:
    from bot.feedback import FORMATS, PARQUET_INSTALL, Filters, ProgressBar, export
    from bot.storage import Database

    if args.min_votes < 0:
        return usage(f"--min-votes must be 0 or more, got {args.min_votes}")
    if args.since is not None and args.until is not None and args.since >= args.until:
        since, until = (datetime.datetime.fromtimestamp(day, datetime.UTC).date() for day in (args.since, args.until))
        return usage(f"--since {since} must be before --until {until} (--since is included, --until is not)")
    database = args.database or Config.load(args.config, require_token=False).storage.path
    if not database.exists():
        return usage(f"no database at {database} (set --database, or storage.path in the config)")
    to_stdout = str(args.out) == "-"
    if not to_stdout and args.out.is_dir():
        return usage(f"--out {args.out} is a folder: name a file, like {args.out / 'votes.jsonl'}")
    if not to_stdout and not args.out.parent.is_dir():
        return usage(f"cannot write {args.out}: no folder {args.out.parent}")
    suffix = args.out.suffix.lower().lstrip(".")
    fmt = args.format or (suffix if suffix in FORMATS else "jsonl")
    if fmt == "parquet":
        if to_stdout:
            return usage("Parquet needs a file, not standard output: give --out FILE.parquet")
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            return usage(f"Parquet needs pyarrow: {PARQUET_INSTALL}")
    filters = Filters(since=args.since, until=args.until, min_votes=args.min_votes, revision=args.revision)
    progress = ProgressBar(sys.stderr) if sys.stderr.isatty() else None

    async def run(out: Any) -> Exported:
        # Read while the bot runs: SQLite's WAL lets this reader see a consistent snapshot beside the writer. Read
        # only: the database may belong to another version of the bot, which alone may migrate it.
        setting = "--database" if args.database else "storage.path"
        async with await Database.open_readonly(database, setting=setting) as db:
            return await export(
                db, out, format=fmt, filters=filters, images=args.images, storage=database.parent, progress=progress
            )

    try:
        if to_stdout:
            exported = asyncio.run(run(sys.stdout))
        else:
            # Written beside and renamed when done: a failed or interrupted export leaves no half file behind.
            partial = args.out.with_name(args.out.name + ".part")
            partial.unlink(missing_ok=True)  # left by a killed export; a link planted there goes, not its target
            try:
                # A new file of this user only (O_EXCL: never one that appeared meanwhile, nor a link's target).
                fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                opened = os.fdopen(fd, "wb") if fmt == "parquet" else os.fdopen(fd, "w", encoding="utf-8", newline="")
                with opened as out:
                    exported = asyncio.run(run(out))
                partial.replace(args.out)
            finally:
                partial.unlink(missing_ok=True)
    finally:
        if progress is not None:
            progress.close()
    summary = f"wrote {exported.images} images to {args.out} ({fmt})"
    if args.images is not None:
        summary += f"; copied {exported.copied} PNGs to {args.images}"
        if exported.not_kept:
            summary += f", {exported.not_kept} not kept (storage.keep_images was off, or the file is gone)"
        if exported.withheld:
            summary += f", {exported.withheld} left out: deleted by their requester"
        if exported.refused:
            summary += f", {exported.refused} refused: not a regular file in the images folder (see the warnings)"
    print(summary, file=sys.stderr)
    return 0
