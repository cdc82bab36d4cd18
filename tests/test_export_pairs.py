"""`sygil-bot export-pairs`: the arena's counted votes as Pick-a-Pic preference pairs, in JSONL and Parquet, with
both PNGs of each pair; the stored votes come back from the rows."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from PIL import Image

from bot.__main__ import main
from bot.pairs import FIELDS, parquet_schema
from bot.storage import Database
from tests import _arena as plant
from tests.test_cli import sygil

DAY = 86_400.0
FIRST_DAY = 20_000 * DAY  # midnight UTC, 2024-10-04
LABELS = {(1.0, 0.0): "left", (0.0, 1.0): "right", (0.5, 0.5): "tie"}


def _png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


async def _plant(storage: Path) -> dict[str, Any]:
    """Two pairs with kept PNGs and votes of every kind; member 7 votes three times in a day against a cap of two."""
    kept = storage / "images"
    kept.mkdir(parents=True)
    colors = {"p1": (255, 0, 0), "c1": (0, 255, 0), "c2": (0, 0, 255), "p2": (9, 9, 9)}
    for name, color in colors.items():
        (kept / f"{name}.png").write_bytes(_png(color))
    async with await Database.open(storage / "sygil.db") as db:
        first = await plant.pair(
            db, left="prod", right="cand", production="prod", prompt="species:seal, beach",
            files=(str(kept / "p1.png"), str(kept / "c1.png")),
        )  # fmt: skip
        second = await plant.pair(
            db, left="cand", right="prod", production="prod", prompt="studio:dc", tags=(("studio", "dc"),),
            files=(str(kept / "c2.png"), str(kept / "p2.png")),
        )  # fmt: skip
        cast = [
            (first.id, 5, "left", FIRST_DAY + 10),
            (first.id, 6, "right", FIRST_DAY + 20),
            (first.id, 8, "tie", FIRST_DAY + 30),
            (first.id, 9, "both_bad", FIRST_DAY + 40),  # left out: prefers neither
            (second.id, 5, "right", FIRST_DAY + DAY + 10),  # the next day
            (first.id, 7, "left", FIRST_DAY + 50),
            (second.id, 7, "right", FIRST_DAY + 60),
        ]
        for pair_id, member, choice, at in cast:
            await db.record_arena_vote(pair_id=pair_id, user_id=member, choice=choice, seconds=3.0, at=at)
        third = await plant.pair(db, left="cand", right="prod", production="prod")  # its PNGs were not kept
        # Member 7's third vote of the day, and member 6 changing theirs.
        await db.record_arena_vote(pair_id=third.id, user_id=7, choice="left", seconds=2.0, at=FIRST_DAY + 70)
        await db.record_arena_vote(pair_id=first.id, user_id=6, choice="left", seconds=4.0, at=FIRST_DAY + 80)
    return {"first": first, "second": second, "third": third, "kept": kept}


def _config(folder: Path, cap: int = 2) -> Path:
    config = folder / "config.toml"
    config.write_text(f'[storage]\npath = "sygil.db"\n[arena]\nmax_votes_per_day = {cap}\n')
    return config


def _export(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    status = main(["export-pairs", *args])
    return status, capsys.readouterr().err.splitlines()


def test_jsonl_round_trips_the_counted_votes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    planted = asyncio.run(_plant(tmp_path))
    first, second = planted["first"], planted["second"]
    out = tmp_path / "pairs.jsonl"
    status, err = _export(capsys, "--config", str(_config(tmp_path)), "--out", str(out))
    assert status == 0, err
    assert err == [f"wrote 6 pairs to {out} (jsonl); left out 1 'both bad' votes"]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(list(row) == list(FIELDS) for row in rows)
    # The stored votes come back: pair, member and choice from the labels; the changed vote as changed; the both
    # bad one and member 7's third vote of the day left out.
    votes = {(row["pair_id"], row["user_id"], LABELS[row["label_0"], row["label_1"]]) for row in rows}
    assert votes == {
        (first.id, 5, "left"),
        (first.id, 6, "left"),
        (first.id, 8, "tie"),
        (first.id, 7, "left"),
        (second.id, 7, "right"),
        (second.id, 5, "right"),
    }
    by_vote = {(row["pair_id"], row["user_id"]): row for row in rows}
    left_won, tie = by_vote[first.id, 5], by_vote[first.id, 8]
    image_0, image_1 = f"{first.left[0]}-0", f"{first.right[0]}-0"
    assert left_won["caption"] == "species:seal, beach" and left_won["tags"] == ["species:seal"]
    assert (left_won["image_0_uid"], left_won["image_1_uid"], left_won["best_image_uid"]) == (image_0, image_1, image_0)
    assert (left_won["model_0"], left_won["model_1"], left_won["seed_0"], left_won["seed_1"]) == ("prod", "cand", 7, 8)
    assert left_won["has_label"] and left_won["are_different"] and left_won["guild_id"] == 10
    assert (left_won["created_at"], left_won["seconds"], left_won["steps"], left_won["width"]) == (
        FIRST_DAY + 10,
        3.0,
        20,
        64,
    )
    assert (tie["label_0"], tie["label_1"], tie["best_image_uid"]) == (0.5, 0.5, None)
    right_won = by_vote[second.id, 5]
    assert (right_won["model_0"], right_won["model_1"], right_won["best_image_uid"]) == (
        "cand",
        "prod",
        f"{second.right[0]}-0",
    )
    assert right_won["image_0_file"] == str(planted["kept"] / "c2.png")  # without --images: the path the bot wrote
    assert [row["created_at"] for row in rows] == sorted(row["created_at"] for row in rows)  # oldest vote first

    # A higher cap counts member 7's third vote; filters by revision and time.
    status, err = _export(capsys, "--config", str(_config(tmp_path, cap=200)), "--out", str(out))
    assert status == 0 and err[0].startswith(f"wrote 7 pairs to {out}")
    status, err = _export(capsys, "--config", str(_config(tmp_path)), "--out", str(out), "--revision", "other")
    assert status == 0 and err[0].startswith("wrote 0 pairs")
    status, err = _export(capsys, "--config", str(_config(tmp_path)), "--out", str(out), "--since", "2024-10-05")
    assert status == 0 and err[0].startswith("wrote 1 pairs") and out.read_text().count("\n") == 1


def test_parquet_holds_the_same_rows_typed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(_plant(tmp_path))
    config = str(_config(tmp_path))
    assert _export(capsys, "--config", config, "--out", str(tmp_path / "pairs.jsonl"))[0] == 0
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    status, err = _export(capsys, "--config", config, "--out", str(tmp_path / "pairs.parquet"))
    assert status == 0 and "(parquet)" in err[0]
    table = pq.read_table(tmp_path / "pairs.parquet")
    assert table.schema.equals(parquet_schema())
    assert table.to_pylist() == rows
    assert table.schema.field("best_image_uid").nullable and not table.schema.field("label_0").nullable


def test_images_puts_both_pngs_of_each_pair_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    planted = asyncio.run(_plant(tmp_path))
    first, second = planted["first"], planted["second"]
    asyncio.run(_delete(tmp_path / "sygil.db", second.right[0]))
    folder = tmp_path / "export" / "images"
    out = tmp_path / "export" / "pairs.jsonl"
    out.parent.mkdir()
    status, err = _export(capsys, "--config", str(_config(tmp_path)), "--out", str(out), "--images", str(folder))
    assert status == 0
    assert err == [
        f"wrote 6 pairs to {out} (jsonl); left out 1 'both bad' votes; copied 3 PNGs to {folder}, 1 left out: "
        "deleted by their requester"
    ]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    files = {(row["image_0_uid"], row["image_0_file"]) for row in rows} | {
        (row["image_1_uid"], row["image_1_file"]) for row in rows
    }
    uid = {name: f"{job_id}-0" for name, job_id in (("p1", first.left[0]), ("c1", first.right[0]))}
    uid |= {"c2": f"{second.left[0]}-0", "p2": f"{second.right[0]}-0"}
    assert files == {
        (uid["p1"], f"{uid['p1']}.png"),
        (uid["c1"], f"{uid['c1']}.png"),
        (uid["c2"], f"{uid['c2']}.png"),
        (uid["p2"], None),  # deleted by its requester: the vote stays, the pixels do not go on
    }
    for name in ("p1", "c1", "c2"):
        assert (folder / f"{uid[name]}.png").read_bytes() == (planted["kept"] / f"{name}.png").read_bytes()
    assert sorted(path.name for path in folder.iterdir()) == sorted(f"{uid[name]}.png" for name in ("p1", "c1", "c2"))


async def _delete(database: Path, job_id: int) -> None:
    async with await Database.open(database) as db:
        await db.delete_images(job_id=job_id)


def test_bad_arguments_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(_plant(tmp_path))
    config = str(_config(tmp_path))
    status, err = _export(capsys, "--config", config, "--out", "-", "--format", "parquet")
    assert (status, err) == (2, ["sygil-bot: Parquet needs a file, not standard output: give --out FILE.parquet"])
    status, err = _export(capsys, "--config", config, "--out", "x", "--since", "2025-01-02", "--until", "2025-01-01")
    assert status == 2 and err[0].startswith("sygil-bot: --since 2025-01-02 must be before --until 2025-01-01")
    status, err = _export(capsys, "--database", str(tmp_path / "missing.db"), "--out", str(tmp_path / "x.jsonl"))
    assert status == 2 and err[0].startswith("sygil-bot: no database at")
    # Through the real entry point: argparse refuses a format the pairs export does not write.
    csv = sygil("export-pairs", "--config", config, "--out", str(tmp_path / "x.csv"), "--format", "csv")
    assert csv.returncode == 2 and "invalid choice: 'csv'" in csv.stderr and "Traceback" not in csv.stderr
