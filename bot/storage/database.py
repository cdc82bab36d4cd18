"""The one aiosqlite connection and every SQL statement the bot runs."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import re
import sqlite3
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiosqlite

from bot.engine.types import Mode, Settings
from bot.errors import DatabaseVersionError, StorageError
from bot.limits import Charge, Limits, Scope, standard_images
from bot.storage.files import create_private, private_folder

log = logging.getLogger(__name__)

_MIGRATION_NAME = re.compile(r"(?P<number>\d{4})_[a-z0-9_]+\.sql")
FEEDBACK_SCHEMA = 3  # the first database version holding what ``feedback`` reads (0003_feedback.sql)
# Which images the feedback export takes; named parameters :since, :until, :revision and :min_votes.
_FEEDBACK_FILTER = """
    (:since IS NULL OR i.created_at >= :since)
    AND (:until IS NULL OR i.created_at < :until)
    AND (:revision IS NULL OR i.model_revision = :revision)
    AND (SELECT COUNT(*) FROM votes v WHERE v.job_id = i.job_id AND v.idx = i.idx) >= :min_votes
"""


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
class Reply:
    """The interaction a job answers: its token lives 15 minutes from ``at``; ``message_id`` shows the job.

    The job is stored before the interaction is acknowledged, so the message's id comes a moment later (and is
    None if the bot died in between: the job is then posted to its channel).
    """

    token: str
    message_id: int | None
    at: float


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
    reply: Reply | None = None


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
class VoteTally:
    """The votes on one image after a change, and the voter's own vote (0 when withdrawn)."""

    up: int
    down: int
    mine: int


@dataclass(frozen=True, slots=True)
class ImageCounts:
    """A server's images (or one member's) of one model revision made in one hour of the day, and their votes."""

    revision: str | None  # None: made before revisions were recorded
    hour: int | None  # UTC, 0-23; None: made before image times were recorded
    images: int
    up: int
    down: int
    latest: float | None  # when the newest of them was made


@dataclass(frozen=True, slots=True)
class TagCounts:
    """The votes on the images of every job whose prompt used a tag (``tag`` None: any tag of the namespace)."""

    namespace: str
    tag: str | None
    up: int
    down: int


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One change a moderator made: what, to whom, old → new, and why; ``id`` and ``at`` are set when stored."""

    guild_id: int
    moderator_id: int
    action: str
    target: str
    old: str | None = None
    new: str | None = None
    reason: str | None = None
    id: int = 0
    at: float = 0.0


@dataclass(slots=True)
class GuildRules:
    """Everything a server's moderators set, as stored."""

    guild_id: int
    server: Limits = field(default_factory=Limits)
    roles: dict[int, Limits] = field(default_factory=dict[int, Limits])
    users: dict[int, Limits] = field(default_factory=dict[int, Limits])
    terms: set[str] = field(default_factory=set[str])
    allowed: set[int] = field(default_factory=set[int])
    denied: set[int] = field(default_factory=set[int])
    bans: dict[int, str | None] = field(default_factory=dict[int, str | None])
    paused: bool = False
    pause_reason: str | None = None


def _refuse_folder(path: Path | str, setting: str) -> None:
    path = Path(path)
    if path.is_dir():
        raise StorageError(f"{setting}: {path} is a folder: name the database file, like {path / 'sygil.db'}")


def _readonly_uri(path: Path) -> str:
    return f"{path.absolute().as_uri()}?mode=ro"


