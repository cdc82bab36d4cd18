from __future__ import annotations

import dataclasses
import os
import sqlite3
import stat
from pathlib import Path

import aiosqlite
import pytest

from bot.engine.types import Mode, Settings
from bot.errors import DatabaseVersionError, StorageError
from bot.jobs import JobKind, JobStatus
from bot.storage import Database
from bot.storage.database import migrations

SETTINGS = Settings(steps=20, guidance=6.5, width=64, height=96)


async def make_job(db: Database, *, user_id: int = 1, count: int = 2, seed: int = 7):
    return await db.create_job(
        kind=JobKind.IMAGINE,
        user_id=user_id,
        guild_id=10,
        channel_id=20,
        prompt="species:seal",
        negative_prompt="blurry",
        seed=seed,
        count=count,
        settings=SETTINGS,
        model="tiny",
        scheduler="dpm++",
    )


async def test_file_is_created_in_wal_mode_and_migrated(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "sygil.db"
    async with await Database.open(path) as db:
        assert await db.schema_version() == len(migrations())
    async with aiosqlite.connect(path) as raw:
        async with raw.execute("PRAGMA journal_mode") as cursor:
            assert (await cursor.fetchone()) == ("wal",)
        async with raw.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name") as cursor:
            tables = [row[0] for row in await cursor.fetchall()]
    assert {"jobs", "images", "votes"} <= set(tables)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


async def test_a_new_database_and_its_folders_are_for_this_user_only(tmp_path: Path) -> None:
    path = tmp_path / "data" / "bot" / "sygil.db"
    async with await Database.open(path) as db:
        await make_job(db)  # a write: the -wal and -shm files exist while it is open
        files = [path, path.with_name("sygil.db-wal"), path.with_name("sygil.db-shm")]
        assert [mode(file) for file in files] == [0o600] * 3
    assert mode(tmp_path / "data") == mode(path.parent) == 0o700


def older_database(path: Path, version: int) -> None:
    """Write the database an older bot made: the migrations up to ``version`` only."""
    with sqlite3.connect(path) as raw:
        for number, sql in migrations()[:version]:
            raw.executescript(f"BEGIN; {sql}; PRAGMA user_version = {number}; COMMIT;")
    raw.close()


async def test_a_database_made_by_a_newer_bot_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "sygil.db"
    newer = len(migrations()) + 1
    older_database(path, len(migrations()))
    with sqlite3.connect(path) as raw:
        raw.execute(f"PRAGMA user_version = {newer}")
    raw.close()
    before = path.read_bytes()
    for opening in (Database.open, Database.open_readonly):
        with pytest.raises(DatabaseVersionError) as refused:
            await opening(path)
        assert str(refused.value) == (
            f"{path} was made by a newer sygil-bot (database version {newer}; this one knows up to "
            f"{len(migrations())}): upgrade sygil-bot to use it, or set storage.path to another file"
        )
    assert path.read_bytes() == before


async def test_a_read_only_open_changes_nothing_not_even_an_older_database(tmp_path: Path) -> None:
    path = tmp_path / "sygil.db"
    older_database(path, 3)
    before = path.read_bytes()
    async with await Database.open_readonly(path) as db:
        assert await db.schema_version() == 3
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            await db.set_reply_message(job_id=1, message_id=2)  # a write a database of version 3 knows
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("not-sqlite", "storage.path: {path} is not an SQLite database: name the bot's database file"),
        ("folder", "storage.path: {path} is a folder: name the database file, like {path}/sygil.db"),
        ("under-a-file", "storage.path: cannot create the database {path}: {path.parent}: not a folder. Name a file"),
    ],
)
async def test_a_database_path_that_cannot_be_used_is_one_line(tmp_path: Path, where: str, message: str) -> None:
    path = tmp_path / "sygil.db"
    if where == "not-sqlite":
        path.write_text("name,votes\nseal,3\n" * 20)
    elif where == "folder":
        path.mkdir()
    else:
        (tmp_path / "file").write_text("")
        path = tmp_path / "file" / "sygil.db"
    with pytest.raises(StorageError) as refused:
        await Database.open(path)
    assert str(refused.value).startswith(message.format(path=path))
    assert "\n" not in str(refused.value)


async def test_reopening_keeps_data_and_does_not_migrate_twice(tmp_path: Path) -> None:
    path = tmp_path / "sygil.db"
    async with await Database.open(path) as db:
        job = await make_job(db)
    async with await Database.open(path) as db:
        again = await db.get_job(job_id=job.id)
        assert again == job
        assert await db.migrate() == len(migrations())


