"""The arena family: blind A/B pairs of two model revisions' images, each member's vote on them, and the counted
votes read back for /stats arena and the pairs export. Every vote is stored; the daily cap decides, when votes are
read, which of them count: a member's first ``max_per_day`` of each UTC day."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, Literal

from bot.storage._store import Store, clock

ARENA_SCHEMA = 5  # the first database version holding the arena's tables (0005_arena.sql)
CHOICES = ("left", "right", "tie", "both_bad")
Side = Literal["left", "right"]

# Each vote with ``counted``: 1 when it is among its member's first :cap votes of its UTC day (by the time it was
# cast, then by pair), over every server. Named parameter :cap.
_COUNTED = """
    counted_votes AS (
        SELECT pair_id, user_id, choice, voted_at, seconds,
               ROW_NUMBER() OVER (PARTITION BY user_id, CAST(voted_at / 86400 AS INTEGER)
                                  ORDER BY voted_at, pair_id) <= :cap AS counted
        FROM arena_votes
    )
"""


@dataclass(frozen=True, slots=True)
class ArenaPair:
    """Two images of one prompt by two model revisions, shown as left and right."""

    id: int
    guild_id: int | None
    channel_id: int
    requester_id: int
    left: tuple[int, int]  # (job id, image index)
    right: tuple[int, int]
    left_revision: str
    right_revision: str
    production_side: Side | None  # which side production rendered; None: two candidates
    message_id: int | None
    created_at: float
    posted_at: float | None


@dataclass(frozen=True, slots=True)
class PairTally:
    """The votes on one pair, every vote stored (counted or not)."""

    left: int = 0
    right: int = 0
    tie: int = 0
    both_bad: int = 0


@dataclass(frozen=True, slots=True)
class ArenaCount:
    """How many counted votes made one choice between two revisions (``namespace``: of prompts using it)."""

    left_revision: str
    right_revision: str
    production_side: Side | None
    choice: str
    votes: int
    namespace: str | None = None


@dataclass(frozen=True, slots=True)
class VoterCounts:
    """One member's arena votes in a server: how many, for each choice, and how many came within a second."""

    user_id: int
    votes: int
    left: int
    right: int
    tie: int
    both_bad: int
    fast: int  # cast less than one second after the pair was posted


