"""Several model revisions served at once: a job asks for one, batches hold one, workers take only theirs."""

from __future__ import annotations

import asyncio

import pytest

from bot.engine.executor import ThreadWorker
from bot.errors import RevisionUnserved
from bot.scheduler import Scheduler
from bot.scheduler.batches import Batch
from tests.bot.test_scheduler import GUILD, FakeRender, specs

CANDIDATE = "refs/pr/4"


def two_revisions() -> tuple[FakeRender, FakeRender, list[ThreadWorker]]:
    """A worker of the production revision and one of the candidate, each on its own fake GPU."""
    production, candidate = FakeRender(), FakeRender()
    workers = [
        ThreadWorker(production, name="production"),
        ThreadWorker(candidate, name="candidate", serves=CANDIDATE),
    ]
    return production, candidate, workers


async def test_each_revisions_jobs_render_only_on_its_workers_and_never_share_a_batch() -> None:
    production, candidate, workers = two_revisions()
    production.gate.clear()
    candidate.gate.clear()
    batches: list[Batch] = []
    try:
        async with Scheduler(workers=workers, max_batch=8, on_batch=batches.append) as scheduler:
            # Same settings from different users: one batch each, were it not for the revisions they ask for.
            tickets = [
                scheduler.submit(
                    job_id=job_id,
                    user_id=job_id,
                    guild_id=GUILD,
                    specs=specs(f"p{job_id}" if revision is None else f"c{job_id}"),
                    revision=revision,
                )
                for job_id, revision in enumerate([None, CANDIDATE, None, CANDIDATE, None], 1)
            ]
            production.gate.set()
            candidate.gate.set()
            await asyncio.gather(*(ticket.result for ticket in tickets))
    finally:
        for worker in workers:
            await worker.close()
    assert {spec.prompt for batch in production.batches for spec in batch} == {"p1", "p3", "p5"}
    assert {spec.prompt for batch in candidate.batches for spec in batch} == {"c2", "c4"}
    for batch in batches:
        assert len({job_id % 2 for job_id in batch.job_ids}) == 1  # odd: production, even: the candidate
    by_worker = {batch.worker: set(batch.job_ids) for batch in batches}
    assert by_worker["production"] >= {1} and by_worker["candidate"] >= {2}


async def test_a_busy_revision_does_not_hold_up_the_other() -> None:
    """The production worker is stuck on a batch: the candidate's jobs still render, in fair order among themselves."""
    production, candidate, workers = two_revisions()
    production.gate.clear()
    try:
        async with Scheduler(workers=workers, max_batch=1) as scheduler:
            stuck = scheduler.submit(job_id=1, user_id=1, guild_id=GUILD, specs=specs("p1"))
            await stuck.started.wait()
            waiting = scheduler.submit(job_id=2, user_id=1, guild_id=GUILD, specs=specs("p2"))
            served = [
                scheduler.submit(job_id=job_id, user_id=user_id, guild_id=GUILD, specs=specs(f"c{job_id}"), revision=r)
                for job_id, user_id, r in [(3, 2, CANDIDATE), (4, 2, CANDIDATE), (5, 3, CANDIDATE)]
            ]
            await asyncio.gather(*(ticket.result for ticket in served))
            assert not waiting.started.is_set()
            # Users take turns within the candidate's jobs too: user 3's job before user 2's second.
            assert [batch[0].prompt for batch in candidate.batches] == ["c3", "c5", "c4"]
            production.gate.set()
            await asyncio.gather(stuck.result, waiting.result)
    finally:
        for worker in workers:
            await worker.close()


async def test_a_revision_nobody_serves_is_refused_in_one_line() -> None:
    render = FakeRender()
    async with Scheduler(render) as scheduler:
        assert scheduler.revisions == frozenset({None})
        with pytest.raises(RevisionUnserved, match=r"^No GPU worker serves the model revision v9, so this job"):
            scheduler.submit(job_id=1, user_id=1, guild_id=GUILD, specs=specs("a"), revision="v9")
        assert scheduler.pending == 0
    only_candidate = ThreadWorker(FakeRender(), serves=CANDIDATE)
    try:
        async with Scheduler(workers=[only_candidate]) as scheduler:
            with pytest.raises(RevisionUnserved, match="revision in production"):
                scheduler.check_revision(None)
            ticket = scheduler.submit(job_id=2, user_id=1, guild_id=GUILD, specs=specs("c"), revision=CANDIDATE)
            assert [image.png for image in await ticket.result] == [b"c|1"]
    finally:
        await only_candidate.close()
