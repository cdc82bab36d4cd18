"""``sygil-bot export-feedback`` and ``export-pairs``: write one record per image with its votes (JSONL, CSV or
Parquet), or one preference pair per arena vote (JSONL or Parquet), for training.

Owns checking the command line before the database is opened, and writing beside the target so a failed
export leaves no half file; the records themselves come from ``bot.feedback`` and ``bot.pairs``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from bot.cli import Commands, usage
from bot.config import ArenaConfig, Config

if TYPE_CHECKING:
    from bot.feedback import Exported, ProgressBar
    from bot.pairs import Exported as ExportedPairs
    from bot.storage import Database

T = TypeVar("T")


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

    pairs = commands.add_parser(
        "export-pairs",
        help="write the arena's votes as preference pairs (Pick-a-Pic's fields), for Diffusion-DPO",
        description=(
            "One row per counted arena vote that picked a side (label_0/label_1 1/0 or 0/1) or called a tie "
            "(0.5/0.5); image 0 is the left image. 'Both bad' votes are left out, and so are votes past a member's "
            "arena.max_votes_per_day."
        ),
    )
    pairs.add_argument("--out", type=Path, required=True, help="file to write (- for standard output)")
    pairs.add_argument("--format", choices=["jsonl", "parquet"], default=None, help="default: from --out's suffix")
    pairs.add_argument("--since", type=_date, default=None, help="votes cast on or after this date (YYYY-MM-DD)")
    pairs.add_argument("--until", type=_date, default=None, help="votes cast before this date (YYYY-MM-DD)")
    pairs.add_argument("--revision", default=None, help="only pairs showing this model revision on either side")
    pairs.add_argument(
        "--images", type=Path, default=None, metavar="DIR", help="also put both kept PNGs of each pair in this folder"
    )
    pairs.add_argument("--config", type=Path, default=Path("config.toml"), help="where storage.path is set")
    pairs.add_argument("--database", type=Path, default=None, help="the SQLite file (default: the config's)")
    pairs.set_defaults(handler=_export_pairs)


def _date(text: str) -> float:
    """Read a YYYY-MM-DD date (UTC) as Unix time, for argparse."""
    try:
        day = datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date like 2026-11-30: {text!r}") from None
    return datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.UTC).timestamp()


def _export_feedback(args: argparse.Namespace) -> int:
    from bot.feedback import FORMATS, Filters, ProgressBar, export

    if args.min_votes < 0:
        return usage(f"--min-votes must be 0 or more, got {args.min_votes}")
    checked = _check(args, FORMATS)
    if isinstance(checked, int):
        return checked
    database, fmt = checked
    filters = Filters(since=args.since, until=args.until, min_votes=args.min_votes, revision=args.revision)
    progress = ProgressBar(sys.stderr) if sys.stderr.isatty() else None

    async def run(db: Database, out: Any) -> Exported:
        return await export(
            db, out, format=fmt, filters=filters, images=args.images, storage=database.parent, progress=progress
        )

    exported = _write(args, database, fmt, run, progress)
    summary = f"wrote {exported.images} images to {args.out} ({fmt})"
    if args.images is not None:
        summary += _copied(args.images, exported)
    print(summary, file=sys.stderr)
    return 0


def _export_pairs(args: argparse.Namespace) -> int:
    from bot.feedback import ProgressBar
    from bot.pairs import FORMATS, Filters, export

    checked = _check(args, FORMATS)
    if isinstance(checked, int):
        return checked
    database, fmt = checked
    # The daily cap decides which votes count: the bot's setting when its config is there.
    if args.database is None or args.config.exists():
        cap = Config.load(args.config, require_token=False).arena.max_votes_per_day
    else:
        cap = ArenaConfig().max_votes_per_day
    filters = Filters(since=args.since, until=args.until, revision=args.revision)
    progress = ProgressBar(sys.stderr, unit="pairs") if sys.stderr.isatty() else None

    async def run(db: Database, out: Any) -> ExportedPairs:
        return await export(
            db,
            out,
            max_votes_per_day=cap,
            format=fmt,
            filters=filters,
            images=args.images,
            storage=database.parent,
            progress=progress,
        )

    exported = _write(args, database, fmt, run, progress)
    summary = f"wrote {exported.rows} pairs to {args.out} ({fmt}); left out {exported.both_bad} 'both bad' votes"
    if args.images is not None:
        summary += _copied(args.images, exported)
    print(summary, file=sys.stderr)
    return 0


def _check(args: argparse.Namespace, formats: Sequence[str]) -> tuple[Path, str] | int:
    """Check what both exports share before the database is opened; return the database and the format, or the
    usage error's exit status."""
    from bot.feedback import PARQUET_INSTALL

    if args.since is not None and args.until is not None and args.since >= args.until:
        since, until = (datetime.datetime.fromtimestamp(day, datetime.UTC).date() for day in (args.since, args.until))
        return usage(f"--since {since} must be before --until {until} (--since is included, --until is not)")
    database: Path = args.database or Config.load(args.config, require_token=False).storage.path
    if not database.exists():
        return usage(f"no database at {database} (set --database, or storage.path in the config)")
    to_stdout = str(args.out) == "-"
    if not to_stdout and args.out.is_dir():
        return usage(f"--out {args.out} is a folder: name a file, like {args.out / 'votes.jsonl'}")
    if not to_stdout and not args.out.parent.is_dir():
        return usage(f"cannot write {args.out}: no folder {args.out.parent}")
    suffix = args.out.suffix.lower().lstrip(".")
    fmt = args.format or (suffix if suffix in formats else "jsonl")
    if fmt == "parquet":
        if to_stdout:
            return usage("Parquet needs a file, not standard output: give --out FILE.parquet")
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            return usage(f"Parquet needs pyarrow: {PARQUET_INSTALL}")
    return database, fmt


