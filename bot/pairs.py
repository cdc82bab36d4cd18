"""Export the arena's votes as preference pairs in Pick-a-Pic's field layout, for preference training (Diffusion-DPO).

One row per counted vote that picked a side or called a tie: image 0 is the left image, image 1 the right one;
``label_0``/``label_1`` are 1/0 when the left won, 0/1 when the right won, 0.5/0.5 for a tie. "Both bad" votes are
left out (they prefer neither image), as are votes past a member's daily cap (``arena.max_votes_per_day``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from bot.feedback import CHUNK, Images, open_sink, require_schema
from bot.storage import ARENA_SCHEMA, Database

if TYPE_CHECKING:
    import pyarrow

FORMATS = ("jsonl", "parquet")
# Pick-a-Pic's fields first (less its URLs, JPEG bytes and ranking ids), then what made the images.
FIELDS: tuple[str, ...] = (
    "caption",
    "image_0_uid",
    "image_1_uid",
    "label_0",
    "label_1",
    "model_0",
    "model_1",
    "best_image_uid",
    "user_id",
    "created_at",
    "has_label",
    "are_different",
    "pair_id",
    "guild_id",
    "seed_0",
    "seed_1",
    "negative_prompt",
    "steps",
    "guidance",
    "width",
    "height",
    "scheduler",
    "tags",
    "seconds",
    "image_0_file",
    "image_1_file",
)
_LABELS = {"left": (1.0, 0.0), "right": (0.0, 1.0), "tie": (0.5, 0.5)}


@dataclass(frozen=True, slots=True)
class Filters:
    since: float | None = None  # Unix time of the vote, inclusive
    until: float | None = None  # Unix time of the vote, exclusive
    revision: str | None = None  # pairs showing this revision on either side


@dataclass(frozen=True, slots=True)
class Exported:
    """What a pairs export wrote."""

    rows: int
    both_bad: int = 0  # counted "both bad" votes left out
    copied: int = 0  # PNGs put in the images folder (each image once, however many votes its pair has)
    not_kept: int = 0
    withheld: int = 0
    refused: int = 0


def record(row: dict[str, Any]) -> dict[str, Any]:
    """Return the export's row for one vote of ``Database.arena_votes_export``."""
    label_0, label_1 = _LABELS[row["choice"]]
    image_0, image_1 = _uid(row["left_job_id"], row["left_index"]), _uid(row["right_job_id"], row["right_index"])
    best = image_0 if row["choice"] == "left" else image_1 if row["choice"] == "right" else None
    return {
        "caption": row["prompt"],
        "image_0_uid": image_0,
        "image_1_uid": image_1,
        "label_0": label_0,
        "label_1": label_1,
        "model_0": row["left_revision"],
        "model_1": row["right_revision"],
        "best_image_uid": best,
        "user_id": row["user_id"],
        "created_at": row["voted_at"],
        "has_label": True,
        # Two revisions' weights, or two seeds, give two different images; one revision and one seed, the same.
        "are_different": row["left_revision"] != row["right_revision"] or row["left_seed"] != row["right_seed"],
        "pair_id": row["pair_id"],
        "guild_id": row["guild_id"],
        "seed_0": row["left_seed"],
        "seed_1": row["right_seed"],
        "negative_prompt": row["negative_prompt"],
        "steps": row["steps"],
        "guidance": row["guidance"],
        "width": row["width"],
        "height": row["height"],
        "scheduler": row["scheduler"],
        "tags": row["tags"],
        "seconds": row["seconds"],
        "image_0_file": row["left_file"],  # the path the bot wrote; with --images, the name in that folder
        "image_1_file": row["right_file"],
    }