async def test_job_lifecycle(tmp_path: Path) -> None:
    async with await Database.open(tmp_path / "sygil.db") as db:
        job = await make_job(db)
        assert job.status is JobStatus.QUEUED
        assert job.settings == SETTINGS
        assert job.negative_prompt == "blurry"
        assert [j.id for j in await db.unfinished_jobs()] == [job.id]
        await db.mark_started(job_id=job.id)
        running = await db.get_job(job_id=job.id)
        assert running is not None and running.status is JobStatus.RUNNING and running.started_at is not None
        await db.record_images(job_id=job.id, seeds=[7, 8], nsfw=[False, True])
        await db.complete_job(job_id=job.id, message_id=555)
        done = await db.get_job(job_id=job.id)
        assert done is not None and done.status is JobStatus.DONE and done.finished_at is not None
        assert done.message_id == 555
        assert await db.unfinished_jobs() == []
        image = await db.get_image(job_id=job.id, index=1)
        assert image is not None and image.seed == 8 and image.nsfw
        assert await db.get_image(job_id=job.id, index=2) is None


async def test_failed_jobs_are_not_unfinished(tmp_path: Path) -> None:
    async with await Database.open(tmp_path / "sygil.db") as db:
        job = await make_job(db)
        assert await db.end_job(job_id=job.id, error="boom")
        stored = await db.get_job(job_id=job.id)
        assert stored is not None and stored.status is JobStatus.FAILED and stored.error == "boom"
        assert await db.unfinished_jobs() == []
        # An ended job stays ended.
        assert not await db.end_job(job_id=job.id, error="again", status=JobStatus.CANCELLED)


async def test_votes_change_and_withdraw(tmp_path: Path) -> None:
    path = tmp_path / "sygil.db"
    async with await Database.open(path) as db:
        job = await make_job(db)
        await db.record_images(job_id=job.id, seeds=[7, 8], nsfw=[False, False])
        tally = await db.record_vote(job_id=job.id, index=0, user_id=100, vote=1)
        assert (tally.up, tally.down, tally.mine) == (1, 0, 1)
        tally = await db.record_vote(job_id=job.id, index=0, user_id=101, vote=1)
        assert (tally.up, tally.down) == (2, 0)
        tally = await db.record_vote(job_id=job.id, index=0, user_id=100, vote=-1)
        assert (tally.up, tally.down, tally.mine) == (1, 1, -1)
        tally = await db.record_vote(job_id=job.id, index=0, user_id=100, vote=-1)
        assert (tally.up, tally.down, tally.mine) == (1, 0, 0)
        other = await db.vote_tally(job_id=job.id, index=1)
        assert (other.up, other.down) == (0, 0)
    async with await Database.open(path) as db:
        tally = await db.vote_tally(job_id=job.id, index=0, user_id=101)
        assert (tally.up, tally.down, tally.mine) == (1, 0, 1)


async def test_vote_on_missing_image_is_refused(tmp_path: Path) -> None:
    async with await Database.open(tmp_path / "sygil.db") as db:
        job = await make_job(db)
        with pytest.raises(aiosqlite.IntegrityError):
            await db.record_vote(job_id=job.id, index=0, user_id=1, vote=1)
        with pytest.raises(ValueError, match="vote must be -1 or 1"):
            await db.record_vote(job_id=job.id, index=0, user_id=1, vote=2)
        # The failed transaction left the connection usable.
        assert (await db.vote_tally(job_id=job.id, index=0)).up == 0


async def test_img2img_settings_round_trip(tmp_path: Path) -> None:
    async with await Database.open(tmp_path / "sygil.db") as db:
        settings = Settings(steps=10, width=64, height=64, mode=Mode.IMG2IMG, strength=0.4)
        job = await db.create_job(
            kind=JobKind.VARIATION,
            user_id=1,
            guild_id=None,
            channel_id=2,
            prompt="p",
            negative_prompt="",
            seed=1,
            count=1,
            settings=settings,
            model="m",
            scheduler="ddim",
            parent_job_id=None,
            parent_index=None,
        )
        assert job.settings == settings and job.kind is JobKind.VARIATION and job.guild_id is None


_OLD_JOB = (
    "INSERT INTO jobs (id, kind, parent_job_id, parent_index, user_id, guild_id, channel_id, prompt, seed, count,"
    " steps, guidance, width, height, mode, strength, model, scheduler, status, created_at, reply_token, revision)"
    " VALUES (?, ?, ?, ?, 1, 10, 20, 'species:seal', 7, ?, 20, 6.5, 64, 96, ?, 0.6, 'tiny', 'dpm++', 'done', ?, ?, ?)"
)


def _rows(raw: sqlite3.Connection) -> dict[str, list[tuple[object, ...]]]:
    tables = ("jobs", "images", "votes", "job_tags", "job_inputs", "arena_pairs", "arena_votes")
    return {table: raw.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall() for table in tables}


def _schema(raw: sqlite3.Connection) -> set[tuple[str, str, str]]:
    return set(raw.execute("SELECT type, name, tbl_name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"))


