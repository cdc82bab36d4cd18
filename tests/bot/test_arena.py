"""The arena's ratings against values worked out by hand, and its storage: one vote per member, changes, the cap."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import pytest

from bot import arena
from bot.arena import Choice, Record, bootstrap, bradley_terry, wilson
from bot.storage import Database, PairTally, VoterCounts
from tests import _arena as plant

DAY = 86_400.0


@pytest.fixture
async def db() -> AsyncIterator[Database]:
    async with await Database.open(":memory:") as database:
        yield database


# Wilson 95% intervals worked out from (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n) with z = 1.96.
@pytest.mark.parametrize(
    ("successes", "trials", "low", "high"),
    [(20, 30, 0.4878, 0.8077), (24, 30, 0.6269, 0.9050), (70, 100, 0.6041, 0.7811), (0, 10, 0.0, 0.2775)],
)
def test_wilson_interval_matches_the_formula(successes: int, trials: int, low: float, high: float) -> None:
    found = wilson(successes, trials)
    assert found == pytest.approx((low, high), abs=2e-4)


def test_two_revisions_rate_as_the_closed_form() -> None:
    # With two revisions Bradley-Terry is the win rate: the gap is 400·log10(p / (1 - p)), p = 70/100 → 147.19.
    elo = bradley_terry({("cand", "prod"): (60, 20, 20)}, anchor="prod")  # ties count half: 70 of 100
    assert elo["prod"] == 1000
    assert elo["cand"] == pytest.approx(1000 + 147.19, abs=0.1)


def test_three_revisions_rate_as_their_planted_strengths() -> None:
    # Votes planted exactly at strengths prod 1, a 2, b 4 (a beats prod 2/3 of the time, b beats prod 4/5, b beats
    # a 2/3): the likelihood's maximum is those strengths, so Elo is 1000 + 400·log10(2) and 1000 + 400·log10(4).
    results = {("a", "prod"): (18, 8, 4), ("b", "prod"): (24, 6, 0), ("a", "b"): (8, 18, 4)}
    elo = bradley_terry(results, anchor="prod")
    assert elo == pytest.approx({"prod": 1000, "a": 1120.41, "b": 1240.82}, abs=0.25)
    # The fit satisfies the likelihood equations: each revision's score equals its expected score.
    strength = {name: 10 ** ((value - 1000) / 400) for name, value in elo.items()}
    for name in strength:
        score = expected = 0.0
        for (one, other), (one_wins, other_wins, ties) in results.items():
            if name in (one, other):
                mine, theirs = (one_wins, other) if name == one else (other_wins, one)
                score += mine + ties / 2
                expected += (one_wins + other_wins + ties) * strength[name] / (strength[name] + strength[theirs])
        assert score == pytest.approx(expected, abs=0.05)


def test_a_revision_that_never_won_keeps_a_finite_rating() -> None:
    elo = bradley_terry({("a", "prod"): (0, 30, 0), ("b", "prod"): (15, 15, 0)}, anchor="prod")
    assert math.isfinite(elo["a"]) and elo["a"] < 600
    assert elo["b"] == pytest.approx(1000, abs=0.1)


def test_bootstrap_intervals_are_deterministic_and_hold_the_fit() -> None:
    results = {("a", "prod"): (18, 8, 4), ("b", "prod"): (24, 6, 0), ("a", "b"): (8, 18, 4)}
    first, again = bootstrap(results, anchor="prod"), bootstrap(results, anchor="prod")
    assert first == again
    assert first["prod"] == (1000, 1000)
    for name, value in {"a": 1120.41, "b": 1240.82}.items():
        low, high = first[name]
        assert low < value < high
        assert 50 < high - low < 400  # 30-odd votes a matchup: wide, but not unbounded


def test_a_record_counts_ties_half_and_both_bad_nowhere() -> None:
    record = Record(wins=6, losses=2, ties=2, both_bad=5)
    assert (record.decisive, record.votes, record.rate) == (8, 10, 0.7)
    assert record.interval == pytest.approx(wilson(7, 10))


async def test_standings_match_the_hand_computed_ratings(db: Database) -> None:
    # The same planted strengths, voted through pairs with production on either side.
    a_vs_prod = await plant.pair(db, left="prod", right="a", production="prod")
    b_vs_prod = await plant.pair(db, left="b", right="prod", production="prod", tags=(("studio", "dc"),))
    a_vs_b = await plant.pair(db, left="a", right="b")  # two candidates: in the ratings only
    member = await plant.votes(db, a_vs_prod.id, {"right": 18, "left": 8, "tie": 4})
    member = await plant.votes(db, b_vs_prod.id, {"left": 24, "right": 6, "both_bad": 3}, first_member=member)
    await plant.votes(db, a_vs_b.id, {"left": 8, "right": 18, "tie": 4}, first_member=member)

    found = await arena.standings(db, guild_id=10, max_votes_per_day=200)
    assert found.production == "prod"
    assert [(m.candidate, m.production, m.record) for m in found.matchups] == [  # most votes first, then by name
        ("a", "prod", Record(wins=18, losses=8, ties=4)),
        ("b", "prod", Record(wins=24, losses=6, both_bad=3)),
    ]
    assert found.matchups[0].record.rate == pytest.approx(2 / 3)
    assert found.matchups[0].record.interval == pytest.approx((0.4878, 0.8077), abs=2e-4)
    assert found.matchups[1].record.interval == pytest.approx((0.6269, 0.9050), abs=2e-4)
    assert [(r.revision, round(r.elo, 1), r.votes) for r in found.ratings] == [
        ("b", 1240.7, 60),
        ("a", 1120.3, 60),
        ("prod", 1000.0, 60),
    ]
    assert found.ratings[0].elo == pytest.approx(1240.82, abs=0.25)
    assert found.both_bad == 3 and found.uncounted == 0 and found.revisions == 3
    assert found.voters == 93 and found.suspicious == 0
    # By namespace: species prompts showed a against prod, studio prompts b.
    assert [(namespace, [(m.candidate, m.record.votes) for m in items]) for namespace, items in found.namespaces] == [
        ("species", [("a", 30)]),
        ("studio", [("b", 30)]),
    ]


async def test_two_revisions_show_no_ratings(db: Database) -> None:
    shown = await plant.pair(db, left="prod", right="cand", production="prod")
    await plant.votes(db, shown.id, {"right": 7, "left": 3})
    found = await arena.standings(db, guild_id=10, max_votes_per_day=200)
    assert found.ratings == ()
    assert [(m.candidate, m.record.rate) for m in found.matchups] == [("cand", 0.7)]
    assert (await arena.standings(db, guild_id=11, max_votes_per_day=200)).voters == 0  # another server's: none


async def test_one_vote_per_member_per_pair_and_changing_it_replaces_it(db: Database) -> None:
    shown = await plant.pair(db, left="prod", right="cand", production="prod")
    first = await arena.vote(db, pair_id=shown.id, member=5, choice="left", seconds=3.0, max_votes_per_day=200)
    assert (first.left_revision, first.right_revision, first.production_side) == ("prod", "cand", "left")
    assert first.tally == PairTally(left=1) and first.counted
    other = await arena.vote(db, pair_id=shown.id, member=6, choice=Choice.TIE, seconds=4.0, max_votes_per_day=200)
    assert other.tally == PairTally(left=1, tie=1)
    changed = await arena.vote(db, pair_id=shown.id, member=5, choice="right", seconds=9.0, max_votes_per_day=200)
    assert changed.tally == PairTally(right=1, tie=1)  # the requester's own vote or anyone's: one each
    counts, uncounted = await db.arena_counts(guild_id=10, max_per_day=200)
    assert sorted((c.choice, c.votes) for c in counts) == [("right", 1), ("tie", 1)] and uncounted == 0
    with pytest.raises(ValueError, match="choice must be one of left, right, tie, both_bad"):
        await db.record_arena_vote(pair_id=shown.id, user_id=5, choice="up")
    with pytest.raises(ValueError, match="no arena pair 999"):
        await arena.vote(db, pair_id=999, member=5, choice="left", seconds=1.0, max_votes_per_day=200)


async def test_seconds_default_to_the_time_since_the_post(db: Database) -> None:
    shown = await plant.pair(db, left="prod", right="cand", production="prod")  # posted at 1000.0
    await db.record_arena_vote(pair_id=shown.id, user_id=5, choice="left", at=1_002.5)
    (voter,) = await db.arena_voters(guild_id=10)
    assert voter == VoterCounts(user_id=5, votes=1, left=1, right=0, tie=0, both_bad=0, fast=0)


async def test_votes_past_the_daily_cap_are_stored_but_not_counted(db: Database) -> None:
    pairs = [await plant.pair(db, left="prod", right="cand", production="prod") for _ in range(4)]
    day = 20_000 * DAY  # midnight UTC
    for number, shown in enumerate(pairs[:3]):  # three on one day: the third is past a cap of two
        await db.record_arena_vote(pair_id=shown.id, user_id=5, choice="right", seconds=5, at=day + 60 * number)
    await db.record_arena_vote(pair_id=pairs[3].id, user_id=5, choice="right", seconds=5, at=day + DAY + 1)
    counted = [await db.arena_vote_counted(pair_id=shown.id, user_id=5, max_per_day=2) for shown in pairs]
    assert counted == [True, True, False, True]  # the next UTC day counts afresh
    found = await arena.standings(db, guild_id=10, max_votes_per_day=2)
    assert found.uncounted == 1 and found.matchups[0].record == Record(wins=3)
    assert await db.pair_tally(pair_id=pairs[2].id) == PairTally(right=1)  # stored all the same


async def test_members_voting_automatically_are_counted_as_suspicious(db: Database) -> None:
    pairs = [await plant.pair(db, left="prod", right="cand", production="prod") for _ in range(20)]
    for number, shown in enumerate(pairs):
        await db.record_arena_vote(pair_id=shown.id, user_id=1, choice="left", seconds=5)  # always left
        await db.record_arena_vote(pair_id=shown.id, user_id=2, choice=("left", "right")[number % 2], seconds=0.4)
        await db.record_arena_vote(pair_id=shown.id, user_id=3, choice=("left", "right")[number % 2], seconds=6)
        if number < 19:  # 19 of 20 left is 95%
            await db.record_arena_vote(pair_id=shown.id, user_id=4, choice="left", seconds=6)
    await db.record_arena_vote(pair_id=pairs[19].id, user_id=4, choice="tie", seconds=6)
    voters = {voter.user_id: arena.suspicious(voter) for voter in await db.arena_voters(guild_id=10)}
    assert voters == {1: True, 2: True, 3: False, 4: True}
    assert (await arena.standings(db, guild_id=10, max_votes_per_day=200)).suspicious == 3


async def test_a_pair_needs_two_recorded_images_with_revisions(db: Database) -> None:
    shown = await plant.image(db, revision="prod")
    other = await plant.image(db, revision="cand")
    options = {"guild_id": 10, "channel_id": 20, "requester_id": 1, "production_side": "left"}
    with pytest.raises(ValueError, match="two different images"):
        await arena.record_pair(db, left=shown, right=shown, **options)
    with pytest.raises(ValueError, match="image 3 of job 1 is not recorded"):
        await arena.record_pair(db, left=shown, right=(shown[0], 3), **options)
    with pytest.raises(ValueError, match="production_side must be"):
        await arena.record_pair(db, left=shown, right=other, **{**options, "production_side": "middle"})
    made = await arena.record_pair(db, left=shown, right=other, **options)
    assert (made.left, made.right, made.left_revision, made.right_revision) == (shown, other, "prod", "cand")
    assert made.message_id is None
    await db.set_arena_message(pair_id=made.id, message_id=77)
    again = await db.arena_pair(pair_id=made.id)
    assert again is not None and again.message_id == 77 and again.posted_at is not None


async def test_forgetting_an_image_takes_its_pairs_and_votes(db: Database) -> None:
    shown = await plant.pair(db, left="prod", right="cand", production="prod")
    await plant.votes(db, shown.id, {"left": 2})
    await db.delete_images(job_id=shown.right[0], forget=True)
    assert await db.arena_pair(pair_id=shown.id) is None
    assert await db.arena_voters(guild_id=10) == []
