"""The figures /stats shows for a server or one member: images, votes, approval and where it is high or low."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from bot.storage import Database, TagCounts

log = logging.getLogger(__name__)

TOP = 3  # namespaces, tags and hours shown at each end


@dataclass(frozen=True, slots=True)
class Approval:
    """Up and down votes; the approval rate is the share of up votes."""

    up: int = 0
    down: int = 0

    @property
    def votes(self) -> int:
        return self.up + self.down

    @property
    def rate(self) -> float | None:
        """Return up / (up + down), or None without votes."""
        return self.up / self.votes if self.votes else None

    def __add__(self, other: Approval) -> Approval:
        return Approval(self.up + other.up, self.down + other.down)


@dataclass(frozen=True, slots=True)
class Rated:
    """A namespace (``species``) or tag (``species:seal``) and the votes on the images that used it."""

    name: str
    approval: Approval


@dataclass(frozen=True, slots=True)
class RevisionFigures:
    """The images one model revision made and the votes on them; ``revision`` None: made before it was recorded."""

    revision: str | None
    images: int
    approval: Approval
    latest: float | None


@dataclass(frozen=True, slots=True)
class Figures:
    """What /stats shows: for a server (``user_id`` None), or for the images one member made there."""

    guild_id: int
    user_id: int | None
    min_votes: int
    images: int
    approval: Approval
    best_namespaces: tuple[Rated, ...]
    worst_namespaces: tuple[Rated, ...]
    best_tags: tuple[Rated, ...]
    worst_tags: tuple[Rated, ...]
    busiest_hours: tuple[tuple[int, int], ...]  # (hour of the day in UTC, images), busiest first
    revisions: tuple[RevisionFigures, ...]  # newest first, then images of no recorded revision
    cast: Approval | None  # the votes the member cast in the server; None for the server's figures


async def figures(db: Database, *, guild_id: int, user_id: int | None = None, min_votes: int = 3) -> Figures:
    """Compute a server's figures, or (with ``user_id``) those of the images the member made there.

    Deleted images count: their rows stay for the statistics. Namespaces and tags are ranked only with at least
    ``min_votes`` votes.
    """
    counts = await db.image_counts(guild_id=guild_id, user_id=user_id)
    namespaces = await db.namespace_counts(guild_id=guild_id, user_id=user_id, min_votes=min_votes)
    tags = await db.tag_counts(guild_id=guild_id, user_id=user_id, min_votes=min_votes)
    cast = None
    if user_id is not None:
        up, down = await db.votes_cast(guild_id=guild_id, user_id=user_id)
        cast = Approval(up, down)

    hours: Counter[int] = Counter()
    revisions: dict[str | None, RevisionFigures] = {}
    for row in counts:
        if row.hour is not None:
            hours[row.hour] += row.images
        seen = revisions.get(row.revision, RevisionFigures(row.revision, 0, Approval(), None))
        latest = max((at for at in (seen.latest, row.latest) if at is not None), default=None)
        revisions[row.revision] = RevisionFigures(
            row.revision, seen.images + row.images, seen.approval + Approval(row.up, row.down), latest
        )
    best_namespaces, worst_namespaces = ranked(_rated(namespaces))
    best_tags, worst_tags = ranked(_rated(tags))
    return Figures(
        guild_id=guild_id,
        user_id=user_id,
        min_votes=min_votes,
        images=sum(row.images for row in counts),
        approval=sum((row.approval for row in revisions.values()), Approval()),
        best_namespaces=best_namespaces,
        worst_namespaces=worst_namespaces,
        best_tags=best_tags,
        worst_tags=worst_tags,
        busiest_hours=tuple(sorted(hours.items(), key=lambda item: (-item[1], item[0]))[:TOP]),
        revisions=tuple(sorted(revisions.values(), key=_newest_first)),
        cast=cast,
    )


def ranked(items: Iterable[Rated], top: int = TOP) -> tuple[tuple[Rated, ...], tuple[Rated, ...]]:
    """Return up to ``top`` of the best-approved, best first, and up to ``top`` of the others, worst first.

    With fewer than ``2 * top`` the best get the larger half. Equal rates put more votes (the surer figure) first.
    """
    voted = sorted(
        (item for item in items if item.approval.votes),
        key=lambda item: (-_rate(item), -item.approval.votes, item.name),
    )
    count = min(top, (len(voted) + 1) // 2)
    worst = sorted(voted[count:], key=lambda item: (_rate(item), -item.approval.votes, item.name))
    return tuple(voted[:count]), tuple(worst[:top])


def _newest_first(row: RevisionFigures) -> tuple[bool, float]:
    """Sort revisions by their newest image, newest first; images of no recorded revision last."""
    return row.revision is None, -(row.latest or 0.0)


def _rate(item: Rated) -> float:
    return item.approval.rate or 0.0


def _rated(counts: Sequence[TagCounts]) -> list[Rated]:
    return [
        Rated(row.namespace if row.tag is None else f"{row.namespace}:{row.tag}", Approval(row.up, row.down))
        for row in counts
    ]
