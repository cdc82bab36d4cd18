"""The statistics family: a server's (or one member's) images and votes by model revision, hour, tag and
namespace, read from covering indexes only, in the order they group by (migration 0004). Deleted images count."""

from __future__ import annotations

from dataclasses import dataclass

from bot.storage._store import Store


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


class Stats(Store):
    """Count images and votes for /stats."""

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


def _stats_scope(guild_id: int, user_id: int | None) -> tuple[str, tuple[object, ...]]:
    """Return the condition and parameters that pick a server's rows, or one member's there."""
    if user_id is None:
        return "guild_id = ?", (guild_id,)
    return "guild_id = ? AND user_id = ?", (guild_id, user_id)