async def test_migration_8_rebuilds_jobs_for_upscales_keeping_every_row_index_trigger_and_foreign_key(
    tmp_path: Path,
) -> None:
    path = tmp_path / "sygil.db"
    older_database(path, 7)  # what the bot wrote before upscales
    with sqlite3.connect(path) as raw:
        raw.execute("PRAGMA foreign_keys = ON")
        raw.execute(_OLD_JOB, (1, "imagine", None, None, 2, "txt2img", 100.0, "token", None))
        raw.execute(_OLD_JOB, (2, "variation", 1, 1, 1, "img2img", 200.0, None, "refs/pr/4"))
        raw.executemany(
            "INSERT INTO images (job_id, idx, seed, created_at) VALUES (?, ?, ?, 300)",
            [(1, 0, 7), (1, 1, 8), (2, 0, 9)],
        )
        raw.execute("INSERT INTO votes (job_id, idx, user_id, vote, updated_at) VALUES (1, 1, 5, 1, 400)")
        raw.executemany("INSERT INTO job_tags (job_id, namespace, tag) VALUES (?, 'species', 'seal')", [(1,), (2,)])
        raw.execute("INSERT INTO job_inputs (job_id, init_image) VALUES (2, x'89504e47')")
        raw.execute(
            "INSERT INTO arena_pairs (id, guild_id, channel_id, requester_id, left_job_id, left_index, left_revision,"
            " right_job_id, right_index, right_revision, created_at) VALUES (1, 10, 20, 1, 1, 0, 'a', 2, 0, 'b', 500)"
        )
        raw.execute("INSERT INTO arena_votes (pair_id, user_id, choice, voted_at) VALUES (1, 5, 'left', 600)")
        before, schema = _rows(raw), _schema(raw)
    raw.close()
    assert before["images"][1][-2:] == (1, 0) and before["job_tags"][0][-3:] == (1, 0, 1)  # votes counted by triggers

    async with await Database.open(path) as db:
        assert await db.schema_version() == 8
        upscale = await db.create_job(
            kind=JobKind.UPSCALE,
            user_id=1,
            guild_id=10,
            channel_id=20,
            prompt="species:seal",
            negative_prompt="",
            seed=8,
            count=1,
            settings=Settings(steps=20, guidance=6.5, width=128, height=192, mode=Mode.IMG2IMG, strength=0.35),
            model="tiny",
            scheduler="dpm++",
            parent_job_id=1,
            parent_index=1,
            init_image=b"\x89PNG",
            tags=[("species", "seal")],
        )
        await db.record_images(job_id=upscale.id, seeds=[8], nsfw=[False])
        assert (await db.get_job(job_id=upscale.id)) == dataclasses.replace(upscale, status=JobStatus.QUEUED)
        [image] = await db.job_images(job_id=upscale.id)
        assert (image.seed, upscale.kind) == (8, JobKind.UPSCALE)
        # Foreign keys are enforced again on the bot's connection once migrated.
        with pytest.raises(sqlite3.IntegrityError):
            await make_job_with_parent(db, parent_job_id=999)

    with sqlite3.connect(path) as raw:
        after = _rows(raw)
        assert {table: rows[: len(before[table])] for table, rows in after.items()} == before
        assert _schema(raw) == schema  # every index and trigger is back, nothing left over
        assert raw.execute("SELECT guild_id, user_id FROM images WHERE job_id = 3").fetchall() == [(10, 1)]
        assert raw.execute("PRAGMA foreign_key_check").fetchall() == []
        assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        # The rebuilt table still cascades to its images, inputs, tags and their arena pairs.
        raw.execute("PRAGMA foreign_keys = ON")
        raw.execute("DELETE FROM jobs WHERE id = 3")
        raw.execute("DELETE FROM jobs WHERE id = 2")
        assert raw.execute("SELECT job_id FROM images ORDER BY 1").fetchall() == [(1,), (1,)]
        assert raw.execute("SELECT COUNT(*) FROM job_inputs").fetchall() == [(0,)]
        assert raw.execute("SELECT COUNT(*) FROM arena_pairs").fetchall() == [(0,)]
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            raw.execute(_OLD_JOB, (9, "zoom", None, None, 1, "txt2img", 1.0, None, None))
    raw.close()


async def make_job_with_parent(db: Database, *, parent_job_id: int) -> None:
    await db.create_job(
        kind=JobKind.REROLL,
        user_id=1,
        guild_id=10,
        channel_id=20,
        prompt="species:seal",
        negative_prompt="",
        seed=1,
        count=1,
        settings=SETTINGS,
        model="tiny",
        scheduler="dpm++",
        parent_job_id=parent_job_id,
        parent_index=0,
    )


async def test_a_migration_that_would_leave_a_dangling_foreign_key_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "sygil.db"
    older_database(path, 7)
    with sqlite3.connect(path) as raw:
        # Written with foreign keys off (as a hand-edited or damaged file might be): job 1's parent does not exist.
        raw.execute(_OLD_JOB, (1, "reroll", 42, 0, 1, "txt2img", 100.0, None, None))
    raw.close()
    with pytest.raises(StorageError, match="migration 0008 stopped, nothing changed: rows of the database refer to"):
        await Database.open(path)
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchall() == [(7,)]
        assert "'upscale'" not in raw.execute("SELECT sql FROM sqlite_master WHERE name = 'jobs'").fetchone()[0]
        assert raw.execute("SELECT id FROM jobs").fetchall() == [(1,)]
    raw.close()