def _write(
    args: argparse.Namespace,
    database: Path,
    fmt: str,
    run: Callable[[Database, Any], Coroutine[Any, Any, T]],
    progress: ProgressBar | None,
) -> T:
    """Open the database read-only and ``run`` the export into ``--out``, written beside it and renamed when done."""
    from bot.storage import Database

    async def opened(out: Any) -> T:
        # Read while the bot runs: SQLite's WAL lets this reader see a consistent snapshot beside the writer. Read
        # only: the database may belong to another version of the bot, which alone may migrate it.
        setting = "--database" if args.database else "storage.path"
        async with await Database.open_readonly(database, setting=setting) as db:
            return await run(db, out)

    try:
        if str(args.out) == "-":
            return asyncio.run(opened(sys.stdout))
        # Written beside and renamed when done: a failed or interrupted export leaves no half file behind.
        partial = args.out.with_name(args.out.name + ".part")
        partial.unlink(missing_ok=True)  # left by a killed export; a link planted there goes, not its target
        try:
            # A new file of this user only (O_EXCL: never one that appeared meanwhile, nor a link's target).
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            file = os.fdopen(fd, "wb") if fmt == "parquet" else os.fdopen(fd, "w", encoding="utf-8", newline="")
            with file as out:
                exported = asyncio.run(opened(out))
            partial.replace(args.out)
            return exported
        finally:
            partial.unlink(missing_ok=True)
    finally:
        if progress is not None:
            progress.close()


def _copied(folder: Path, exported: Exported | ExportedPairs) -> str:
    """Say how many PNGs went to ``folder`` and why the others did not."""
    summary = f"; copied {exported.copied} PNGs to {folder}"
    if exported.not_kept:
        summary += f", {exported.not_kept} not kept (storage.keep_images was off, or the file is gone)"
    if exported.withheld:
        summary += f", {exported.withheld} left out: deleted by their requester"
    if exported.refused:
        summary += f", {exported.refused} refused: not a regular file in the images folder (see the warnings)"
    return summary
