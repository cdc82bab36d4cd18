"""Large databases for the tests that must hold at scale, written in bulk with plain sqlite3."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

from bot.storage import Database

START = 1_700_000_000  # 2023-11-14 22:13:20 UTC


def bulk_vote(job: int, voter: int) -> int:
    """Return the vote ``voter`` casts on job ``job`` in a bulk database: down when ``(job + voter) % 3 == 0``."""
    return -1 if (job + voter) % 3 == 0 else 1


async def bulk_database(
    path: Path,
    images: int,
    *,
    guild_id: int = 2,
    users: Sequence[int] = (1,),
    voters: Sequence[int] = (5, 6),
    tags: Sequence[tuple[str, str]] = (("species", "seal"),),
    tags_per_job: int = 1,
    revisions: Sequence[str] = ("sha256:x",),
    seconds_apart: float = 1.0,
) -> None:
    """Write ``images`` one-image jobs in one server, with tags and votes, made ``seconds_apart`` from START.

    Job ``n`` (from 1) is by ``users[n % len(users)]``, on ``revisions[n % len(revisions)]``, has the
    ``tags_per_job`` tags of ``tags`` from index ``n % len(tags)`` on, and gets ``bulk_vote(n, voter)`` from
    each of ``voters``. The schema's triggers fill in what the statistics read, as they do for the bot.
    """
    async with await Database.open(path):
        pass  # creates the schema
    jobs = range(1, images + 1)
    width = min(tags_per_job, len(tags))

    def at(job: int) -> float:
        return START + job * seconds_apart

    connection = sqlite3.connect(path)
    connection.execute("PRAGMA cache_size = -262144")  # 256 MiB
    # Load first, index after: rebuilding an index once is much faster than updating it 100,000 times.
    indexes = connection.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")
    definitions = dict(indexes.fetchall())
    with connection:
        for name in definitions:
            connection.execute(f'DROP INDEX "{name}"')
        connection.executemany(
            "INSERT INTO jobs (id, kind, user_id, guild_id, channel_id, prompt, seed, count, steps, guidance, width,"
            " height, mode, strength, model, scheduler, status, created_at)"
            " VALUES (?, 'imagine', ?, ?, 3, ?, ?, 1, 25, 7.0, 512, 512, 'txt2img', 0.6, 'tiny', 'dpm++', 'done', ?)",
            [(job, users[job % len(users)], guild_id, f"species:seal, photo {job}", job, at(job)) for job in jobs],
        )
        connection.executemany(
            "INSERT INTO images (job_id, idx, seed, nsfw, model_revision, batch_id, batch_size, created_at)"
            " VALUES (?, 0, ?, 0, ?, ?, 8, ?)",
            [(job, job, revisions[job % len(revisions)], job // 8, at(job)) for job in jobs],
        )
        connection.executemany(
            "INSERT INTO job_tags (job_id, namespace, tag) VALUES (?, ?, ?)",
            [(job, *tags[(job + offset) % len(tags)]) for job in jobs for offset in range(width)],
        )
        connection.executemany(
            "INSERT INTO votes (job_id, idx, user_id, vote, updated_at) VALUES (?, 0, ?, ?, 0)",
            [(job, voter, bulk_vote(job, voter)) for job in jobs for voter in voters],
        )
        for sql in definitions.values():
            connection.execute(sql)
    connection.close()