def parquet_schema() -> pyarrow.Schema:
    """Return the Parquet schema of a row: typed columns, nullable where the database allows NULL."""
    import pyarrow as pa

    string, int32, int64, float64, boolean = pa.string(), pa.int32(), pa.int64(), pa.float64(), pa.bool_()
    columns: dict[str, tuple[pyarrow.DataType, bool]] = {
        "caption": (string, False),
        "image_0_uid": (string, False),
        "image_1_uid": (string, False),
        "label_0": (float64, False),
        "label_1": (float64, False),
        "model_0": (string, False),
        "model_1": (string, False),
        "best_image_uid": (string, True),  # None for a tie
        "user_id": (int64, False),
        "created_at": (float64, False),  # Unix time of the vote
        "has_label": (boolean, False),
        "are_different": (boolean, False),
        "pair_id": (int64, False),
        "guild_id": (int64, True),
        "seed_0": (int64, False),
        "seed_1": (int64, False),
        "negative_prompt": (string, False),
        "steps": (int32, False),
        "guidance": (float64, False),
        "width": (int32, False),
        "height": (int32, False),
        "scheduler": (string, False),
        "tags": (pa.list_(string), False),
        "seconds": (float64, True),  # from the post to the vote; None when the post time was not recorded
        "image_0_file": (string, True),
        "image_1_file": (string, True),
    }
    return pa.schema([pa.field(name, *columns[name]) for name in FIELDS])


class _PairImages:
    """Put both images of each exported pair in the folder once, and name them in every row of the pair."""

    def __init__(self, images: Images) -> None:
        self.images = images
        self._names: dict[str, str | None] = {}  # uid → its name in the folder; one entry per image, not per vote

    def take(self, rows: list[dict[str, Any]], sources: list[dict[str, Any]]) -> None:
        for item, source in zip(rows, sources, strict=True):
            for number, side in ((0, "left"), (1, "right")):
                uid = item[f"image_{number}_uid"]
                if uid not in self._names:
                    deleted = source[f"{side}_deleted_at"] is not None
                    self._names[uid] = self.images.copy(uid, source[f"{side}_file"], deleted=deleted)
                item[f"image_{number}_file"] = self._names[uid]


async def export(
    db: Database,
    out: IO[Any],
    *,
    max_votes_per_day: int,
    format: str = "jsonl",
    filters: Filters = Filters(),
    images: Path | None = None,
    storage: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Exported:
    """Write one row per counted vote to ``out`` as it is read, so memory stays flat; return what was written.

    ``out`` is a text file for jsonl, a binary one for parquet. With ``images``, both PNGs of each pair are put in
    that folder as ``<uid>.png`` (``storage`` is the database's folder) and ``image_0_file``/``image_1_file`` name
    them there. ``progress`` is called with the rows written so far and the total.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    await require_schema(db, ARENA_SCHEMA)
    keep = _PairImages(Images(images, storage=storage or Path())) if images is not None else None
    if keep is not None:
        await asyncio.to_thread(keep.images.folder.mkdir, parents=True, exist_ok=True)
    options = {**asdict(filters), "max_per_day": max_votes_per_day}
    total, both_bad = await db.arena_votes_export_count(**options)
    sink = open_sink(format, out, fields=FIELDS, schema=parquet_schema)
    count = 0
    rows: list[dict[str, Any]] = []
    sources: list[dict[str, Any]] = []

    async def flush() -> None:
        nonlocal count
        if keep is not None:
            await asyncio.to_thread(keep.take, rows, sources)
        sink.write(rows)
        count += len(rows)
        rows.clear()
        sources.clear()
        if progress is not None:
            progress(count, total)

    async with contextlib.aclosing(db.arena_votes_export(**options)) as found:
        async for row in found:
            rows.append(record(row))
            sources.append(row)
            if len(rows) == CHUNK:
                await flush()
    await flush()
    sink.close()
    if keep is None:
        return Exported(rows=count, both_bad=both_bad)
    copier = keep.images
    return Exported(
        rows=count,
        both_bad=both_bad,
        copied=copier.copied,
        not_kept=copier.not_kept,
        withheld=copier.withheld,
        refused=copier.refused,
    )


def _uid(job_id: int, index: int) -> str:
    """Name an image as export-feedback names its PNG: ``<job_id>-<index>``."""
    return f"{job_id}-{index}"
