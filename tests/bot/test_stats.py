"""/stats' figures: exact on a small server, the same after a migration, and within a second on 100,000 images."""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest

import bot.storage._store
from bot.engine.types import Settings
from bot.jobs import JobKind
from bot.stats import Approval, Figures, Rated, RevisionFigures, figures, ranked
from bot.storage import Database, Provenance
from bot.storage.database import migrations
from tests._bulk import START, bulk_database, bulk_vote

GUILD, ELSEWHERE = 10, 99
DAY = 1_700_006_400  # 2023-11-15 00:00 UTC
HOUR = 3600


class Clock:
    """The database's clock, set by the test, so each image is made at a chosen hour."""

    def __init__(self) -> None:
        self.now = float(DAY)

    def time(self) -> float:
        return self.now


@pytest.fixture
async def db() -> AsyncIterator[Database]:
    async with await Database.open(":memory:") as database:
        yield database


async def _job(
    db: Database, clock: Clock, *, user: int, tags: Sequence[tuple[str, str]], at: float, images: int = 1,
    revision: str | None = None, guild: int = GUILD,
) -> int:  # fmt: skip
    clock.now = at
    job = await db.create_job(
        kind=JobKind.IMAGINE, user_id=user, guild_id=guild, channel_id=3, prompt="p", negative_prompt="", seed=1,
        count=images, settings=Settings(), model="tiny", scheduler="dpm++", tags=tags,
    )  # fmt: skip
    made = None if revision is None else [Provenance(revision, "float32", False, 1, images, 0.0, 0.1)] * images
    await db.record_images(job_id=job.id, seeds=list(range(images)), nsfw=[False] * images, provenance=made)
    return job.id


async def _votes(db: Database, job_id: int, index: int, votes: dict[int, int]) -> None:
    for user, vote in votes.items():
        await db.record_vote(job_id=job_id, index=index, user_id=user, vote=vote)


@pytest.fixture
async def server(db: Database, monkeypatch: pytest.MonkeyPatch) -> Database:
    """Four jobs in GUILD by members 1 and 2, one of them deleted, and one job in another server."""
    clock = Clock()
    monkeypatch.setattr(bot.storage._store, "time", SimpleNamespace(time=clock.time))
    tags = [("species", "seal"), ("species", "cat"), ("studio", "dc")]
    first = await _job(db, clock, user=1, tags=tags, at=DAY + 9 * HOUR, images=2, revision="rev:old")
    await _votes(db, first, 0, {5: 1, 6: 1, 7: 1})
    await _votes(db, first, 1, {5: -1})
    second = await _job(
        db, clock, user=2, tags=[("species", "seal"), ("meta", "highres")], at=DAY + 21 * HOUR, revision="rev:new"
    )
    await _votes(db, second, 0, {5: 1, 6: -1, 7: 1, 1: 1, 8: -1})
    await _votes(db, second, 0, {6: -1, 7: -1})  # 6 withdraws, 7 changes to down: 2 up, 2 down
    await db.delete_images(job_id=second)  # still counted
    third = await _job(db, clock, user=1, tags=[("species", "dog")], at=DAY + 21 * HOUR + 600, revision="rev:new")
    await _votes(db, third, 0, {5: 1})
    await _job(db, clock, user=2, tags=[("studio", "dc")], at=DAY + 21 * HOUR + 1200)  # revision not recorded
    elsewhere = await _job(db, clock, user=1, tags=[("species", "seal")], at=DAY + 3 * HOUR, guild=ELSEWHERE)
    await _votes(db, elsewhere, 0, {5: -1, 6: -1, 7: -1, 1: 1})
    return db


def _names(items: Sequence[Rated]) -> list[tuple[str, int, int]]:
    return [(item.name, item.approval.up, item.approval.down) for item in items]


async def test_server_figures(server: Database) -> None:
    found = await figures(server, guild_id=GUILD, min_votes=3)
    assert (found.images, found.approval, found.cast) == (5, Approval(6, 3), None)
    assert found.approval.rate == pytest.approx(2 / 3)
    # A job counts once per namespace: the first job's two species tags do not count its votes twice.
    assert _names(found.best_namespaces) == [("studio", 3, 1), ("species", 6, 3)]
    assert _names(found.worst_namespaces) == [("meta", 2, 2)]
    # species:dog has 1 vote, under min_votes; equal rates put the name first.
    assert _names(found.best_tags) == [("species:cat", 3, 1), ("studio:dc", 3, 1)]
    assert _names(found.worst_tags) == [("meta:highres", 2, 2), ("species:seal", 5, 3)]
    assert found.busiest_hours == ((21, 3), (9, 2))
    assert found.revisions == (
        RevisionFigures("rev:new", 2, Approval(3, 2), DAY + 21 * HOUR + 600),
        RevisionFigures("rev:old", 2, Approval(3, 1), DAY + 9 * HOUR),
        RevisionFigures(None, 1, Approval(), DAY + 21 * HOUR + 1200),
    )

    lenient = await figures(server, guild_id=GUILD, min_votes=1)
    assert _names(lenient.best_tags)[0] == ("species:dog", 1, 0)
    strict = await figures(server, guild_id=GUILD, min_votes=5)
    assert _names(strict.best_tags) == [("species:seal", 5, 3)] and strict.worst_tags == ()
    assert _names(strict.best_namespaces) == [("species", 6, 3)]


