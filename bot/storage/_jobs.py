"""The job family: jobs and what a queued one needs to run again (its source image, its reply), its prompt tags,
its images and how each was made, and what the jobs of the last hour charged their users."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bot.engine.types import Mode, Settings
from bot.jobs import Job, JobKind, JobStatus, Reply
from bot.storage._store import AuditEntry, Store, clock


@dataclass(frozen=True, slots=True)
class Provenance:
    """How one image was made: the exact weights, the engine settings that touch pixels, its batch, its times."""

    model_revision: str | None
    dtype: str | None
    compiled: bool
    batch_id: int
    batch_size: int
    waited_s: float  # from the request to the start of its batch
    rendered_s: float  # the batch's time on the GPU


@dataclass(frozen=True, slots=True)
class ImageRecord:
    job_id: int
    index: int
    seed: int
    nsfw: bool
    provenance: Provenance | None = None  # None for images made before it was recorded
    created_at: float | None = None
    deleted_at: float | None = None
    file: str | None = None


@dataclass(frozen=True, slots=True)
class ChargedJob:
    """A job that still counts against its user's hourly limit: who, when, and what it asked for (unpriced)."""

    job_id: int
    guild_id: int | None
    user_id: int
    count: int
    steps: int
    width: int
    height: int
    at: float


