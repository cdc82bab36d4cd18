"""Export the votes with exactly what made each image, one record per image, for training the next model."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, TextIO

from bot.errors import DatabaseVersionError
from bot.storage import FEEDBACK_SCHEMA, Database

if TYPE_CHECKING:
    import pyarrow

FORMATS = ("jsonl", "csv", "parquet")
PARQUET_INSTALL = 'pip install -e ".[export]" in the sygil-bot checkout'
# Records handled at a time (image files copied, lines written) and images per Parquet row group: what is held in
# memory at once, whatever the number of images.
CHUNK = 500
ROW_GROUP = 5_000
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


class _Sink(Protocol):
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


class _Csv:
    def __init__(self, out: IO[str]) -> None:
        self._writer = csv.DictWriter(out, fieldnames=FIELDS)
        self._writer.writeheader()

    def write(self, records: list[dict[str, Any]]) -> None:
        self._writer.writerows({**item, "tags": "|".join(item["tags"])} for item in records)

    def close(self) -> None:
        pass


class _Parquet:
    """Write row groups of ``ROW_GROUP`` images, holding only the one being filled."""

    def __init__(self, out: IO[bytes]) -> None:
        import pyarrow.parquet as pq

        self._schema = parquet_schema()
        self._writer = pq.ParquetWriter(out, self._schema)
        self._columns: dict[str, list[Any]] = {name: [] for name in FIELDS}
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


def _sink(format: str, out: IO[Any]) -> _Sink:
    if format == "parquet":
        return _Parquet(out)
    if format == "csv":
        return _Csv(out)
    return _Jsonl(out)


class _Images:
    """Put each exported image's kept PNG in ``folder`` as ``<job_id>-<index>.png``, and name it in its record."""

    def __init__(self, folder: Path, *, storage: Path) -> None:
        self.folder = folder
        self.storage = storage  # the database's folder: storage.keep_images writes under its images/
        self.copied = self.not_kept = self.withheld = 0

    def take(self, records: list[dict[str, Any]]) -> None:
        for item in records:
            item["file"] = self._take(item)

    def _take(self, item: dict[str, Any]) -> str | None:
        if item["deleted"]:
            # Its requester deleted it: the record (and its vote) stays for the statistics, the pixels do not go on.
            self.withheld += 1
            return None
        source = self._find(item["file"])
        if source is None:
            self.not_kept += 1
            return None
        name = f"{item['job_id']}-{item['index']}.png"
        target = self.folder / name
        target.unlink(missing_ok=True)  # from an earlier export into the same folder
        try:
            os.link(source, target)  # no copy when both are on one file system
        except OSError:
            shutil.copyfile(source, target)
        self.copied += 1
        return name

    def _find(self, file: str | None) -> Path | None:
        """Return the kept PNG: where its row says, else by name in the images folder beside the database.

        The row holds the path the bot wrote, relative to the bot's working folder when storage.path is relative;
        the storage folder may also have moved since (another mount of a container's volume).
        """
        if not file:
            return None
        for path in (Path(file), self.storage / "images" / Path(file).name):
            if path.is_file():
                return path
        return None


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
    version = await db.schema_version()
    if version < FEEDBACK_SCHEMA:
        raise DatabaseVersionError(
            f"The database is at version {version}, from an older sygil-bot; the export reads version "
            f"{FEEDBACK_SCHEMA} or later and never upgrades a database itself: start this sygil-bot on it once (it "
            "upgrades the database as it starts), then export again"
        )
    keep = _Images(images, storage=storage or Path()) if images is not None else None
    if keep is not None:
        await asyncio.to_thread(keep.folder.mkdir, parents=True, exist_ok=True)
    options = asdict(filters)  # the keyword arguments of Database.feedback
    total = await db.feedback_count(**options) if progress is not None else 0
    sink = _sink(format, out)
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
    return Exported(images=count, copied=keep.copied, not_kept=keep.not_kept, withheld=keep.withheld)


class ProgressBar:
    """A one-line bar on a terminal: the images written, of how many, and how fast."""

    WIDTH = 30

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._start = time.monotonic()
        self._shown = False

    def __call__(self, count: int, total: int) -> None:
        rate = count / max(time.monotonic() - self._start, 1e-6)
        done = min(count / total, 1.0) if total else 1.0
        filled = round(done * self.WIDTH)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        self._stream.write(f"\r[{bar}] {done:4.0%} {count:,}/{total:,} images, {rate:,.0f}/s")
        self._stream.flush()
        self._shown = True

    def close(self) -> None:
        """End the bar's line, so what follows starts on its own."""
        if self._shown:
            self._stream.write("\n")
            self._stream.flush()
