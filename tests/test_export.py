"""`sygil-bot export-feedback`: one record per image with its votes and exactly what made it, as JSONL, CSV or
Parquet, with the kept PNGs."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import pty
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bot.__main__ import main
from bot.engine.types import Settings
from bot.feedback import FIELDS, ProgressBar, parquet_schema
from bot.jobs import JobKind
from bot.storage import Database, Provenance
from bot.storage.database import migrations
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


async def test_the_count_for_the_progress_bar_matches_the_export(tmp_path: Path) -> None:
    database = tmp_path / "sygil.db"
    await _database(database)
    async with await Database.open(database) as db:
        choices: list[dict[str, Any]] = [
            {},
            {"min_votes": 1},
            {"revision": "sha256:new"},
            {"since": 4e9},
            {"until": 4e9},
        ]
        for filters in choices:
            exported = [row async for row in db.feedback(**filters)]
            assert await db.feedback_count(**filters) == len(exported), filters


def test_bad_arguments_are_one_line(tmp_path: Path) -> None:
    missing = _export("--database", str(tmp_path / "missing.db"), "--out", str(tmp_path / "x.jsonl"))
    assert missing.returncode == 2 and "no database at" in missing.stderr and "Traceback" not in missing.stderr
    bad_date = _export("--database", str(tmp_path / "x.db"), "--out", "x.jsonl", "--since", "yesterday")
    assert bad_date.returncode == 2 and "not a date like 2026-11-30" in bad_date.stderr


def _export_here(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    """Run export-feedback in this process; return its status and the lines on standard error."""
    status = main(["export-feedback", *args])
    return status, capsys.readouterr().err.splitlines()


def _older_database(path: Path, version: int) -> None:
    """Write the database an older bot made: the migrations up to ``version`` only."""
    with sqlite3.connect(path) as raw:
        for number, sql in migrations()[:version]:
            raw.executescript(f"BEGIN; {sql}; PRAGMA user_version = {number}; COMMIT;")
    raw.close()


def test_wrong_filters_and_a_folder_for_out_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    database = tmp_path / "sygil.db"
    asyncio.run(_database(database))
    out = ["--database", str(database), "--out", str(tmp_path / "x.jsonl")]
    assert _export_here(capsys, *out, "--min-votes", "-1") == (
        2,
        ["sygil-bot: --min-votes must be 0 or more, got -1"],
    )
    for since, until in [("2026-02-01", "2026-01-01"), ("2026-01-01", "2026-01-01")]:
        assert _export_here(capsys, *out, "--since", since, "--until", until) == (
            2,
            [f"sygil-bot: --since {since} must be before --until {until} (--since is included, --until is not)"],
        )
    assert _export_here(capsys, "--database", str(database), "--out", str(tmp_path)) == (
        2,
        [f"sygil-bot: --out {tmp_path} is a folder: name a file, like {tmp_path / 'votes.jsonl'}"],
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["sygil.db"]


def test_an_export_reads_an_older_database_without_upgrading_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database, out = tmp_path / "sygil.db", tmp_path / "feedback.jsonl"
    _older_database(database, 3)  # the first version with what the export reads
    before = database.read_bytes()
    assert _export_here(capsys, "--database", str(database), "--out", str(out)) == (
        0,
        [f"wrote 0 images to {out} (jsonl)"],
    )
    assert database.read_bytes() == before
    _older_database(older := tmp_path / "older.db", 2)
    before = older.read_bytes()
    assert _export_here(capsys, "--database", str(older), "--out", str(out)) == (
        1,
        [
            "sygil-bot: The database is at version 2, from an older sygil-bot; the export reads version 3 or later "
            "and never upgrades a database itself: start this sygil-bot on it once (it upgrades the database as it "
            "starts), then export again"
        ],
    )
    assert older.read_bytes() == before


def test_an_export_refuses_a_newer_database_or_another_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    newer, out = tmp_path / "newer.db", tmp_path / "feedback.jsonl"
    _older_database(newer, len(migrations()))
    with sqlite3.connect(newer) as raw:
        raw.execute(f"PRAGMA user_version = {len(migrations()) + 1}")
    raw.close()
    before = newer.read_bytes()
    status, lines = _export_here(capsys, "--database", str(newer), "--out", str(out))
    assert status == 1 and len(lines) == 1
    assert lines[0].startswith(f"sygil-bot: {newer} was made by a newer sygil-bot") and "upgrade" in lines[0]
    assert newer.read_bytes() == before
    other = tmp_path / "votes.csv"
    other.write_text("job,votes\n1,3\n" * 20)
    assert _export_here(capsys, "--database", str(other), "--out", str(out)) == (
        2,
        [f"sygil-bot: --database: {other} is not an SQLite database: name the bot's database file"],
    )
    assert not out.exists()


async def test_parquet_holds_the_same_records_typed(tmp_path: Path) -> None:
    database = tmp_path / "sygil.db"
    await _database(database)
    assert _export("--database", str(database), "--out", str(tmp_path / "feedback.jsonl")).returncode == 0
    records = [json.loads(line) for line in (tmp_path / "feedback.jsonl").read_text().splitlines()]
    result = _export("--database", str(database), "--out", str(tmp_path / "feedback.parquet"))
    assert result.returncode == 0, result.stderr
    assert "wrote 3 images" in result.stderr and "(parquet)" in result.stderr
    table = pq.read_table(tmp_path / "feedback.parquet")
    assert table.schema.equals(parquet_schema())
    assert table.to_pylist() == records
    tags = table.schema.field("tags").type
    assert pa.types.is_list(tags) and tags.value_type == pa.string()
    assert not table.schema.field("seed").nullable and table.schema.field("model_revision").nullable

    named = tmp_path / "feedback.data"
    assert _export("--database", str(database), "--out", str(named), "--format", "parquet").returncode == 0
    assert pq.read_table(named).num_rows == 3


def test_parquet_without_pyarrow_says_how_to_install(tmp_path: Path) -> None:
    # A pyarrow that cannot be imported, ahead of the real one on the path: what a machine without the extra sees.
    blocker = tmp_path / "no-pyarrow" / "pyarrow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError(\"No module named 'pyarrow'\")\n")
    path = os.pathsep.join(filter(None, [str(blocker.parent), os.environ.get("PYTHONPATH")]))
    out = tmp_path / "feedback.parquet"
    database = tmp_path / "sygil.db"
    asyncio.run(_database(database))
    result = sygil("export-feedback", "--database", str(database), "--out", str(out), env={"PYTHONPATH": path})
    assert result.returncode == 2
    install = 'pip install -e ".[export]" in the sygil-bot checkout'  # not on PyPI: `pip install sygil-bot` fails
    assert result.stderr.splitlines() == [f"sygil-bot: Parquet needs pyarrow: {install}"]
    assert not out.exists()
    # JSONL and CSV do not need it.
    jsonl = sygil(
        "export-feedback", "--database", str(database), "--out", str(tmp_path / "f.jsonl"), env={"PYTHONPATH": path}
    )
    assert jsonl.returncode == 0, jsonl.stderr


def test_parquet_to_standard_output_is_refused(tmp_path: Path) -> None:
    database = tmp_path / "sygil.db"
    asyncio.run(_database(database))
    result = _export("--database", str(database), "--out", "-", "--format", "parquet")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "sygil-bot: Parquet needs a file, not standard output: give --out FILE.parquet"
    ]


def _png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


async def test_images_puts_each_kept_png_beside_its_record(tmp_path: Path) -> None:
    """Kept PNGs are copied (found where the row says, or by name beside the database); the rest are counted."""
    storage = tmp_path / "data"
    kept = storage / "images"
    kept.mkdir(parents=True)
    pngs = {name: _png(color) for name, color in (("a", (255, 0, 0)), ("b", (0, 255, 0)), ("d", (0, 0, 255)))}
    for name, data in pngs.items():
        (kept / f"{name}.png").write_bytes(data)
    database = storage / "sygil.db"
    settings = Settings(steps=4, width=64, height=64)
    async with await Database.open(database) as db:
        job = await db.create_job(
            kind=JobKind.IMAGINE, user_id=1, guild_id=2, channel_id=3, prompt="species:seal", negative_prompt="",
            seed=1, count=4, settings=settings, model="tiny", scheduler="dpm++",
        )  # fmt: skip
        # Where the bot wrote them: an absolute path; a path relative to a bot run from elsewhere; none (keep_images
        # was off); a file since removed.
        files = [str(kept / "a.png"), "elsewhere/images/b.png", None, str(kept / "gone.png")]
        await db.record_images(job_id=job.id, seeds=[1, 2, 3, 4], nsfw=[False] * 4, files=files)
        deleted = await db.create_job(
            kind=JobKind.IMAGINE, user_id=1, guild_id=2, channel_id=3, prompt="species:seal", negative_prompt="",
            seed=5, count=1, settings=settings, model="tiny", scheduler="dpm++",
        )  # fmt: skip
        await db.record_images(job_id=deleted.id, seeds=[5], nsfw=[False], files=[str(kept / "d.png")])
        await db.delete_images(job_id=deleted.id)

    folder = tmp_path / "export" / "images"
    out = tmp_path / "export" / "metadata.jsonl"
    out.parent.mkdir()
    for _ in range(2):  # again into the same folder: the files are replaced
        result = _export("--database", str(database), "--out", str(out), "--images", str(folder))
        assert result.returncode == 0, result.stderr
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert [item["file"] for item in records] == [f"{job.id}-0.png", f"{job.id}-1.png", None, None, None]
        assert (folder / f"{job.id}-0.png").read_bytes() == pngs["a"]
        assert (folder / f"{job.id}-1.png").read_bytes() == pngs["b"]
        assert sorted(path.name for path in folder.iterdir()) == [f"{job.id}-0.png", f"{job.id}-1.png"]
        assert result.stderr.splitlines() == [
            f"wrote 5 images to {out} (jsonl); copied 2 PNGs to {folder}, 2 not kept (storage.keep_images was off,"
            " or the file is gone), 1 left out: deleted by their requester"
        ]
    assert (kept / "a.png").read_bytes() == pngs["a"]  # the originals are untouched
    assert (folder / f"{job.id}-0.png").stat().st_ino == (kept / "a.png").stat().st_ino  # one file system: a link

    table = tmp_path / "export" / "metadata.parquet"
    assert _export("--database", str(database), "--out", str(table), "--images", str(folder)).returncode == 0
    assert pq.read_table(table).column("file").to_pylist() == [f"{job.id}-0.png", f"{job.id}-1.png", None, None, None]
    # Without --images the record keeps the path the bot wrote.
    assert _export("--database", str(database), "--out", str(out)).returncode == 0
    assert [json.loads(line)["file"] for line in out.read_text().splitlines()][:3] == files[:3]


async def test_images_are_copied_where_they_cannot_be_linked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bot.feedback import export

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(_png((1, 2, 3)))
    database = tmp_path / "sygil.db"

    def cross_device(source: object, target: object) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    async with await Database.open(database) as db:
        job = await db.create_job(
            kind=JobKind.IMAGINE, user_id=1, guild_id=2, channel_id=3, prompt="species:seal", negative_prompt="",
            seed=1, count=1, settings=Settings(steps=4, width=64, height=64), model="tiny", scheduler="dpm++",
        )  # fmt: skip
        await db.record_images(job_id=job.id, seeds=[1], nsfw=[False], files=[str(tmp_path / "images" / "a.png")])
        exported = await export(db, io.StringIO(), images=tmp_path / "out", storage=tmp_path)
    assert (exported.images, exported.copied, exported.not_kept) == (1, 1, 0)
    copy = tmp_path / "out" / f"{job.id}-0.png"
    assert copy.read_bytes() == (tmp_path / "images" / "a.png").read_bytes()
    assert copy.stat().st_ino != (tmp_path / "images" / "a.png").stat().st_ino


def test_piped_there_is_no_progress_and_on_a_terminal_a_bar(tmp_path: Path) -> None:
    database = tmp_path / "sygil.db"
    asyncio.run(_database(database))
    out = tmp_path / "feedback.csv"
    piped = _export("--database", str(database), "--out", str(out))
    assert piped.stderr.splitlines() == [f"wrote 3 images to {out} (csv)"]
    with out.open(encoding="utf-8", newline="") as file:
        assert tuple(next(csv.reader(file))) == FIELDS

    # stderr on a pseudo-terminal, as when run by hand.
    controller, terminal = pty.openpty()
    environ = {k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"} | {"HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "bot", "export-feedback", "--database", str(database), "--out", str(out)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=terminal, env=environ,
    )  # fmt: skip
    os.close(terminal)
    shown = b""
    while True:
        try:
            data = os.read(controller, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        shown += data
    os.close(controller)
    assert process.wait(timeout=60) == 0
    text = shown.decode()
    assert "\r[" + "#" * 30 + "] 100% 3/3 images" in text
    assert text.rstrip().endswith(f"wrote 3 images to {out} (csv)")

    stream = io.StringIO()
    bar = ProgressBar(stream)
    bar(250, 1000)
    bar.close()
    assert stream.getvalue().startswith("\r[" + "#" * 8 + "-" * 22 + "]  25% 250/1,000 images, ")
    assert stream.getvalue().endswith("/s\n")


async def test_export_runs_beside_a_writer_holding_a_transaction(tmp_path: Path) -> None:
    """The bot keeps its connection open and writes while an export reads: WAL lets both go on."""
    database = tmp_path / "sygil.db"
    await _database(database)
    writer = sqlite3.connect(database, isolation_level=None)
    try:
        assert writer.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        writer.execute("BEGIN IMMEDIATE")
        writer.execute(
            "INSERT INTO jobs (kind, user_id, guild_id, channel_id, prompt, seed, count, steps, guidance, width,"
            " height, mode, strength, model, scheduler, created_at) VALUES ('imagine', 1, 2, 3, 'species:otter', 1, 1,"
            " 4, 7.0, 64, 64, 'txt2img', 0.6, 'tiny', 'dpm++', 0)"
        )
        job_id = writer.execute("SELECT last_insert_rowid()").fetchone()[0]
        writer.execute("INSERT INTO images (job_id, idx, seed, created_at) VALUES (?, 0, 1, 1)", (job_id,))
        during = _export("--database", str(database), "--out", str(tmp_path / "during.jsonl"))
        assert during.returncode == 0, during.stderr
        assert "wrote 3 images" in during.stderr  # the snapshot before the open transaction
        writer.execute("COMMIT")
    finally:
        writer.close()
    after = _export("--database", str(database), "--out", str(tmp_path / "after.jsonl"))
    assert "wrote 4 images" in after.stderr


class _Discard:
    """A text sink that keeps nothing, so only the export's own memory is measured."""

    def write(self, text: str) -> int:
        return len(text)


