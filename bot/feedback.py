"""Export the votes with exactly what made each image, one record per image, for training the next model."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import errno
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, TextIO

from bot.errors import DatabaseVersionError
from bot.storage import FEEDBACK_SCHEMA, Database

if TYPE_CHECKING:
    import pyarrow

log = logging.getLogger(__name__)

FORMATS = ("jsonl", "csv", "parquet")
PARQUET_INSTALL = 'pip install -e ".[export]" in the sygil-bot checkout'
# Records handled at a time (image files copied, lines written) and images per Parquet row group: what is held in
# memory at once, whatever the number of images.
CHUNK = 500
ROW_GROUP = 5_000
# A CSV cell starting with one of these is a formula to a spreadsheet (``=HYPERLINK(...)`` in a prompt): such text is
# written with a leading ``'``, which spreadsheets read as "this is text".
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
# One record per image; the order of the CSV columns.
FIELDS: tuple[str, ...] = (
    "job_id",
    "index",
    "prompt",
    "negative_prompt",
    "tags",
    "seed",
    "steps",
    "guidance",
    "width",
    "height",
    "mode",
    "strength",
    "scheduler",
    "model",
    "model_revision",
    "dtype",
    "compiled",
    "batch_id",
    "batch_size",
    "waited_s",
    "rendered_s",
    "nsfw",
    "votes_up",
    "votes_down",
    "kind",
    "parent_job_id",
    "parent_index",
    "created_at",
    "deleted",
    "file",
)


@dataclass(frozen=True, slots=True)
class Filters:
    since: float | None = None  # Unix time, inclusive
    until: float | None = None  # Unix time, exclusive
    min_votes: int = 0
    revision: str | None = None


@dataclass(frozen=True, slots=True)
class Exported:
    """What an export wrote."""

    images: int  # records
    copied: int = 0  # PNGs put in the images folder
    not_kept: int = 0  # records with no PNG to copy: storage.keep_images was off, or the file is gone
    withheld: int = 0  # PNGs not copied because their requester deleted them
    refused: int = 0  # recorded files not copied: outside the images folder, or not a regular file


def record(row: dict[str, Any]) -> dict[str, Any]:
    """Return the export's record for one image row of ``Database.feedback``."""
    return {
        "job_id": row["job_id"],
        "index": row["idx"],
        "prompt": row["prompt"],
        "negative_prompt": row["negative_prompt"],
        "tags": row["tags"],
        "seed": row["seed"],
        "steps": row["steps"],
        "guidance": row["guidance"],
        "width": row["width"],
        "height": row["height"],
        "mode": row["mode"],
        "strength": row["strength"],
        "scheduler": row["scheduler"],
        "model": row["model"],
        "model_revision": row["model_revision"],
        "dtype": row["dtype"],
        "compiled": row["compiled"],
        "batch_id": row["batch_id"],
        "batch_size": row["batch_size"],
        "waited_s": row["waited_s"],
        "rendered_s": row["rendered_s"],
        "nsfw": row["nsfw"],
        "votes_up": row["up"],
        "votes_down": row["down"],
        "kind": row["kind"],
        "parent_job_id": row["parent_job_id"],
        "parent_index": row["parent_index"],
        "created_at": row["created_at"],
        "deleted": row["deleted_at"] is not None,
        "file": row["file"],
    }


def parquet_schema() -> pyarrow.Schema:
    """Return the Parquet schema of a record: typed columns, nullable where the database allows NULL."""
    import pyarrow as pa

    string, int32, int64, float64, boolean = pa.string(), pa.int32(), pa.int64(), pa.float64(), pa.bool_()
    columns: dict[str, tuple[pyarrow.DataType, bool]] = {
        "job_id": (int64, False),
        "index": (int32, False),
        "prompt": (string, False),
        "negative_prompt": (string, False),
        "tags": (pa.list_(string), False),
        "seed": (int64, False),
        "steps": (int32, False),
        "guidance": (float64, False),
        "width": (int32, False),
        "height": (int32, False),
        "mode": (string, False),
        "strength": (float64, False),
        "scheduler": (string, False),
        "model": (string, False),
        "model_revision": (string, True),  # images made before revisions were recorded have none
        "dtype": (string, True),
        "compiled": (boolean, True),
        "batch_id": (int64, True),
        "batch_size": (int32, True),
        "waited_s": (float64, True),
        "rendered_s": (float64, True),
        "nsfw": (boolean, False),
        "votes_up": (int64, False),
        "votes_down": (int64, False),
        "kind": (string, False),
        "parent_job_id": (int64, True),
        "parent_index": (int32, True),
        "created_at": (float64, True),  # Unix time
        "deleted": (boolean, False),
        "file": (string, True),
    }
    return pa.schema([pa.field(name, *columns[name]) for name in FIELDS])


