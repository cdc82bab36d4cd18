"""Hostile text and planted files in the data folder: `sygil-bot export-feedback` neither writes spreadsheet formulas
nor copies what lies outside the images folder."""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path

import pytest

from bot.engine.types import Settings
from bot.jobs import JobKind
from bot.storage import Database
from tests.test_export import _export_here, _png

HOSTILE = ['=HYPERLINK("http://evil.example","click")', "+1+2", "-2+3", "@SUM(A1)", "\tcmd", "\rcmd"]


async def _jobs(database: Path, *jobs: tuple[str, Sequence[str | None]]) -> list[int]:
    """Write one job per (prompt, kept files), the prompt also as its negative prompt; return their ids."""
    async with await Database.open(database) as db:
        ids = [await _job(db, prompt=prompt, negative_prompt=prompt, files=files) for prompt, files in jobs]
        await db.record_vote(job_id=ids[0], index=0, user_id=5, vote=-1)
    return ids


async def _job(db: Database, *, prompt: str, negative_prompt: str, files: Sequence[str | None]) -> int:
    job = await db.create_job(
        kind=JobKind.IMAGINE, user_id=1, guild_id=2, channel_id=3, prompt=prompt, negative_prompt=negative_prompt,
        seed=7, count=len(files), settings=Settings(steps=4, width=64, height=64), model="tiny", scheduler="dpm++",
        tags=[("species", "seal")],
    )  # fmt: skip
    await db.record_images(job_id=job.id, seeds=list(range(len(files))), nsfw=[False] * len(files), files=[*files])
    return job.id


def test_csv_cells_that_a_spreadsheet_would_run_start_with_a_quote(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = tmp_path / "sygil.db"
    asyncio.run(_jobs(database, *((text, [None]) for text in HOSTILE)))
    out = tmp_path / "feedback.csv"
    assert _export_here(capsys, "--database", str(database), "--out", str(out))[0] == 0
    with out.open(encoding="utf-8", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["prompt"] for row in rows] == ["'" + text for text in HOSTILE]
    assert [row["negative_prompt"] for row in rows] == ["'" + text for text in HOSTILE]
    # What the export writes itself stays as it was: numbers read as numbers, honest text untouched.
    assert (rows[0]["seed"], rows[0]["votes_up"], rows[0]["votes_down"], rows[0]["guidance"]) == ("0", "0", "1", "7.0")
    assert (rows[0]["tags"], rows[0]["model"], rows[0]["kind"]) == ("species:seal", "tiny", "imagine")

    # JSONL keeps the exact text.
    jsonl = tmp_path / "feedback.jsonl"
    assert _export_here(capsys, "--database", str(database), "--out", str(jsonl))[0] == 0
    assert [json.loads(line)["prompt"] for line in jsonl.read_text("utf-8").splitlines()] == HOSTILE


def test_images_copies_only_regular_files_in_the_images_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    storage = tmp_path / "data"
    kept = storage / "images"
    kept.mkdir(parents=True)
    honest = _png((1, 2, 3))
    (kept / "honest.png").write_bytes(honest)
    secret = tmp_path / "secret.png"  # beside the data folder: what must never leave
    secret.write_text("the operator's secret")
    (kept / "link.png").symlink_to(secret)  # planted by whoever can write the data folder
    database = storage / "sygil.db"
    files = [str(kept / "honest.png"), str(kept / "link.png"), str(secret), str(kept / ".." / ".." / "secret.png")]
    [job] = asyncio.run(_jobs(database, ("species:seal", [*files])))

    folder, out = tmp_path / "export", tmp_path / "metadata.jsonl"
    with caplog.at_level(logging.WARNING, logger="bot.feedback"):
        status, lines = _export_here(capsys, "--database", str(database), "--out", str(out), "--images", str(folder))
    assert status == 0
    assert [json.loads(line)["file"] for line in out.read_text().splitlines()] == [f"{job}-0.png", None, None, None]
    assert sorted(path.name for path in folder.iterdir()) == [f"{job}-0.png"]
    assert (folder / f"{job}-0.png").read_bytes() == honest
    assert lines == [
        f"wrote 4 images to {out} (jsonl); copied 1 PNGs to {folder}, 3 refused: not a regular file in the images "
        "folder (see the warnings)"
    ]
    assert [record.getMessage() for record in caplog.records] == [
        f"image {job}-1 not copied: {str(kept / 'link.png')!r} is a symbolic link",
        f"image {job}-2 not copied: its file {files[2]!r} lies outside {kept}",
        f"image {job}-3 not copied: its file {files[3]!r} lies outside {kept}",
    ]


def test_a_link_planted_where_a_part_file_goes_is_not_written_through(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(honest := _png((4, 5, 6)))
    database = tmp_path / "sygil.db"
    [job] = asyncio.run(_jobs(database, ("species:seal", [str(tmp_path / "images" / "a.png")])))
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out, folder = tmp_path / "feedback.jsonl", tmp_path / "export"
    folder.mkdir()
    (tmp_path / "feedback.jsonl.part").symlink_to(victim)
    (folder / f"{job}-0.png.part").symlink_to(victim)

    def cross_device(source: object, target: object) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)  # copied, through its .part file
    status, _ = _export_here(capsys, "--database", str(database), "--out", str(out), "--images", str(folder))
    assert status == 0
    assert victim.read_text() == "keep me"
    assert not out.is_symlink() and json.loads(out.read_text())["file"] == f"{job}-0.png"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600  # the export is readable by its user only
    copy = folder / f"{job}-0.png"
    assert not copy.is_symlink() and copy.read_bytes() == honest
    assert sorted(path.name for path in folder.iterdir()) == [f"{job}-0.png"]
