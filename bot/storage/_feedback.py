"""The feedback family: one record per image with what made it, its lineage and its votes, for the training
export, streamed in chunks and counted with the same filters."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from bot.storage._store import Store

FEEDBACK_SCHEMA = 3  # the first database version holding what ``feedback`` reads (0003_feedback.sql)
# Which images the feedback export takes; named parameters :since, :until, :revision and :min_votes.
_FEEDBACK_FILTER = """
    (:since IS NULL OR i.created_at >= :since)
    AND (:until IS NULL OR i.created_at < :until)
    AND (:revision IS NULL OR i.model_revision = :revision)
    AND (SELECT COUNT(*) FROM votes v WHERE v.job_id = i.job_id AND v.idx = i.idx) >= :min_votes
"""


class Feedback(Store):
    """Read the votes with what made each image, for ``sygil-bot export-feedback``."""

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

    async def feedback_count(
        self, *, since: float | None = None, until: float | None = None, min_votes: int = 0, revision: str | None = None
    ) -> int:
        """Return how many images ``feedback`` yields with the same filters."""
        parameters = {"since": since, "until": until, "revision": revision, "min_votes": min_votes}
        sql = f"SELECT COUNT(*) FROM images i JOIN jobs j ON j.id = i.job_id WHERE {_FEEDBACK_FILTER}"
        async with self._db.execute(sql, parameters) as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0
