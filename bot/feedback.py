"""Export the votes with exactly what made each image, one record per image, for training the next model."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from bot.storage import Database

FORMATS = ("jsonl", "csv")
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


async def export(
    db: Database,
    out: TextIO,
    *,
    format: str = "jsonl",
    filters: Filters = Filters(),
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write one record per image to ``out`` as it is read (memory stays flat); return how many were written."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    writer = csv.DictWriter(out, fieldnames=FIELDS) if format == "csv" else None
    if writer is not None:
        writer.writeheader()
    count = 0
    rows = db.feedback(since=filters.since, until=filters.until, min_votes=filters.min_votes, revision=filters.revision)
    async for row in rows:
        item = record(row)
        if writer is not None:
            writer.writerow({**item, "tags": "|".join(item["tags"])})
        else:
            out.write(json.dumps(item, ensure_ascii=False) + "\n")
        count += 1
        if progress is not None and count % 1000 == 0:
            progress(count)
    return count


def terminal_progress(count: int) -> None:
    """Show how many images were written, on a terminal only."""
    sys.stderr.write(f"\r{count:,} images written")
    sys.stderr.flush()
