"""The vote family: each member's vote on each image, cast, changed or withdrawn, and an image's tally."""

from __future__ import annotations

from dataclasses import dataclass

from bot.storage._store import Store, clock


@dataclass(frozen=True, slots=True)
class VoteTally:
    """The votes on one image after a change, and the voter's own vote (0 when withdrawn)."""

    up: int
    down: int
    mine: int


class Votes(Store):
    """Store votes on images."""

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
                    (job_id, index, user_id, vote, clock()),
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