class Arena(Store):
    """Store arena pairs and the votes on them."""

    async def record_arena_pair(
        self,
        *,
        guild_id: int | None,
        channel_id: int,
        requester_id: int,
        left: tuple[int, int],
        right: tuple[int, int],
        production_side: Side | None,
    ) -> ArenaPair:
        """Store a pair of two recorded images, their revisions read from the images; raise ValueError when either
        image is not recorded, or has no revision, or both are the same image."""
        if production_side not in ("left", "right", None):
            raise ValueError(f"production_side must be 'left', 'right' or None, got {production_side!r}")
        if left == right:
            raise ValueError(f"a pair needs two different images, got image {left[1]} of job {left[0]} twice")
        revisions: list[str] = []
        for job_id, index in (left, right):
            rows = await self._rows("SELECT model_revision FROM images WHERE job_id = ? AND idx = ?", (job_id, index))
            if not rows:
                raise ValueError(f"image {index} of job {job_id} is not recorded")
            if rows[0]["model_revision"] is None:
                raise ValueError(f"image {index} of job {job_id} has no recorded model revision")
            revisions.append(rows[0]["model_revision"])
        _, pair_id = await self._execute(
            """
            INSERT INTO arena_pairs (guild_id, channel_id, requester_id, left_job_id, left_index, left_revision,
                                     right_job_id, right_index, right_revision, production_side, created_at)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            """,
            (guild_id, channel_id, requester_id, *left, revisions[0], *right, revisions[1], production_side, clock()),
        )
        assert pair_id is not None
        pair = await self.arena_pair(pair_id=pair_id)
        assert pair is not None
        return pair

    async def set_arena_message(self, *, pair_id: int, message_id: int, posted_at: float | None = None) -> None:
        """Record the message that shows a pair, and when it was posted (now unless given)."""
        await self._execute(
            "UPDATE arena_pairs SET message_id = ?, posted_at = ? WHERE id = ?",
            (message_id, clock() if posted_at is None else posted_at, pair_id),
        )

    async def arena_pair(self, *, pair_id: int) -> ArenaPair | None:
        rows = await self._rows("SELECT * FROM arena_pairs WHERE id = ?", (pair_id,))
        return _pair(rows[0]) if rows else None

    async def record_arena_vote(
        self, *, pair_id: int, user_id: int, choice: str, seconds: float | None = None, at: float | None = None
    ) -> PairTally:
        """Store a member's vote on a pair, replacing theirs if they had one; return the pair's votes.

        ``seconds`` is the time from the post to the vote; None takes it from the pair's post time when known.
        ``at`` is when the vote was cast (now unless given).
        """
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        now = clock() if at is None else at
        async with self._transaction():
            rows = await self._rows("SELECT posted_at FROM arena_pairs WHERE id = ?", (pair_id,))
            if not rows:
                raise ValueError(f"no arena pair {pair_id}")
            posted_at = rows[0]["posted_at"]
            if seconds is None and posted_at is not None:
                seconds = max(0.0, now - posted_at)
            await self._execute(
                """
                INSERT INTO arena_votes (pair_id, user_id, choice, voted_at, seconds) VALUES (?, ?, ?, ?, ?)
                ON CONFLICT (pair_id, user_id)
                DO UPDATE SET choice = excluded.choice, voted_at = excluded.voted_at, seconds = excluded.seconds
                """,
                (pair_id, user_id, choice, now, seconds),
            )
            return await self.pair_tally(pair_id=pair_id)

    async def pair_tally(self, *, pair_id: int) -> PairTally:
        rows = await self._rows(
            "SELECT choice, COUNT(*) FROM arena_votes WHERE pair_id = ? GROUP BY choice", (pair_id,)
        )
        return PairTally(**{row[0]: int(row[1]) for row in rows})

    async def arena_vote_counted(self, *, pair_id: int, user_id: int, max_per_day: int) -> bool:
        """Return whether a member's vote on a pair is among the votes that count (the daily cap)."""
        rows = await self._rows(
            f"WITH {_COUNTED} SELECT counted FROM counted_votes WHERE pair_id = :pair AND user_id = :user",
            {"cap": max_per_day, "pair": pair_id, "user": user_id},
        )
        return bool(rows and rows[0]["counted"])

    async def arena_counts(self, *, guild_id: int, max_per_day: int) -> tuple[list[ArenaCount], int]:
        """Return a server's counted votes by revisions shown and choice, and how many votes the cap left out."""
        rows = await self._rows(
            f"""
            WITH {_COUNTED}
            SELECT p.left_revision, p.right_revision, p.production_side, v.choice, v.counted, COUNT(*) AS votes
            FROM counted_votes v JOIN arena_pairs p ON p.id = v.pair_id
            WHERE p.guild_id = :guild
            GROUP BY p.left_revision, p.right_revision, p.production_side, v.choice, v.counted
            """,
            {"cap": max_per_day, "guild": guild_id},
        )
        counts = [_count(row) for row in rows if row["counted"]]
        return counts, sum(int(row["votes"]) for row in rows if not row["counted"])

    async def arena_namespace_counts(self, *, guild_id: int, max_per_day: int) -> list[ArenaCount]:
        """Return a server's counted votes by namespace of the prompt's tags (a pair counts once per namespace)."""
        rows = await self._rows(
            f"""
            WITH {_COUNTED}
            SELECT t.namespace, p.left_revision, p.right_revision, p.production_side, v.choice, COUNT(*) AS votes
            FROM counted_votes v JOIN arena_pairs p ON p.id = v.pair_id
                 JOIN job_tags t ON t.job_id = p.left_job_id AND t.namespace_first
            WHERE p.guild_id = :guild AND v.counted
            GROUP BY t.namespace, p.left_revision, p.right_revision, p.production_side, v.choice
            """,
            {"cap": max_per_day, "guild": guild_id},
        )
        return [_count(row, namespace=row["namespace"]) for row in rows]

    async def arena_production(self, *, guild_id: int) -> str | None:
        """Return the revision that rendered the production side of a server's newest pair that had one."""
        rows = await self._rows(
            """
            SELECT CASE production_side WHEN 'left' THEN left_revision ELSE right_revision END AS revision
            FROM arena_pairs WHERE guild_id = ? AND production_side IS NOT NULL ORDER BY id DESC LIMIT 1
            """,
            (guild_id,),
        )
        return rows[0]["revision"] if rows else None

    async def arena_voters(self, *, guild_id: int) -> list[VoterCounts]:
        """Return each member's arena votes in a server (every vote stored), for spotting suspicious voting."""
        rows = await self._rows(
            """
            SELECT v.user_id, COUNT(*) AS votes, SUM(v.choice = 'left') AS left, SUM(v.choice = 'right') AS right,
                   SUM(v.choice = 'tie') AS tie, SUM(v.choice = 'both_bad') AS both_bad,
                   COALESCE(SUM(v.seconds < 1), 0) AS fast
            FROM arena_votes v JOIN arena_pairs p ON p.id = v.pair_id
            WHERE p.guild_id = ?
            GROUP BY v.user_id
            """,
            (guild_id,),
        )
        return [
            VoterCounts(
                user_id=row["user_id"],
                votes=row["votes"],
                left=row["left"],
                right=row["right"],
                tie=row["tie"],
                both_bad=row["both_bad"],
                fast=row["fast"],
            )
            for row in rows
        ]

    async def arena_votes_export(
        self,
        *,
        max_per_day: int,
        since: float | None = None,
        until: float | None = None,
        revision: str | None = None,
        chunk: int = 500,
    ) -> AsyncGenerator[dict[str, Any]]:
        """Yield each counted vote that picked a side or called a tie, with its pair, both images and the job that
        made them, oldest first; streamed in chunks so memory does not grow with the number of votes."""
        sql = f"""
            WITH {_COUNTED}
            SELECT v.pair_id, v.user_id, v.choice, v.voted_at, v.seconds,
                   p.guild_id, p.left_job_id, p.left_index, p.left_revision, p.right_job_id, p.right_index,
                   p.right_revision, p.production_side,
                   l.seed AS left_seed, l.file AS left_file, l.deleted_at AS left_deleted_at,
                   r.seed AS right_seed, r.file AS right_file, r.deleted_at AS right_deleted_at,
                   j.prompt, j.negative_prompt, j.steps, j.guidance, j.width, j.height, j.scheduler,
                   (SELECT group_concat(t.namespace || ':' || t.tag, '|') FROM job_tags t WHERE t.job_id = j.id)
                       AS tags
            FROM counted_votes v JOIN arena_pairs p ON p.id = v.pair_id
                 JOIN images l ON l.job_id = p.left_job_id AND l.idx = p.left_index
                 JOIN images r ON r.job_id = p.right_job_id AND r.idx = p.right_index
                 JOIN jobs j ON j.id = p.left_job_id
            WHERE {_EXPORT_FILTER} AND v.choice <> 'both_bad'
            ORDER BY v.voted_at, v.pair_id, v.user_id
        """
        parameters = {"cap": max_per_day, "since": since, "until": until, "revision": revision}
        async with self._db.execute(sql, parameters) as cursor:
            while rows := await cursor.fetchmany(chunk):
                for row in rows:
                    record = dict(row)
                    record["tags"] = record["tags"].split("|") if record["tags"] else []
                    yield record

    async def arena_votes_export_count(
        self, *, max_per_day: int, since: float | None = None, until: float | None = None, revision: str | None = None
    ) -> tuple[int, int]:
        """Return how many votes ``arena_votes_export`` yields with the same filters, and how many "both bad"
        votes it leaves out."""
        sql = f"""
            WITH {_COUNTED}
            SELECT COALESCE(SUM(v.choice <> 'both_bad'), 0), COALESCE(SUM(v.choice = 'both_bad'), 0)
            FROM counted_votes v JOIN arena_pairs p ON p.id = v.pair_id
            WHERE {_EXPORT_FILTER}
        """
        parameters = {"cap": max_per_day, "since": since, "until": until, "revision": revision}
        async with self._db.execute(sql, parameters) as cursor:
            row = await cursor.fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)


# Which counted votes the pairs export takes; named parameters :since, :until and :revision (either side's).
_EXPORT_FILTER = """
    v.counted
    AND (:since IS NULL OR v.voted_at >= :since)
    AND (:until IS NULL OR v.voted_at < :until)
    AND (:revision IS NULL OR p.left_revision = :revision OR p.right_revision = :revision)
"""


def _pair(row: Any) -> ArenaPair:
    return ArenaPair(
        id=row["id"],
        guild_id=row["guild_id"],
        channel_id=row["channel_id"],
        requester_id=row["requester_id"],
        left=(row["left_job_id"], row["left_index"]),
        right=(row["right_job_id"], row["right_index"]),
        left_revision=row["left_revision"],
        right_revision=row["right_revision"],
        production_side=row["production_side"],
        message_id=row["message_id"],
        created_at=row["created_at"],
        posted_at=row["posted_at"],
    )


def _count(row: Any, namespace: str | None = None) -> ArenaCount:
    return ArenaCount(
        left_revision=row["left_revision"],
        right_revision=row["right_revision"],
        production_side=row["production_side"],
        choice=row["choice"],
        votes=int(row["votes"]),
        namespace=namespace,
    )
