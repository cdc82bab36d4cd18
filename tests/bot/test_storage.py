from __future__ import annotations

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