class Sink(Protocol):
    def write(self, records: list[dict[str, Any]]) -> None: ...

    def close(self) -> None: ...


class _Jsonl:
    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def write(self, records: list[dict[str, Any]]) -> None:
        for item in records:
            self._out.write(json.dumps(item, ensure_ascii=False) + "\n")

    def close(self) -> None:
        pass


def _text_cell(value: object) -> object:
    """Return a CSV cell's value, text that a spreadsheet would take for a formula prefixed with ``'``.

    Only text is changed (prompts, tags, and the names a worker or the database gave): numbers the export writes
    (seeds, votes, times) stay numbers.
    """
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


class _Csv:
    def __init__(self, out: IO[str], fields: Sequence[str]) -> None:
        self._writer = csv.DictWriter(out, fieldnames=fields)
        self._writer.writeheader()

    def write(self, records: list[dict[str, Any]]) -> None:
        self._writer.writerows(
            {name: _text_cell(value) for name, value in {**item, "tags": "|".join(item["tags"])}.items()}
            for item in records
        )

    def close(self) -> None:
        pass


class _Parquet:
    """Write row groups of ``ROW_GROUP`` records, holding only the one being filled."""

    def __init__(self, out: IO[bytes], schema: pyarrow.Schema) -> None:
        import pyarrow.parquet as pq

        self._schema = schema
        self._writer = pq.ParquetWriter(out, self._schema)
        self._columns: dict[str, list[Any]] = {name: [] for name in schema.names}
        self._rows = 0

    def write(self, records: list[dict[str, Any]]) -> None:
        for name, column in self._columns.items():
            column.extend(item[name] for item in records)
        self._rows += len(records)
        if self._rows >= ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._rows:
            self._writer.write_batch(pa.RecordBatch.from_pydict(self._columns, schema=self._schema))
        for column in self._columns.values():
            column.clear()
        self._rows = 0

    def close(self) -> None:
        self._flush()
        self._writer.close()


def open_sink(
    format: str, out: IO[Any], *, fields: Sequence[str] = FIELDS, schema: Callable[[], pyarrow.Schema] = parquet_schema
) -> Sink:
    """Return a writer of records as ``format`` to ``out``: CSV columns ``fields``, Parquet columns ``schema()``."""
    if format == "parquet":
        return _Parquet(out, schema())
    if format == "csv":
        return _Csv(out, fields)
    return _Jsonl(out)


class Images:
    """Put each exported image's kept PNG in ``folder`` as ``<job_id>-<index>.png``, and name it in its record.

    Only regular files that lie in the images folder beside the database are taken: the database names the files,
    and whoever can write it (or the folder) must not make the export copy ``/etc/shadow`` or follow a link there.
    """

    def __init__(self, folder: Path, *, storage: Path) -> None:
        self.folder = folder
        self.images = storage / "images"  # where storage.keep_images writes
        self.copied = self.not_kept = self.withheld = self.refused = 0

    def take(self, records: list[dict[str, Any]]) -> None:
        for item in records:
            item["file"] = self._take(item)

    def _take(self, item: dict[str, Any]) -> str | None:
        return self.copy(f"{item['job_id']}-{item['index']}", item["file"], deleted=item["deleted"])

    def copy(self, image: str, file: str | None, *, deleted: bool) -> str | None:
        """Put the kept PNG ``file`` of ``image`` (``<job_id>-<index>``) in the folder; return its name there, or
        None when it is not copied (counted by why)."""
        if deleted:
            # Its requester deleted it: the record (and its vote) stays for the statistics, the pixels do not go on.
            self.withheld += 1
            return None
        if not file:
            self.not_kept += 1
            return None
        source = self._find(file)
        if source is None:
            self.refused += 1
            log.warning("image %s not copied: its file %r lies outside %s", image, file, self.images)
            return None
        try:
            # Not a link (O_NOFOLLOW), and never blocking on a FIFO planted in its place (O_NONBLOCK).
            fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            self.not_kept += 1
            return None
        except OSError as error:
            self.refused += 1  # names are logged with repr: a newline in one cannot forge a log line
            why = "is a symbolic link" if error.errno == errno.ELOOP else f"cannot be read ({error.strerror})"
            log.warning("image %s not copied: %r %s", image, str(source), why)
            return None
        with os.fdopen(fd, "rb") as opened:
            if not stat.S_ISREG(os.fstat(opened.fileno()).st_mode):
                self.refused += 1
                log.warning("image %s not copied: %r is not a regular file", image, str(source))
                return None
            name = f"{image}.png"
            self._put(source, opened, self.folder / name)
        self.copied += 1
        return name

    def _find(self, file: str) -> Path | None:
        """Return where the kept PNG must be, in the images folder; None when the row names a file outside it.

        The row holds the path the bot wrote, relative to the bot's working folder when storage.path is relative;
        the storage folder may also have moved since (another mount of a container's volume), so a file named
        elsewhere is looked for by name in the images folder.
        """
        recorded = Path(file)
        if recorded.name in ("", ".", ".."):
            return None
        images = self.images.resolve()
        if recorded.parent.resolve().is_relative_to(images):  # the last part is checked when opened (no links)
            return recorded
        by_name = self.images / recorded.name
        return by_name if os.path.lexists(by_name) else None

    def _put(self, source: Path, opened: IO[bytes], target: Path) -> None:
        """Link ``source`` (the file open as ``opened``) to ``target``, else copy it there through a new .part file."""
        target.unlink(missing_ok=True)  # from an earlier export into the same folder
        checked = os.fstat(opened.fileno())
        try:
            os.link(source, target)  # no copy when both are on one file system
        except OSError:
            pass
        else:
            linked = target.stat(follow_symlinks=False)
            if (linked.st_dev, linked.st_ino) == (checked.st_dev, checked.st_ino):
                return
            target.unlink()  # the source was swapped after it was checked: copy what was opened instead
        partial = target.with_name(target.name + ".part")
        partial.unlink(missing_ok=True)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                while block := opened.read(1 << 20):
                    out.write(block)
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)