async def test_my_figures_count_only_the_images_i_made_and_the_votes_i_cast_here(server: Database) -> None:
    mine = await figures(server, guild_id=GUILD, user_id=1, min_votes=3)
    assert (mine.images, mine.approval, mine.cast) == (3, Approval(4, 1), Approval(1, 0))
    assert _names(mine.best_namespaces) == [("species", 4, 1)]
    assert _names(mine.worst_namespaces) == [("studio", 3, 1)]
    assert _names(mine.best_tags) == [("species:cat", 3, 1), ("species:seal", 3, 1)]
    assert _names(mine.worst_tags) == [("studio:dc", 3, 1)]
    assert mine.busiest_hours == ((9, 2), (21, 1))
    assert [(row.revision, row.images, row.approval) for row in mine.revisions] == [
        ("rev:new", 1, Approval(1, 0)),
        ("rev:old", 2, Approval(3, 1)),
    ]

    nothing = await figures(server, guild_id=GUILD, user_id=3, min_votes=3)
    assert nothing == Figures(GUILD, 3, 3, 0, Approval(), (), (), (), (), (), (), Approval())
    empty = await figures(server, guild_id=12345, min_votes=3)
    assert (empty.images, empty.approval, empty.revisions, empty.busiest_hours) == (0, Approval(), (), ())


async def test_forgotten_images_and_their_votes_leave_the_figures(server: Database) -> None:
    second_job = 2
    await server.delete_images(job_id=second_job, forget=True)  # storage.forget_deleted
    found = await figures(server, guild_id=GUILD, min_votes=3)
    assert (found.images, found.approval) == (4, Approval(4, 1))
    assert _names(found.best_namespaces + found.worst_namespaces) == [("species", 4, 1), ("studio", 3, 1)]
    assert _names(found.best_tags + found.worst_tags) == [
        ("species:cat", 3, 1),
        ("species:seal", 3, 1),
        ("studio:dc", 3, 1),
    ]
    newest = found.revisions[0]
    assert (newest.revision, newest.images, newest.approval) == ("rev:new", 1, Approval(1, 0))


async def test_an_image_rendered_again_loses_its_votes_in_the_figures_too(server: Database) -> None:
    first_job = 1
    await server.record_images(job_id=first_job, seeds=[1, 2], nsfw=[False, False])  # replaces both rows
    found = await figures(server, guild_id=GUILD, min_votes=1)
    assert (found.images, found.approval) == (5, Approval(3, 2))
    assert _names(found.best_tags) == [("species:dog", 1, 0), ("meta:highres", 2, 2)]
    assert _names(found.worst_tags) == [("species:seal", 2, 2)]


def test_ranking_splits_a_short_list_and_puts_surer_figures_first() -> None:
    def rated(name: str, up: int, down: int) -> Rated:
        return Rated(name, Approval(up, down))

    assert ranked([]) == ((), ())
    assert ranked([rated("a", 1, 0)]) == ((rated("a", 1, 0),), ())
    items = [rated("a", 1, 1), rated("b", 10, 10), rated("c", 3, 0), rated("d", 0, 2), rated("e", 9, 1)]
    best, worst = ranked(items, top=2)
    assert [item.name for item in best] == ["c", "e"]
    assert [item.name for item in worst] == ["d", "b"]  # b and a both 50%: b has more votes


