"""The one aiosqlite connection and every SQL statement the bot runs."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import re
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiosqlite

from bot.engine.types import Mode, Settings

log = logging.getLogger(__name__)

_MIGRATION_NAME = re.compile(r"(?P<number>\d{4})_[a-z0-9_]+\.sql")


class JobKind(enum.StrEnum):
    IMAGINE = "imagine"
    REROLL = "reroll"
    VARIATION = "variation"


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class Job:
    """A stored request and everything needed to render it again."""

    id: int
    kind: JobKind
    user_id: int
    guild_id: int | None
    channel_id: int
    prompt: str
    negative_prompt: str
    seed: int
    count: int
    settings: Settings
    model: str
    scheduler: str
    status: JobStatus
    parent_job_id: int | None
    parent_index: int | None
    message_id: int | None
    error: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None


@dataclass(frozen=True, slots=True)
class ImageRecord:
    job_id: int
    index: int
    seed: int
    nsfw: bool


@dataclass(frozen=True, slots=True)
class VoteTally:
    """The votes on one image after a change, and the voter's own vote (0 when withdrawn)."""

    up: int
    down: int
    mine: int


def migrations() -> list[tuple[int, str]]:
    """Return the numbered migration scripts shipped with the package, in order."""
    found: list[tuple[int, str]] = []
    for entry in resources.files("bot.storage").joinpath("migrations").iterdir():
        match = _MIGRATION_NAME.fullmatch(entry.name)
        if match:
            found.append((int(match["number"]), entry.read_text("utf-8")))
    found.sort()
    numbers = [number for number, _ in found]
    if numbers != list(range(1, len(numbers) + 1)):
        raise RuntimeError(f"migrations must be numbered 1..n without gaps, found {numbers}")
    return found