def _unusable(error: sqlite3.Error, path: Path | str, setting: str) -> StorageError:
    """Say in one line why SQLite cannot use the file at ``path``."""
    if error.sqlite_errorname == "SQLITE_NOTADB":
        return StorageError(f"{setting}: {path} is not an SQLite database: name the bot's database file")
    return StorageError(
        f"{setting}: cannot use the database {path}: {error}. Check that the file and its folder exist and this user "
        "can read and write them"
    )


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
    """SQLite storage for jobs, images, votes and moderation; use ``async with Database.open(path)``."""

    def __init__(self, connection: aiosqlite.Connection) -> None:
        self._db = connection
        # One connection serves every coroutine; explicit transactions must not interleave.
        self._transaction_lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncGenerator[None]:
        async with self._transaction_lock:
            await self._execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                await self._execute("ROLLBACK")
                raise
            await self._execute("COMMIT")

    async def _execute(self, sql: str, parameters: tuple[object, ...] = ()) -> tuple[int, int | None]:
        """Run one statement and return its row count and last row id.

        Every cursor is closed here, on the connection's thread: a cursor left to the garbage collector is
        finalised on the event loop's thread, which can reset a statement while the connection's thread runs
        another (seen as "bad parameter or other API misuse" under load).
        """
        async with self._db.execute(sql, parameters) as cursor:
            return cursor.rowcount, cursor.lastrowid

    async def _execute_many(self, sql: str, rows: list[tuple[object, ...]]) -> None:
        async with self._db.executemany(sql, rows):
            pass

    @classmethod
    async def open(cls, path: Path | str, *, setting: str = "storage.path") -> Self:
        """Open (creating if needed) and migrate the database at ``path``, which ``setting`` names.

        A new file is made readable by this user only, in folders made the same way: it holds live interaction
        tokens (SQLite gives its -wal and -shm files the database's mode). Raise StorageError when the file cannot be
        used, DatabaseVersionError when a newer bot made it.
        """
        if str(path) != ":memory:":
            path = Path(path)
            _refuse_folder(path, setting)
            try:
                private_folder(path.parent)
                create_private(path)
            except OSError as error:
                raise StorageError(
                    f"{setting}: cannot create the database {path}: {error.filename}: {error.strerror}. Name a file "
                    "in a folder this user can write to"
                ) from None
        pragmas = ("journal_mode = WAL", "foreign_keys = ON", "busy_timeout = 5000")
        return await cls._open(str(path), path=path, setting=setting, pragmas=pragmas, migrate=True)

    @classmethod
    async def open_readonly(cls, path: Path, *, setting: str = "storage.path") -> Self:
        """Open the database at ``path`` for reading only: nothing is created, migrated or written.

        Beside the running bot it reads a consistent snapshot (WAL). Raise StorageError when the file cannot be read,
        DatabaseVersionError when a newer bot made it.
        """
        _refuse_folder(path, setting)
        return await cls._open(
            _readonly_uri(path), uri=True, path=path, setting=setting, pragmas=("busy_timeout = 5000",)
        )

    @classmethod
    async def _open(
        cls,
        target: str,
        *,
        path: Path | str,
        setting: str,
        pragmas: Sequence[str],
        migrate: bool = False,
        uri: bool = False,
    ) -> Self:
        """Connect, refuse a database newer than this bot's migrations, then set ``pragmas`` and migrate if asked."""
        try:
            connection = await aiosqlite.connect(target, isolation_level=None, uri=uri)
        except sqlite3.Error as error:
            raise _unusable(error, path, setting) from None
        connection.row_factory = aiosqlite.Row
        database = cls(connection)
        try:
            version, known = await database.schema_version(), len(migrations())
            if version > known:
                raise DatabaseVersionError(
                    f"{path} was made by a newer sygil-bot (database version {version}; this one knows up to "
                    f"{known}): upgrade sygil-bot to use it, or set {setting} to another file"
                )
            for pragma in pragmas:
                await database._execute(f"PRAGMA {pragma}")
            if migrate:
                await database.migrate()
        except sqlite3.Error as error:
            await connection.close()
            raise _unusable(error, path, setting) from None
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
            async with self._db.executescript(f"BEGIN; {sql}; PRAGMA user_version = {number}; COMMIT;"):
                pass
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
        init_image: bytes | None = None,
        reply: Reply | None = None,
        tags: Sequence[tuple[str, str]] = (),
    ) -> Job:
        """Store a new queued job, with what it needs to run again after a restart, and return it."""
        async with self._transaction():
            _, job_id = await self._execute(
                """
                INSERT INTO jobs (kind, parent_job_id, parent_index, user_id, guild_id, channel_id, prompt,
                                  negative_prompt, seed, count, steps, guidance, width, height, mode, strength,
                                  model, scheduler, status, created_at, reply_token, reply_message_id, reply_at)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?)
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
                    reply.token if reply else None,
                    reply.message_id if reply else None,
                    reply.at if reply else None,
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
            (time.time(), job_id),
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
        now = time.time()
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
        now = time.time()
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
                (status.value, error, time.time(), job_id),
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
                "UPDATE images SET deleted_at = ? WHERE job_id = ? AND deleted_at IS NULL", (time.time(), job_id)
            )

    async def job_tags(self, *, job_id: int) -> list[tuple[str, str]]:
        """Return a job's prompt tags as (namespace, tag), in the order they were stored."""
        rows = await self._rows("SELECT namespace, tag FROM job_tags WHERE job_id = ? ORDER BY rowid", (job_id,))
        return [(row["namespace"], row["tag"]) for row in rows]

    async def charges_since(self, since: float) -> list[Charge]:
        """Return what each job accepted since ``since`` costs its user, unless it gave it back.

        A job gives its share back when it fails, or is cancelled before it starts rendering.
        """
        async with self._db.execute(
            """
            SELECT id, guild_id, user_id, count, steps, width, height, created_at FROM jobs
            WHERE created_at > ?
              AND (status IN ('queued', 'running', 'done') OR (status = 'cancelled' AND started_at IS NOT NULL))
            ORDER BY created_at
            """,
            (since,),
        ) as cursor:
            rows = await cursor.fetchall()
        return [
            Charge(
                guild_id=row["guild_id"],
                user_id=row["user_id"],
                cost=standard_images(
                    Settings(steps=row["steps"], width=row["width"], height=row["height"]), row["count"]
                ),
                at=row["created_at"],
                job_id=row["id"],
            )
            for row in rows
        ]

    # Moderation: every change is written with its audit row in one transaction

    async def guild_rules(self) -> dict[int, GuildRules]:
        """Return what the moderators of every server set."""
        rules: dict[int, GuildRules] = {}

        def of(guild_id: int) -> GuildRules:
            return rules.setdefault(guild_id, GuildRules(guild_id))

        for row in await self._rows("SELECT * FROM limit_overrides"):
            limits = Limits(
                images_per_hour=row["images_per_hour"],
                max_queued=row["max_queued"],
                max_count=row["max_count"],
                max_steps=row["max_steps"],
            )
            guild = of(row["guild_id"])
            scope = Scope(row["scope"])
            if scope is Scope.SERVER:
                guild.server = limits
            elif scope is Scope.ROLE:
                guild.roles[row["target_id"]] = limits
            else:
                guild.users[row["target_id"]] = limits
        for row in await self._rows("SELECT guild_id, term FROM blocked_terms"):
            of(row["guild_id"]).terms.add(row["term"])
        for row in await self._rows("SELECT guild_id, channel_id, rule FROM channel_rules"):
            guild = of(row["guild_id"])
            (guild.allowed if row["rule"] == "allow" else guild.denied).add(row["channel_id"])
        for row in await self._rows("SELECT guild_id, user_id, reason FROM bans"):
            of(row["guild_id"]).bans[row["user_id"]] = row["reason"]
        for row in await self._rows("SELECT guild_id, reason FROM pauses"):
            guild = of(row["guild_id"])
            guild.paused, guild.pause_reason = True, row["reason"]
        return rules

    async def set_limits(
        self, *, guild_id: int, scope: Scope, target_id: int, limits: Limits, audit: AuditEntry
    ) -> None:
        """Store an override's fields (an override with none set is removed)."""
        if not limits:
            await self._change(
                "DELETE FROM limit_overrides WHERE guild_id = ? AND scope = ? AND target_id = ?",
                (guild_id, scope.value, target_id),
                audit,
            )
            return
        await self._change(
            """
            INSERT INTO limit_overrides (guild_id, scope, target_id, images_per_hour, max_queued, max_count, max_steps)
            VALUES (?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT (guild_id, scope, target_id) DO UPDATE SET
                images_per_hour = excluded.images_per_hour, max_queued = excluded.max_queued,
                max_count = excluded.max_count, max_steps = excluded.max_steps
            """,
            (guild_id, scope.value, target_id, *(value for _, value in limits.items())),
            audit,
        )

    async def add_term(self, *, guild_id: int, term: str, audit: AuditEntry) -> None:
        await self._change("INSERT INTO blocked_terms (guild_id, term) VALUES (?, ?)", (guild_id, term), audit)

    async def remove_term(self, *, guild_id: int, term: str, audit: AuditEntry) -> None:
        await self._change("DELETE FROM blocked_terms WHERE guild_id = ? AND term = ?", (guild_id, term), audit)

    async def set_channel_rule(self, *, guild_id: int, channel_id: int, rule: str | None, audit: AuditEntry) -> None:
        """Allow or deny /imagine in a channel, or (``rule`` None) clear what was set for it."""
        if rule is None:
            await self._change(
                "DELETE FROM channel_rules WHERE guild_id = ? AND channel_id = ?", (guild_id, channel_id), audit
            )
            return
        if rule not in ("allow", "deny"):
            raise ValueError(f"a channel rule is allow or deny, not {rule!r}")
        await self._change(
            """
            INSERT INTO channel_rules (guild_id, channel_id, rule) VALUES (?, ?, ?)
            ON CONFLICT (guild_id, channel_id) DO UPDATE SET rule = excluded.rule
            """,
            (guild_id, channel_id, rule),
            audit,
        )

    async def ban(self, *, guild_id: int, user_id: int, reason: str | None, audit: AuditEntry) -> None:
        await self._change(
            """
            INSERT INTO bans (guild_id, user_id, reason) VALUES (?, ?, ?)
            ON CONFLICT (guild_id, user_id) DO UPDATE SET reason = excluded.reason
            """,
            (guild_id, user_id, reason),
            audit,
        )

    async def unban(self, *, guild_id: int, user_id: int, audit: AuditEntry) -> None:
        await self._change("DELETE FROM bans WHERE guild_id = ? AND user_id = ?", (guild_id, user_id), audit)

    async def pause(self, *, guild_id: int, reason: str | None, audit: AuditEntry) -> None:
        await self._change(
            """
            INSERT INTO pauses (guild_id, reason) VALUES (?, ?)
            ON CONFLICT (guild_id) DO UPDATE SET reason = excluded.reason
            """,
            (guild_id, reason),
            audit,
        )

    async def resume(self, *, guild_id: int, audit: AuditEntry) -> None:
        await self._change("DELETE FROM pauses WHERE guild_id = ?", (guild_id,), audit)

    async def audit_log(self, *, guild_id: int, count: int) -> list[AuditEntry]:
        """Return a server's latest audit rows, newest first."""
        rows = await self._rows(
            "SELECT * FROM audit_log WHERE guild_id = ? ORDER BY id DESC LIMIT ?", (guild_id, count)
        )
        return [
            AuditEntry(
                guild_id=row["guild_id"],
                moderator_id=row["moderator_id"],
                action=row["action"],
                target=row["target"],
                old=row["old"],
                new=row["new"],
                reason=row["reason"],
                id=row["id"],
                at=row["at"],
            )
            for row in rows
        ]

    async def _change(self, sql: str, parameters: tuple[object, ...], audit: AuditEntry) -> None:
        async with self._transaction():
            await self._execute(sql, parameters)
            await self._audit(audit)

    async def _audit(self, audit: AuditEntry) -> None:
        await self._execute(
            """
            INSERT INTO audit_log (guild_id, at, moderator_id, action, target, old, new, reason)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?)
            """,
            (
                audit.guild_id,
                time.time(),
                audit.moderator_id,
                audit.action,
                audit.target,
                audit.old,
                audit.new,
                audit.reason,
            ),
        )

    async def feedback(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        min_votes: int = 0,
        revision: str | None = None,
        chunk: int = 500,
    ) -> AsyncGenerator[dict[str, Any]]:
        """Yield one record per image, oldest first: what made it, its lineage and its votes; streamed in chunks
        so memory does not grow with the number of images."""
        sql = f"""
            SELECT i.job_id, i.idx, i.seed, i.nsfw, i.model_revision, i.dtype, i.compiled, i.batch_id, i.batch_size,
                   i.waited_s, i.rendered_s, i.created_at, i.deleted_at, i.file,
                   j.kind, j.parent_job_id, j.parent_index, j.prompt, j.negative_prompt, j.steps, j.guidance,
                   j.width, j.height, j.mode, j.strength, j.model, j.scheduler, j.guild_id,
                   (SELECT COUNT(*) FROM votes v WHERE v.job_id = i.job_id AND v.idx = i.idx AND v.vote = 1) AS up,
                   (SELECT COUNT(*) FROM votes v WHERE v.job_id = i.job_id AND v.idx = i.idx AND v.vote = -1) AS down,
                   (SELECT group_concat(t.namespace || ':' || t.tag, '|') FROM job_tags t WHERE t.job_id = i.job_id)
                       AS tags
            FROM images i JOIN jobs j ON j.id = i.job_id
            WHERE {_FEEDBACK_FILTER}
            ORDER BY i.job_id, i.idx
        """
        parameters = {"since": since, "until": until, "revision": revision, "min_votes": min_votes}
        async with self._db.execute(sql, parameters) as cursor:
            while rows := await cursor.fetchmany(chunk):
                for row in rows:
                    record = dict(row)
                    record["tags"] = record["tags"].split("|") if record["tags"] else []
                    record["nsfw"] = bool(record["nsfw"])
                    record["compiled"] = None if record["compiled"] is None else bool(record["compiled"])
                    yield record

    # Statistics: covering indexes only, read in the order they group by (migration 0004). Deleted images count.

    async def image_counts(self, *, guild_id: int, user_id: int | None = None) -> list[ImageCounts]:
        """Return a server's images, or those ``user_id`` made there, by model revision and hour of the day."""
        where, parameters = _stats_scope(guild_id, user_id)
        rows = await self._rows(
            f"""
            SELECT model_revision, CAST(created_at AS INTEGER) / 3600 % 24 AS hour, COUNT(*) AS images,
                   SUM(up) AS up, SUM(down) AS down, MAX(created_at) AS latest
            FROM images WHERE {where}
            GROUP BY model_revision, CAST(created_at AS INTEGER) / 3600 % 24
            """,
            parameters,
        )
        return [
            ImageCounts(
                revision=row["model_revision"],
                hour=row["hour"],
                images=row["images"],
                up=row["up"],
                down=row["down"],
                latest=row["latest"],
            )
            for row in rows
        ]

    async def tag_counts(self, *, guild_id: int, user_id: int | None = None, min_votes: int = 0) -> list[TagCounts]:
        """Return the votes per tag on a server's images (or those ``user_id`` made), for tags with ``min_votes``."""
        where, parameters = _stats_scope(guild_id, user_id)
        rows = await self._rows(
            f"""
            SELECT namespace, tag, SUM(up) AS up, SUM(down) AS down FROM job_tags WHERE {where}
            GROUP BY namespace, tag HAVING SUM(up) + SUM(down) >= ?
            """,
            (*parameters, min_votes),
        )
        return [TagCounts(row["namespace"], row["tag"], row["up"], row["down"]) for row in rows]

    async def namespace_counts(
        self, *, guild_id: int, user_id: int | None = None, min_votes: int = 0
    ) -> list[TagCounts]:
        """Return the votes per namespace; an image's votes count once however many of the namespace's tags it used."""
        where, parameters = _stats_scope(guild_id, user_id)
        rows = await self._rows(
            f"""
            SELECT namespace, SUM(up) AS up, SUM(down) AS down FROM job_tags WHERE {where} AND namespace_first
            GROUP BY namespace HAVING SUM(up) + SUM(down) >= ?
            """,
            (*parameters, min_votes),
        )
        return [TagCounts(row["namespace"], None, row["up"], row["down"]) for row in rows]

    async def votes_cast(self, *, guild_id: int, user_id: int) -> tuple[int, int]:
        """Return the up and down votes ``user_id`` has on images in a server."""
        rows = await self._rows(
            """
            SELECT COALESCE(SUM(v.vote = 1), 0) AS up, COALESCE(SUM(v.vote = -1), 0) AS down
            FROM votes v JOIN jobs j ON j.id = v.job_id WHERE v.user_id = ? AND j.guild_id = ?
            """,
            (user_id, guild_id),
        )
        return int(rows[0]["up"]), int(rows[0]["down"])

    async def feedback_count(
        self, *, since: float | None = None, until: float | None = None, min_votes: int = 0, revision: str | None = None
    ) -> int:
        """Return how many images ``feedback`` yields with the same filters."""
        parameters = {"since": since, "until": until, "revision": revision, "min_votes": min_votes}
        sql = f"SELECT COUNT(*) FROM images i JOIN jobs j ON j.id = i.job_id WHERE {_FEEDBACK_FILTER}"
        async with self._db.execute(sql, parameters) as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def _rows(self, sql: str, parameters: tuple[object, ...] = ()) -> list[Any]:
        async with self._db.execute(sql, parameters) as cursor:
            return list(await cursor.fetchall())

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
                await self._execute(
                    "DELETE FROM votes WHERE job_id = ? AND idx = ? AND user_id = ?", (job_id, index, user_id)
                )
                mine = 0
            else:
                await self._execute(
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

    async def vote_tallies(self, *, job_id: int, count: int) -> list[VoteTally]:
        """Return the votes on each of a job's ``count`` images, in one query (``mine`` is 0)."""
        rows = await self._rows(
            "SELECT idx, COALESCE(SUM(vote = 1), 0), COALESCE(SUM(vote = -1), 0) FROM votes WHERE job_id = ? "
            "GROUP BY idx",
            (job_id,),
        )
        counts = {int(row[0]): (int(row[1]), int(row[2])) for row in rows}
        return [VoteTally(*counts.get(index, (0, 0)), mine=0) for index in range(count)]

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
        reply=Reply(token=row["reply_token"], message_id=row["reply_message_id"], at=row["reply_at"])
        if row["reply_token"] is not None
        else None,
    )


def _stats_scope(guild_id: int, user_id: int | None) -> tuple[str, tuple[object, ...]]:
    """Return the condition and parameters that pick a server's rows, or one member's there."""
    if user_id is None:
        return "guild_id = ?", (guild_id,)
    return "guild_id = ? AND user_id = ?", (guild_id, user_id)


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
