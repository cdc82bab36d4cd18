"""The blind A/B arena between model revisions: record pairs and votes, and rate the revisions from the votes.

Ratings, as /stats arena shows them:

- Each candidate's win rate against production, ties counting half: ``(wins + ties / 2) / (wins + losses + ties)``,
  with a Wilson 95% score interval. "Both bad" votes are not decisive and count in no rate; they are reported.
- With three or more revisions, Bradley-Terry strengths fitted by Zermelo's MM iterations (Hunter 2004) with ties
  as half a win to each side, shown as Elo: ``1000 + 400 · log10(strength / production's strength)``; 95% intervals
  are the 2.5 and 97.5 percentiles of the fits to votes resampled with replacement (a seeded generator: the same
  votes always give the same intervals). With two revisions the fit is the win rate itself: the gap is
  ``400 · log10(p / (1 - p))``.
- Members whose votes look automatic are counted (never named): at least 20 votes with 95% or more the same choice,
  or more than half of at least 5 votes cast within a second of the post.
- A member's votes past ``arena.max_votes_per_day`` in a UTC day are stored but not counted.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from PIL import Image

from bot.storage import ArenaCount, ArenaPair, Database, PairTally, VoterCounts

log = logging.getLogger(__name__)

Z95 = 1.959963984540054  # the standard normal's 97.5th percentile
ELO_ANCHOR = 1000.0  # production's rating
ELO_SCALE = 400 / math.log(10)  # Elo points per unit of log strength: 400 points = 10 times the odds
BOOTSTRAP_ROUNDS = 200
BOOTSTRAP_SEED = 16
# A hundredth of a tie between each revision and the anchor: keeps a revision that never won (or never lost) at a
# finite rating, and one never compared with production tied to it; it moves a rating by hundredths of a point.
PRIOR_TIES = 0.01
SUSPICIOUS_MIN_VOTES = 20
SUSPICIOUS_SAME_SHARE = 0.95
FAST_MIN_VOTES = 5
FAST_SECONDS = 1.0  # the storage counts votes under this as fast


class Choice(StrEnum):
    """A vote on a pair: the buttons Left, Right, Tie and Both bad."""

    LEFT = "left"
    RIGHT = "right"
    TIE = "tie"
    BOTH_BAD = "both_bad"


@dataclass(frozen=True, slots=True)
class Record:
    """One revision's votes against another: wins, losses and ties are decisive or half; both bad is neither."""

    wins: int = 0
    losses: int = 0
    ties: int = 0
    both_bad: int = 0

    @property
    def decisive(self) -> int:
        return self.wins + self.losses

    @property
    def votes(self) -> int:
        """The votes in the win rate: decisive ones and ties."""
        return self.wins + self.losses + self.ties

    @property
    def score(self) -> float:
        return self.wins + self.ties / 2

    @property
    def rate(self) -> float | None:
        """Return the win rate with ties as half, or None without votes."""
        return self.score / self.votes if self.votes else None

    @property
    def interval(self) -> tuple[float, float] | None:
        return wilson(self.score, self.votes) if self.votes else None

    def __add__(self, other: Record) -> Record:
        return Record(
            self.wins + other.wins,
            self.losses + other.losses,
            self.ties + other.ties,
            self.both_bad + other.both_bad,
        )


@dataclass(frozen=True, slots=True)
class Matchup:
    """A candidate's votes against the production revision."""

    candidate: str
    production: str
    record: Record


@dataclass(frozen=True, slots=True)
class Rating:
    """A revision's Bradley-Terry rating on the Elo scale, production at ``ELO_ANCHOR``, with its 95% interval."""

    revision: str
    elo: float
    low: float
    high: float
    votes: int  # the votes (decisive or tie) it took part in


@dataclass(frozen=True, slots=True)
class Standings:
    """What /stats arena shows for a server."""

    production: str | None  # the revision of the production side of the newest pair
    matchups: tuple[Matchup, ...]  # candidates against production, most votes first
    ratings: tuple[Rating, ...]  # best first; empty with fewer than three revisions
    namespaces: tuple[tuple[str, tuple[Matchup, ...]], ...]  # the same matchups for prompts with a namespace's tags
    both_bad: int  # counted votes that called both images bad
    uncounted: int  # votes past a member's daily cap
    suspicious: int  # members whose votes look automatic
    voters: int
    max_votes_per_day: int
    revisions: int  # revisions with counted votes


@dataclass(frozen=True, slots=True)
class Reveal:
    """What a voter sees after voting: which revision was which, and the pair's votes so far."""

    pair: ArenaPair
    choice: Choice
    tally: PairTally
    counted: bool  # False: past the member's daily cap, stored but not counted

    @property
    def left_revision(self) -> str:
        return self.pair.left_revision

    @property
    def right_revision(self) -> str:
        return self.pair.right_revision

    @property
    def production_side(self) -> str | None:
        return self.pair.production_side


