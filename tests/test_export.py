"""`sygil-bot export-feedback`: one record per image with its votes and exactly what made it, as JSONL or CSV."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

from bot.engine.types import Settings
from bot.storage import Database, JobKind, Provenance
from tests._bulk import bulk_database
from tests.test_cli import sygil


async def _database(path: Path) -> None:
    """Two jobs on two model revisions: the first with two images and votes, the second a variation of it."""
    async with await Database.open(path) as db:
        first = await db.create_job(
            kind=JobKind.IMAGINE, user_id=1, guild_id=2, channel_id=3, prompt="species:seal, beach",
            negative_prompt="blurry", seed=7, count=2, settings=Settings(steps=4, width=64, height=64),
            model="tiny", scheduler="dpm++", tags=[("species", "seal")],
        )  # fmt: skip
        made = Provenance("sha256:old", "float16", True, 11, 2, 0.5, 1.25)
        await db.record_images(job_id=first.id, seeds=[7, 8], nsfw=[False, True], provenance=[made, made])
        await db.record_vote(job_id=first.id, index=0, user_id=5, vote=1)
        await db.record_vote(job_id=first.id, index=0, user_id=6, vote=1)
        await db.record_vote(job_id=first.id, index=1, user_id=5, vote=-1)
        second = await db.create_job(
            kind=JobKind.VARIATION, user_id=1, guild_id=2, channel_id=3, prompt="species:seal, beach",
            negative_prompt="", seed=9, count=1, settings=Settings(steps=4, width=64, height=64), model="tiny",
            scheduler="dpm++", parent_job_id=first.id, parent_index=0, tags=[("species", "seal")],
        )  # fmt: skip
        newer = Provenance("sha256:new", "float16", False, 12, 1, 0.1, 0.5)
        await db.record_images(job_id=second.id, seeds=[9], nsfw=[False], provenance=[newer])


def _export(*args: str) -> subprocess.CompletedProcess[str]:
    return sygil("export-feedback", *args)


async def test_jsonl_has_one_record_per_image_with_votes_revision_and_lineage(tmp_path: Path) -> None:
    database = tmp_path / "sygil.db"
    await _database(database)
    out = tmp_path / "feedback.jsonl"
    result = _export("--database", str(database), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "wrote 3 images" in result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    first, second, variation = records
    assert (first["prompt"], first["negative_prompt"], first["tags"]) == (
        "species:seal, beach",
        "blurry",
        ["species:seal"],
    )
    assert (first["seed"], first["steps"], first["width"], first["model"]) == (7, 4, 64, "tiny")
    assert (first["votes_up"], first["votes_down"], second["votes_up"], second["votes_down"]) == (2, 0, 0, 1)
    assert (first["model_revision"], first["compiled"], first["batch_size"], second["nsfw"]) == (
        "sha256:old",
        True,
        2,
        True,
    )
    assert variation["model_revision"] == "sha256:new" and variation["kind"] == "variation"
    assert (variation["parent_job_id"], variation["parent_index"]) == (first["job_id"], 0)


async def test_csv_and_filters(tmp_path: Path) -> None:
    database = tmp_path / "sygil.db"
    await _database(database)
    out = tmp_path / "feedback.csv"
    result = _export("--database", str(database), "--out", str(out), "--min-votes", "1")
    assert result.returncode == 0, result.stderr
    with out.open(encoding="utf-8", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(row["seed"], row["votes_up"], row["votes_down"]) for row in rows] == [("7", "2", "0"), ("8", "0", "1")]
    assert rows[0]["tags"] == "species:seal" and rows[0]["model_revision"] == "sha256:old"

    newer = tmp_path / "newer.jsonl"
    assert _export("--database", str(database), "--out", str(newer), "--revision", "sha256:new").returncode == 0
    assert [json.loads(line)["seed"] for line in newer.read_text().splitlines()] == [9]
    future = _export("--database", str(database), "--out", str(tmp_path / "none.jsonl"), "--since", "2999-01-01")
    assert future.returncode == 0 and "wrote 0 images" in future.stderr


def test_bad_arguments_are_one_line(tmp_path: Path) -> None:
    missing = _export("--database", str(tmp_path / "missing.db"), "--out", str(tmp_path / "x.jsonl"))
    assert missing.returncode == 2 and "no database at" in missing.stderr and "Traceback" not in missing.stderr
    bad_date = _export("--database", str(tmp_path / "x.db"), "--out", "x.jsonl", "--since", "yesterday")
    assert bad_date.returncode == 2 and "not a date like 2026-11-30" in bad_date.stderr


class _Discard:
    """A text sink that keeps nothing, so only the export's own memory is measured."""

    def write(self, text: str) -> int:
        return len(text)


async def test_export_streams_its_memory_does_not_grow_with_the_rows(tmp_path: Path) -> None:
    import tracemalloc

    from bot.feedback import export

    peaks: dict[int, int] = {}
    for images in (10_000, 100_000):
        database = tmp_path / f"sygil-{images}.db"
        await bulk_database(database, images)
        async with await Database.open(database) as db:
            sink = _Discard()
            tracemalloc.start()
            written = await export(db, sink)  # type: ignore[arg-type]
            peaks[images] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert written == images
    # Ten times the rows: the same chunk of rows in memory at a time (allow noise, not growth).
    assert peaks[100_000] < peaks[10_000] * 1.5 + 1_000_000, peaks