async def export(
    db: Database,
    out: IO[Any],
    *,
    format: str = "jsonl",
    filters: Filters = Filters(),
    images: Path | None = None,
    storage: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Exported:
    """Write one record per image to ``out`` as it is read, so memory stays flat; return what was written.

    ``out`` is a text file for jsonl and csv, a binary one for parquet. With ``images``, each kept PNG is put in
    that folder (``storage`` is the database's folder) and the record's ``file`` names it there. ``progress`` is
    called with the images written so far and the total.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    await require_schema(db, FEEDBACK_SCHEMA)
    keep = Images(images, storage=storage or Path()) if images is not None else None
    if keep is not None:
        await asyncio.to_thread(keep.folder.mkdir, parents=True, exist_ok=True)
    options = asdict(filters)  # the keyword arguments of Database.feedback
    total = await db.feedback_count(**options) if progress is not None else 0
    sink = open_sink(format, out)
    count = 0
    chunk: list[dict[str, Any]] = []

    async def flush() -> None:
        nonlocal count
        if keep is not None:
            await asyncio.to_thread(keep.take, chunk)
        sink.write(chunk)
        count += len(chunk)
        chunk.clear()
        if progress is not None:
            progress(count, total)

    # Closed here even when writing fails, so that its cursor is not left to outlive the database.
    async with contextlib.aclosing(db.feedback(**options)) as rows:
        async for row in rows:
            chunk.append(record(row))
            if len(chunk) == CHUNK:
                await flush()
    await flush()
    sink.close()
    if keep is None:
        return Exported(images=count)
    return Exported(
        images=count, copied=keep.copied, not_kept=keep.not_kept, withheld=keep.withheld, refused=keep.refused
    )


async def require_schema(db: Database, needed: int) -> None:
    """Raise DatabaseVersionError, saying how to upgrade, when the database is older than version ``needed``."""
    version = await db.schema_version()
    if version < needed:
        raise DatabaseVersionError(
            f"The database is at version {version}, from an older sygil-bot; the export reads version "
            f"{needed} or later and never upgrades a database itself: start this sygil-bot on it once (it "
            "upgrades the database as it starts), then export again"
        )


class ProgressBar:
    """A one-line bar on a terminal: the records written (``unit``), of how many, and how fast."""

    WIDTH = 30

    def __init__(self, stream: TextIO, unit: str = "images") -> None:
        self._stream = stream
        self.unit = unit
        self._start = time.monotonic()
        self._shown = False

    def __call__(self, count: int, total: int) -> None:
        rate = count / max(time.monotonic() - self._start, 1e-6)
        done = min(count / total, 1.0) if total else 1.0
        filled = round(done * self.WIDTH)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        self._stream.write(f"\r[{bar}] {done:4.0%} {count:,}/{total:,} {self.unit}, {rate:,.0f}/s")
        self._stream.flush()
        self._shown = True

    def close(self) -> None:
        """End the bar's line, so what follows starts on its own."""
        if self._shown:
            self._stream.write("\n")
            self._stream.flush()