class Jobs(Store):
    """Store jobs from request to result, and their images."""

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
        init_image: bytes | None = None,
        reply: Reply | None = None,
        tags: Sequence[tuple[str, str]] = (),
        revision: str | None = None,
    ) -> Job:
        """Store a new queued job, with what it needs to run again after a restart, and return it.

        ``revision`` is the candidate revision it asks for; None: the production one."""
        async with self._transaction():
            _, job_id = await self._execute(
                """
                INSERT INTO jobs (kind, parent_job_id, parent_index, user_id, guild_id, channel_id, prompt,
                                  negative_prompt, seed, count, steps, guidance, width, height, mode, strength,
                                  model, scheduler, status, created_at, reply_token, reply_message_id, reply_at,
                                  revision)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?)
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
                    clock(),
                    reply.token if reply else None,
                    reply.message_id if reply else None,
                    reply.at if reply else None,
                    revision,
                ),
            )
            assert job_id is not None
            if init_image is not None:
                await self._execute("INSERT INTO job_inputs (job_id, init_image) VALUES (?, ?)", (job_id, init_image))
            if tags:
                await self._execute_many(
                    "INSERT OR IGNORE INTO job_tags (job_id, namespace, tag) VALUES (?, ?, ?)",
                    [(job_id, namespace, tag) for namespace, tag in tags],
                )
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

    async def init_image(self, *, job_id: int) -> bytes | None:
        """Return the source image a queued variation renders from."""
        async with self._db.execute("SELECT init_image FROM job_inputs WHERE job_id = ?", (job_id,)) as cursor:
            row = await cursor.fetchone()
        return bytes(row["init_image"]) if row else None

    async def set_reply_message(self, *, job_id: int, message_id: int) -> None:
        """Record the message that answers a job's interaction."""
        await self._execute("UPDATE jobs SET reply_message_id = ? WHERE id = ?", (message_id, job_id))

    async def mark_started(self, *, job_id: int) -> None:
        await self._execute(
            "UPDATE jobs SET status = 'running', started_at = ? WHERE id = ? AND status = 'queued'",
            (clock(), job_id),
        )

    async def record_images(
        self,
        *,
        job_id: int,
        seeds: Sequence[int],
        nsfw: Sequence[bool],
        provenance: Sequence[Provenance | None] | None = None,
        files: Sequence[str | None] | None = None,
    ) -> None:
        """Record a job's rendered images and how each was made (before they are posted, so buttons work at once)."""
        count = len(seeds)
        made = provenance if provenance is not None else [None] * count
        paths = files if files is not None else [None] * count
        now = clock()
        rows: list[tuple[object, ...]] = []
        for index, (seed, flag, how, path) in enumerate(zip(seeds, nsfw, made, paths, strict=True)):
            rows.append(
                (
                    job_id,
                    index,
                    seed,
                    int(flag),
                    how.model_revision if how else None,
                    how.dtype if how else None,
                    int(how.compiled) if how else None,
                    how.batch_id if how else None,
                    how.batch_size if how else None,
                    how.waited_s if how else None,
                    how.rendered_s if how else None,
                    now,
                    path,
                )
            )
        await self._execute_many(
            """
            INSERT OR REPLACE INTO images (job_id, idx, seed, nsfw, model_revision, dtype, compiled, batch_id,
                                           batch_size, waited_s, rendered_s, created_at, file)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            """,
            rows,
        )

    async def complete_job(self, *, job_id: int, message_id: int | None) -> None:
        """Mark a job delivered, in ``message_id``; what only a queued job needs is dropped."""
        now = clock()
        async with self._transaction():
            await self._execute(
                """
                UPDATE jobs SET status = 'done', finished_at = ?, started_at = COALESCE(started_at, ?),
                                message_id = COALESCE(?, message_id), reply_token = NULL
                WHERE id = ?
                """,
                (now, now, message_id, job_id),
            )
            await self._execute("DELETE FROM job_inputs WHERE job_id = ?", (job_id,))

    async def end_job(
        self, *, job_id: int, error: str, status: JobStatus = JobStatus.FAILED, audit: AuditEntry | None = None
    ) -> bool:
        """End an unfinished job as failed or cancelled (with its audit row, if a moderator did it).

        Returns False, changing nothing, when the job had already ended.
        """
        if status not in (JobStatus.FAILED, JobStatus.CANCELLED):
            raise ValueError(f"a job ends as failed or cancelled, not {status}")
        async with self._transaction():
            changed, _ = await self._execute(
                """
                UPDATE jobs SET status = ?, error = ?, finished_at = ?, reply_token = NULL
                WHERE id = ? AND status IN ('queued', 'running')
                """,
                (status.value, error, clock(), job_id),
            )
            if changed == 0:
                return False
            await self._execute("DELETE FROM job_inputs WHERE job_id = ?", (job_id,))
            if audit is not None:
                await self._audit(audit)
        return True

    async def get_image(self, *, job_id: int, index: int) -> ImageRecord | None:
        rows = await self._rows("SELECT * FROM images WHERE job_id = ? AND idx = ?", (job_id, index))
        return _image(rows[0]) if rows else None

    async def job_images(self, *, job_id: int) -> list[ImageRecord]:
        """Return a job's images in order, with how each was made."""
        return [
            _image(row) for row in await self._rows("SELECT * FROM images WHERE job_id = ? ORDER BY idx", (job_id,))
        ]

    async def delete_images(self, *, job_id: int, forget: bool = False) -> None:
        """Mark a job's images deleted (their message is gone), or with ``forget`` remove them and their votes."""
        if forget:
            await self._execute("DELETE FROM images WHERE job_id = ?", (job_id,))
        else:
            await self._execute(
                "UPDATE images SET deleted_at = ? WHERE job_id = ? AND deleted_at IS NULL", (clock(), job_id)
            )

    async def job_tags(self, *, job_id: int) -> list[tuple[str, str]]:
        """Return a job's prompt tags as (namespace, tag), in the order they were stored."""
        rows = await self._rows("SELECT namespace, tag FROM job_tags WHERE job_id = ? ORDER BY rowid", (job_id,))
        return [(row["namespace"], row["tag"]) for row in rows]

    async def charges_since(self, since: float) -> list[ChargedJob]:
        """Return each job accepted since ``since`` that still counts against its user, unless it gave it back.

        A job gives its share back when it fails, or is cancelled before it starts rendering.
        """
        rows = await self._rows(
            """
            SELECT id, guild_id, user_id, count, steps, width, height, created_at FROM jobs
            WHERE created_at > ? AND revision IS NULL  -- a candidate's image is the arena's, charged to nobody
              AND (status IN ('queued', 'running', 'done') OR (status = 'cancelled' AND started_at IS NOT NULL))
            ORDER BY created_at
            """,
            (since,),
        )
        return [
            ChargedJob(
                job_id=row["id"],
                guild_id=row["guild_id"],
                user_id=row["user_id"],
                count=row["count"],
                steps=row["steps"],
                width=row["width"],
                height=row["height"],
                at=row["created_at"],
            )
            for row in rows
        ]


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
        reply=Reply(token=row["reply_token"], message_id=row["reply_message_id"], at=row["reply_at"])
        if row["reply_token"] is not None
        else None,
        revision=row["revision"],
    )


def _image(row: Any) -> ImageRecord:
    provenance = None
    if row["batch_id"] is not None:
        provenance = Provenance(
            model_revision=row["model_revision"],
            dtype=row["dtype"],
            compiled=bool(row["compiled"]),
            batch_id=row["batch_id"],
            batch_size=row["batch_size"],
            waited_s=row["waited_s"],
            rendered_s=row["rendered_s"],
        )
    return ImageRecord(
        job_id=row["job_id"],
        index=row["idx"],
        seed=row["seed"],
        nsfw=bool(row["nsfw"]),
        provenance=provenance,
        created_at=row["created_at"],
        deleted_at=row["deleted_at"],
        file=row["file"],
    )