def wilson(successes: float, trials: float, z: float = Z95) -> tuple[float, float]:
    """Return the Wilson score interval of ``successes`` in ``trials`` (0 < trials; successes may be fractional)."""
    if trials <= 0:
        raise ValueError(f"trials must be more than 0, got {trials}")
    p = successes / trials
    z2 = z * z
    denominator = 1 + z2 / trials
    centre = (p + z2 / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


# Results between two revisions (a, b) with a < b: (a's wins, b's wins, ties).
Results = Mapping[tuple[str, str], tuple[float, float, float]]


def bradley_terry(
    results: Results, *, anchor: str, prior_ties: float = PRIOR_TIES, tolerance: float = 1e-10, limit: int = 10_000
) -> dict[str, float]:
    """Fit Bradley-Terry strengths by Zermelo's MM iterations, ties as half a win each, and return each revision's
    Elo: ``ELO_ANCHOR + 400 · log10(strength / anchor's strength)``.

    ``prior_ties`` virtual ties between every revision and ``anchor`` keep every strength finite.
    """
    names = sorted({name for key in results for name in key} | {anchor})
    position = {name: number for number, name in enumerate(names)}
    size = len(names)
    games = np.zeros((size, size))
    scores = np.zeros(size)
    for (a, b), (a_wins, b_wins, ties) in results.items():
        i, j = position[a], position[b]
        total = a_wins + b_wins + ties
        games[i, j] += total
        games[j, i] += total
        scores[i] += a_wins + ties / 2
        scores[j] += b_wins + ties / 2
    k = position[anchor]
    for i in range(size):
        if i != k:
            games[i, k] += prior_ties
            games[k, i] += prior_ties
            scores[i] += prior_ties / 2
            scores[k] += prior_ties / 2
    strengths = np.ones(size)
    for _ in range(limit):
        # MM step: p_i ← W_i / Σ_j n_ij / (p_i + p_j); then rescale so the anchor stays at 1.
        updated = scores / (games / (strengths[:, None] + strengths[None, :])).sum(axis=1)
        updated /= updated[k]
        change = float(np.max(np.abs(np.log(updated) - np.log(strengths))))
        strengths = updated
        if change < tolerance:
            break
    else:
        log.debug("Bradley–Terry fit stopped after %d iterations", limit)
    return {name: ELO_ANCHOR + ELO_SCALE * math.log(strengths[position[name]]) for name in names}


def bootstrap(
    results: Results, *, anchor: str, rounds: int = BOOTSTRAP_ROUNDS, seed: int = BOOTSTRAP_SEED
) -> dict[str, tuple[float, float]]:
    """Return each revision's 95% Elo interval: the 2.5 and 97.5 percentiles of fits to votes resampled with
    replacement (as many as there are, drawn from the observed ones); deterministic for a given seed."""
    cells: list[tuple[tuple[str, str], int]] = []
    counts: list[float] = []
    for key, outcome in sorted(results.items()):
        for which, count in enumerate(outcome):
            if count:
                cells.append((key, which))
                counts.append(count)
    total = round(sum(counts))
    names = sorted({name for key in results for name in key} | {anchor})
    if not total:
        return {name: (ELO_ANCHOR, ELO_ANCHOR) for name in names}
    generator = np.random.default_rng(seed)
    probabilities = np.array(counts) / sum(counts)
    fits: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        drawn = generator.multinomial(total, probabilities)
        sample: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
        for (key, which), count in zip(cells, drawn, strict=True):
            sample[key][which] += float(count)
        elo = bradley_terry({key: (v[0], v[1], v[2]) for key, v in sample.items()}, anchor=anchor, limit=2_000)
        for name in names:
            fits[name].append(elo.get(name, ELO_ANCHOR))
    return {name: (float(np.percentile(fit, 2.5)), float(np.percentile(fit, 97.5))) for name, fit in fits.items()}


def suspicious(voter: VoterCounts) -> bool:
    """Return whether a member's votes look automatic: nearly all the same choice, or mostly within a second."""
    same = max(voter.left, voter.right, voter.tie, voter.both_bad)
    if voter.votes >= SUSPICIOUS_MIN_VOTES and same >= SUSPICIOUS_SAME_SHARE * voter.votes:
        return True
    return voter.votes >= FAST_MIN_VOTES and voter.fast * 2 > voter.votes


def matchups(counts: Iterable[ArenaCount]) -> list[Matchup]:
    """Return each candidate's record against the production revision it was shown with, most votes first."""
    records: dict[tuple[str, str], Record] = defaultdict(Record)
    for count in counts:
        if count.production_side is None:
            continue
        if count.production_side == "left":
            production, candidate, candidate_side = count.left_revision, count.right_revision, "right"
        else:
            production, candidate, candidate_side = count.right_revision, count.left_revision, "left"
        records[candidate, production] += _record(count.choice, count.votes, candidate_side)
    found = [Matchup(candidate, production, record) for (candidate, production), record in records.items()]
    return sorted(found, key=lambda item: (-item.record.votes, item.candidate, item.production))


def results(counts: Iterable[ArenaCount]) -> dict[tuple[str, str], tuple[float, float, float]]:
    """Return the wins and ties between each two different revisions, both bad left out."""
    found: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    for count in counts:
        left, right = count.left_revision, count.right_revision
        if left == right or count.choice == Choice.BOTH_BAD:
            continue
        key = (left, right) if left < right else (right, left)
        if count.choice == Choice.TIE:
            found[key][2] += count.votes
        else:
            winner = left if count.choice == Choice.LEFT else right
            found[key][0 if winner == key[0] else 1] += count.votes
    return {key: (value[0], value[1], value[2]) for key, value in found.items()}


def ratings(counts: Sequence[ArenaCount], *, anchor: str) -> list[Rating]:
    """Return every revision's Elo with its bootstrap interval, best first."""
    played = results(counts)
    elo = bradley_terry(played, anchor=anchor)
    intervals = bootstrap(played, anchor=anchor)
    votes: dict[str, int] = defaultdict(int)
    for (a, b), outcome in played.items():
        votes[a] += int(sum(outcome))
        votes[b] += int(sum(outcome))
    found = [Rating(name, elo[name], *intervals[name], votes=votes[name]) for name in elo]
    return sorted(found, key=lambda item: (-item.elo, item.revision))


async def standings(db: Database, *, guild_id: int, max_votes_per_day: int) -> Standings:
    """Compute a server's arena standings from its counted votes."""
    counts, uncounted = await db.arena_counts(guild_id=guild_id, max_per_day=max_votes_per_day)
    by_namespace: dict[str, list[ArenaCount]] = defaultdict(list)
    for count in await db.arena_namespace_counts(guild_id=guild_id, max_per_day=max_votes_per_day):
        assert count.namespace is not None
        by_namespace[count.namespace].append(count)
    voters = await db.arena_voters(guild_id=guild_id)
    production = await db.arena_production(guild_id=guild_id)
    revisions = {count.left_revision for count in counts} | {count.right_revision for count in counts}
    rated: list[Rating] = []
    if len(revisions) >= 3:
        # The bootstrap fits the model a few hundred times: off the event loop.
        rated = await asyncio.to_thread(ratings, counts, anchor=production or _most_shown(counts))
    return Standings(
        production=production,
        matchups=tuple(matchups(counts)),
        ratings=tuple(rated),
        namespaces=tuple(
            (namespace, tuple(found))
            for namespace, namespace_counts in sorted(by_namespace.items())
            if (found := matchups(namespace_counts))
        ),
        both_bad=sum(count.votes for count in counts if count.choice == Choice.BOTH_BAD),
        uncounted=uncounted,
        suspicious=sum(suspicious(voter) for voter in voters),
        voters=len(voters),
        max_votes_per_day=max_votes_per_day,
        revisions=len(revisions),
    )


async def record_pair(
    db: Database,
    *,
    guild_id: int | None,
    channel_id: int,
    requester_id: int,
    left: tuple[int, int],
    right: tuple[int, int],
    production_side: str | None,
) -> ArenaPair:
    """Store a pair of two recorded images, ``left`` and ``right`` as (job id, image index), shown in that order."""
    if production_side not in ("left", "right", None):
        raise ValueError(f"production_side must be 'left', 'right' or None, got {production_side!r}")
    return await db.record_arena_pair(
        guild_id=guild_id,
        channel_id=channel_id,
        requester_id=requester_id,
        left=left,
        right=right,
        production_side=production_side,
    )


async def vote(
    db: Database, *, pair_id: int, member: int, choice: Choice | str, seconds: float | None, max_votes_per_day: int
) -> Reveal:
    """Store a member's vote on a pair (replacing theirs) and return the reveal: both revisions, which side was
    which, the pair's votes, and whether the vote counts under the daily cap."""
    choice = Choice(choice)
    pair = await db.arena_pair(pair_id=pair_id)
    if pair is None:
        raise ValueError(f"no arena pair {pair_id}")
    tally = await db.record_arena_vote(pair_id=pair_id, user_id=member, choice=choice.value, seconds=seconds)
    counted = await db.arena_vote_counted(pair_id=pair_id, user_id=member, max_per_day=max_votes_per_day)
    return Reveal(pair=pair, choice=choice, tally=tally, counted=counted)


def anonymous_png(png: bytes) -> bytes:
    """Return a PNG's pixels without its text chunks (they name the model revision that rendered it)."""
    with Image.open(io.BytesIO(png)) as image:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def _record(choice: str, votes: int, side: str) -> Record:
    """Return ``votes`` votes of ``choice`` as the record of the revision shown on ``side``."""
    if choice == Choice.TIE:
        return Record(ties=votes)
    if choice == Choice.BOTH_BAD:
        return Record(both_bad=votes)
    return Record(wins=votes) if choice == side else Record(losses=votes)


def _most_shown(counts: Iterable[ArenaCount]) -> str:
    """Return the revision in the most counted votes (the first by name among equals): the anchor without production."""
    shown: dict[str, int] = defaultdict(int)
    for count in counts:
        shown[count.left_revision] += count.votes
        shown[count.right_revision] += count.votes
    return min(shown, key=lambda name: (-shown[name], name))