@pytest.fixture(scope="module")
def bulk(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Databases of 10,000 and 100,000 images, built once for the memory tests."""
    folder = tmp_path_factory.mktemp("bulk")
    databases = {images: folder / f"sygil-{images}.db" for images in (10_000, 100_000)}
    for images, path in databases.items():
        asyncio.run(bulk_database(path, images))
    return databases


# The command line, then its peak resident memory (Python, SQLite and Arrow alike) in KiB on stdout. Read from
# /proc/self/status because the kernel's ru_maxrss for a child also counts the memory of this test process, which
# subprocess's vfork shares until the exec.
_MEASURED = """
import sys
from bot.__main__ import main
status = main(sys.argv[1:])
with open("/proc/self/status") as file:
    print(next(line.split()[1] for line in file if line.startswith("VmHWM:")))
sys.exit(status)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak memory from /proc (Linux)")
@pytest.mark.parametrize("format", ["jsonl", "csv", "parquet"])
def test_export_streams_its_peak_memory_does_not_grow_with_the_rows(
    bulk: dict[int, Path], tmp_path: Path, format: str
) -> None:
    """The whole process's peak, by the kernel: ten times the images, the same memory; and the files are valid."""
    peaks: dict[int, int] = {}
    for images, database in bulk.items():
        out = tmp_path / f"feedback-{images}.{format}"
        environ = {k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"} | {"HF_HUB_OFFLINE": "1"}
        command = [sys.executable, "-c", _MEASURED, "export-feedback", "--database", str(database), "--out", str(out)]
        result = subprocess.run(command, capture_output=True, text=True, env=environ, timeout=300, check=False)
        assert result.returncode == 0, result.stderr
        assert result.stderr.splitlines() == [f"wrote {images} images to {out} ({format})"]
        peaks[images] = int(result.stdout) * 1024
    print(f"{format}: peak RSS {peaks[10_000] / 2**20:.1f} MiB for 10,000 images, {peaks[100_000] / 2**20:.1f} MiB"
          " for 100,000")  # fmt: skip
    # Holding the rows would take hundreds of MiB more for 100,000 images; allow noise, not growth.
    assert peaks[100_000] < peaks[10_000] + 16 * 2**20, peaks

    # Read back as they were written, a record at a time.
    out = tmp_path / f"feedback-100000.{format}"
    if format == "jsonl":
        count, last = 0, {}
        with out.open(encoding="utf-8") as file:
            for line in file:
                last = json.loads(line)
                count += 1
        assert count == 100_000 and tuple(last) == FIELDS
        assert last["tags"] == ["species:seal"] and last["votes_up"] + last["votes_down"] == 2
    elif format == "csv":
        with out.open(encoding="utf-8", newline="") as file:
            reader = csv.reader(file)
            assert tuple(next(reader)) == FIELDS
            assert sum(1 for row in reader if len(row) == len(FIELDS)) == 100_000
    else:
        parquet = pq.ParquetFile(out)
        assert parquet.metadata.num_rows == 100_000 and parquet.num_row_groups == 20  # 5,000 images each
        assert parquet.schema_arrow.equals(parquet_schema())
        assert parquet.read_row_group(19, columns=["tags"]).column("tags")[-1].as_py() == ["species:seal"]


@pytest.mark.slow
async def test_export_streams_its_python_memory_does_not_grow_with_the_rows(bulk: dict[int, Path]) -> None:
    """The Python allocations alone, by tracemalloc (slow to trace, so one format)."""
    import tracemalloc

    from bot.feedback import export

    peaks: dict[int, int] = {}
    for images, database in bulk.items():
        async with await Database.open(database) as db:
            sink = _Discard()
            tracemalloc.start()
            exported = await export(db, sink)  # type: ignore[arg-type]
            peaks[images] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert exported.images == images
    print(f"jsonl: peak Python allocations {peaks[10_000] / 2**20:.2f} MiB for 10,000 images,"
          f" {peaks[100_000] / 2**20:.2f} MiB for 100,000")  # fmt: skip
    # Ten times the rows: the same chunk of rows in memory at a time (allow noise, not growth).
    assert peaks[100_000] < peaks[10_000] * 1.5 + 1_000_000, peaks