async def test_the_migration_fills_in_what_stats_reads(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    connection = sqlite3.connect(path)
    for number, sql in migrations()[:3]:
        connection.executescript(f"BEGIN; {sql}; PRAGMA user_version = {number}; COMMIT;")
    with connection:
        connection.execute(
            "INSERT INTO jobs (id, kind, user_id, guild_id, channel_id, prompt, seed, count, steps, guidance, width,"
            " height, mode, strength, model, scheduler, status, created_at)"
            " VALUES (1, 'imagine', 1, ?, 3, 'p', 1, 2, 25, 7.0, 512, 512, 'txt2img', 0.6, 'tiny', 'dpm++', 'done', ?)",
            (GUILD, DAY),
        )
        connection.executemany(
            "INSERT INTO images (job_id, idx, seed, model_revision, created_at) VALUES (1, ?, 1, 'rev:old', ?)",
            [(0, DAY + 5 * HOUR), (1, None)],  # the second made before image times were recorded
        )
        connection.executemany(
            "INSERT INTO job_tags (job_id, namespace, tag) VALUES (1, ?, ?)",
            [("species", "seal"), ("species", "cat"), ("studio", "dc")],
        )
        connection.executemany(
            "INSERT INTO votes (job_id, idx, user_id, vote, updated_at) VALUES (1, ?, ?, ?, 0)",
            [(0, 5, 1), (0, 6, 1), (1, 5, -1)],
        )
    connection.close()
    async with await Database.open(path) as db:
        assert await db.schema_version() == len(migrations())
        found = await figures(db, guild_id=GUILD, user_id=1, min_votes=3)
        assert (found.images, found.approval, found.busiest_hours) == (2, Approval(2, 1), ((5, 1),))
        assert _names(found.best_namespaces) == [("species", 2, 1)]  # counted once, not once per species tag
        assert _names(found.best_tags + found.worst_tags) == [
            ("species:cat", 2, 1),
            ("species:seal", 2, 1),
            ("studio:dc", 2, 1),
        ]
        # Votes after the migration are counted by the triggers.
        await db.record_vote(job_id=1, index=1, user_id=5, vote=-1)  # withdrawn
        assert (await figures(db, guild_id=GUILD, min_votes=3)).approval == Approval(2, 0)


NAMESPACES = ("species", "studio", "meta", "medium")
TAGS = [(namespace, f"{namespace} {number}") for namespace in NAMESPACES for number in range(50)]
USERS = tuple(range(100, 150))
VOTERS = (100, 101)  # two of the makers vote on every image
REVISIONS = ("rev:a", "rev:b", "rev:c")


@pytest.mark.slow
async def test_stats_answer_within_a_second_on_100000_images_with_indexed_queries(tmp_path: Path) -> None:
    images = 100_000
    path = tmp_path / "big.db"
    await bulk_database(
        path, images, users=USERS, voters=VOTERS, tags=TAGS, tags_per_job=3, revisions=REVISIONS, seconds_apart=37
    )
    async with await Database.open(path) as db:
        statements: list[str] = []
        await db._db.set_trace_callback(statements.append)  # the SQL the figures run, to explain each below
        started = time.perf_counter()
        server = await figures(db, guild_id=2, min_votes=3)
        server_s = time.perf_counter() - started
        started = time.perf_counter()
        mine = await figures(db, guild_id=2, user_id=USERS[0], min_votes=3)
        mine_s = time.perf_counter() - started
    print(f"/stats on {images:,} images: server {server_s * 1000:.0f} ms, me {mine_s * 1000:.0f} ms")
    assert server_s < 1.0 and mine_s < 1.0

    jobs = range(1, images + 1)
    up = sum(bulk_vote(job, voter) == 1 for job in jobs for voter in VOTERS)
    assert (server.images, server.approval) == (images, Approval(up, images * len(VOTERS) - up))
    hours = Counter(int(START + job * 37) // HOUR % 24 for job in jobs)
    assert server.busiest_hours == tuple(sorted(hours.items(), key=lambda item: (-item[1], item[0]))[:3])
    assert sorted(row.revision or "" for row in server.revisions) == list(REVISIONS)
    assert len(server.best_tags) == len(server.worst_tags) == 3
    assert len(server.best_namespaces) == len(server.worst_namespaces) == len(NAMESPACES) // 2
    made = [job for job in jobs if USERS[job % len(USERS)] == USERS[0]]
    up = sum(bulk_vote(job, voter) == 1 for job in made for voter in VOTERS)
    assert (mine.images, mine.approval) == (len(made), Approval(up, len(made) * len(VOTERS) - up))
    up = sum(bulk_vote(job, USERS[0]) == 1 for job in jobs)
    assert mine.cast == Approval(up, images - up)

    selects = [sql for sql in statements if sql.lstrip().startswith("SELECT")]
    assert len(selects) == 7  # three for the server; three and the votes cast for the member
    connection = sqlite3.connect(path)
    for sql in selects:
        plan = [row[3] for row in connection.execute(f"EXPLAIN QUERY PLAN {sql}")]
        # Every step seeks an index that holds all it reads; no step scans a table or sorts for GROUP BY.
        assert all(step.startswith("SEARCH") and ("COVERING" in step or "PRIMARY KEY" in step) for step in plan), (
            sql,
            plan,
        )
    connection.close()