class Database:
    """SQLite storage for jobs, images and votes; use ``async with Database.open(path)``."""

    def __init__(self, connection: aiosqlite.Connection) -> None:
        self._db = connection
        # One connection serves every coroutine; explicit transactions must not interleave.
        self._transaction_lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncGenerator[None]:
        async with self._transaction_lock:
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                await self._db.execute("ROLLBACK")
                raise
            await self._db.execute("COMMIT")

    @classmethod
    async def open(cls, path: Path | str) -> Self:
        """Open (creating if needed) and migrate the database at ``path``."""
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        connection = await aiosqlite.connect(path, isolation_level=None)
        try:
            connection.row_factory = aiosqlite.Row
            await connection.execute("PRAGMA journal_mode = WAL")
            await connection.execute("PRAGMA foreign_keys = ON")
            await connection.execute("PRAGMA busy_timeout = 5000")
            database = cls(connection)
            await database.migrate()
        except BaseException:
            await connection.close()
            raise
        return database

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._db.close()

    async def schema_version(self) -> int:
        async with self._db.execute("PRAGMA user_version") as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def migrate(self) -> int:
        """Apply every migration numbered above ``PRAGMA user_version``, each in one transaction."""
        current = await self.schema_version()
        for number, sql in migrations():
            if number <= current:
                continue
            log.info("Applying database migration %04d", number)
            await self._db.executescript(f"BEGIN; {sql}; PRAGMA user_version = {number}; COMMIT;")
            current = number
        return current

    # Jobs

    async def create_job(
        self,
        *,
        kind: JobKind,
        user_id: int,
        guild_id: int | None,
        channel_id: int,
        prompt: str,
        negative_prompt: str,
        seed: int,
        count: int,
        settings: Settings,
        model: str,
        scheduler: str,
        parent_job_id: int | None = None,
        parent_index: int | None = None,
    ) -> Job:
        """Store a new queued job and return it."""
        cursor = await self._db.execute(
            """
            INSERT INTO jobs (kind, parent_job_id, parent_index, user_id, guild_id, channel_id, prompt,
                              negative_prompt, seed, count, steps, guidance, width, height, mode, strength,
                              model, scheduler, status, created_at)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?)
            """,
            (
                kind.value,
                parent_job_id,
                parent_index,
                user_id,
                guild_id,
                channel_id,
                prompt,
                negative_prompt,
                seed,
                count,
                settings.steps,
                settings.guidance,
                settings.width,
                settings.height,
                settings.mode.value,
                settings.strength,
                model,
                scheduler,
                time.time(),
            ),
        )
        job_id = cursor.lastrowid
        assert job_id is not None
        job = await self.get_job(job_id=job_id)
        assert job is not None
        return job

    async def get_job(self, *, job_id: int) -> Job | None:
        async with self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)) as cursor:
            row = await cursor.fetchone()
        return _job(row) if row else None

    async def unfinished_jobs(self) -> list[Job]:
        """Return jobs that were accepted but never finished (queued or running when the bot stopped), oldest first."""
        async with self._db.execute("SELECT * FROM jobs WHERE status IN ('queued', 'running') ORDER BY id") as cursor:
            rows = await cursor.fetchall()
        return [_job(row) for row in rows]

    async def mark_started(self, *, job_id: int) -> None:
        await self._db.execute(
            "UPDATE jobs SET status = 'running', started_at = ? WHERE id = ? AND status = 'queued'",
            (time.time(), job_id),
        )

    async def finish_job(self, *, job_id: int, seeds: list[int], nsfw: list[bool]) -> None:
        """Mark a job done and record its images, in one transaction."""
        now = time.time()
        async with self._transaction():
            await self._db.executemany(
                "INSERT OR REPLACE INTO images (job_id, idx, seed, nsfw) VALUES (?, ?, ?, ?)",
                [(job_id, index, seed, int(flag)) for index, (seed, flag) in enumerate(zip(seeds, nsfw, strict=True))],
            )
            await self._db.execute(
                "UPDATE jobs SET status = 'done', finished_at = ?, started_at = COALESCE(started_at, ?) WHERE id = ?",
                (now, now, job_id),
            )

    async def fail_job(self, *, job_id: int, error: str, status: JobStatus = JobStatus.FAILED) -> None:
        await self._db.execute(
            "UPDATE jobs SET status = ?, error = ?, finished_at = ? WHERE id = ?",
            (status.value, error, time.time(), job_id),
        )

    async def set_message(self, *, job_id: int, message_id: int) -> None:
        await self._db.execute("UPDATE jobs SET message_id = ? WHERE id = ?", (message_id, job_id))

    async def get_image(self, *, job_id: int, index: int) -> ImageRecord | None:
        async with self._db.execute(
            "SELECT job_id, idx, seed, nsfw FROM images WHERE job_id = ? AND idx = ?", (job_id, index)
        ) as cursor:
            row = await cursor.fetchone()
        return (
            ImageRecord(job_id=row["job_id"], index=row["idx"], seed=row["seed"], nsfw=bool(row["nsfw"]))
            if row
            else None
        )

    # Votes

    async def record_vote(self, *, job_id: int, index: int, user_id: int, vote: int) -> VoteTally:
        """Record a vote of +1 or -1; the same vote again withdraws it. Returns the new tally."""
        if vote not in (-1, 1):
            raise ValueError(f"vote must be -1 or 1, got {vote}")
        async with self._transaction():
            async with self._db.execute(
                "SELECT vote FROM votes WHERE job_id = ? AND idx = ? AND user_id = ?", (job_id, index, user_id)
            ) as cursor:
                row = await cursor.fetchone()
            if row is not None and row["vote"] == vote:
                await self._db.execute(
                    "DELETE FROM votes WHERE job_id = ? AND idx = ? AND user_id = ?", (job_id, index, user_id)
                )
                mine = 0
            else:
                await self._db.execute(
                    """
                    INSERT INTO votes (job_id, idx, user_id, vote, updated_at) VALUES (?, ?, ?, ?, ?)
                    ON CONFLICT (job_id, idx, user_id)
                    DO UPDATE SET vote = excluded.vote, updated_at = excluded.updated_at
                    """,
                    (job_id, index, user_id, vote, time.time()),
                )
                mine = vote
            tally = await self._tally(job_id=job_id, index=index)
        return VoteTally(up=tally[0], down=tally[1], mine=mine)

    async def vote_tally(self, *, job_id: int, index: int, user_id: int | None = None) -> VoteTally:
        up, down = await self._tally(job_id=job_id, index=index)
        mine = 0
        if user_id is not None:
            async with self._db.execute(
                "SELECT vote FROM votes WHERE job_id = ? AND idx = ? AND user_id = ?", (job_id, index, user_id)
            ) as cursor:
                row = await cursor.fetchone()
            mine = int(row["vote"]) if row else 0
        return VoteTally(up=up, down=down, mine=mine)

    async def _tally(self, *, job_id: int, index: int) -> tuple[int, int]:
        async with self._db.execute(
            "SELECT COALESCE(SUM(vote = 1), 0), COALESCE(SUM(vote = -1), 0) FROM votes WHERE job_id = ? AND idx = ?",
            (job_id, index),
        ) as cursor:
            row = await cursor.fetchone()
        assert row is not None
        return int(row[0]), int(row[1])


def _job(row: Any) -> Job:
    return Job(
        id=row["id"],
        kind=JobKind(row["kind"]),
        user_id=row["user_id"],
        guild_id=row["guild_id"],
        channel_id=row["channel_id"],
        prompt=row["prompt"],
        negative_prompt=row["negative_prompt"],
        seed=row["seed"],
        count=row["count"],
        settings=Settings(
            steps=row["steps"],
            guidance=row["guidance"],
            width=row["width"],
            height=row["height"],
            mode=Mode(row["mode"]),
            strength=row["strength"],
        ),
        model=row["model"],
        scheduler=row["scheduler"],
        status=JobStatus(row["status"]),
        parent_job_id=row["parent_job_id"],
        parent_index=row["parent_index"],
        message_id=row["message_id"],
        error=row["error"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
    )
