"""A candidate revision served by the cluster: its workers take only its batches, and the production workers only
theirs, through a real Redis with ACL users, the real worker hosts and the real bot side."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bot.cluster.broker import connect
from bot.cluster.pool import ClusterPool
from bot.cluster.remote import Executor, PinRefused, Served, WorkerHost
from bot.cluster.wire import GROUP, BotInfo, Keys, pack, unpack
from bot.engine.executor import ThreadWorker
from bot.engine.protocol import RenderBatch, Rendered, Started
from bot.engine.types import ImageSpec, RenderedImage
from bot.scheduler import Scheduler
from tests.redis_server import RedisServer
from tests.security.test_cluster import MODEL, REVISION, SMALL, config, honest_png, label
from tests.waiting import until

CANDIDATE = "b" * 40
OTHER = "c" * 40
KEYS = Keys("sygil")


@contextlib.asynccontextmanager
async def worker(url: str, revision: str, mark: str) -> AsyncIterator[list[str]]:
    """The real worker host serving ``revision``; yields the prompts it rendered. Its PNGs carry ``mark``."""
    rendered: list[str] = []

    def render(specs: Sequence[ImageSpec], progress: object = None) -> list[RenderedImage]:
        rendered.extend(spec.prompt for spec in specs)
        return [
            RenderedImage(honest_png(ImageSpec(f"{mark}:{s.prompt}", "", s.seed, s.settings)), s.seed) for s in specs
        ]

    executor = Executor(ThreadWorker(render), lambda: Served("cuda:0", "NVIDIA H100", revision, "float16"))
    async with connect(url) as broker:
        host = WorkerHost(broker, config(url), model=MODEL, executors=[executor], grace=2.0)
        task = asyncio.create_task(host.run())
        try:
            yield rendered
        finally:
            host.stop()
            await asyncio.wait_for(task, 30)


@contextlib.asynccontextmanager
async def bot_side(url: str) -> AsyncIterator[tuple[ClusterPool, Scheduler]]:
    pool = ClusterPool(config(url), model=MODEL, revision=REVISION, candidates=(CANDIDATE,))
    async with pool, Scheduler(workers=pool.lanes, max_batch=2) as scheduler:
        yield pool, scheduler


def submit(scheduler: Scheduler, job_id: int, prompt: str, revision: str | None) -> Any:
    spec = ImageSpec(prompt=prompt, negative_prompt="", seed=job_id, settings=SMALL)
    return scheduler.submit(job_id=job_id, user_id=job_id, guild_id=1, specs=[spec], revision=revision)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    with RedisServer(tmp_path / "redis", acl=True) as server:
        yield server


async def test_each_revisions_workers_serve_only_its_batches(server: RedisServer) -> None:
    bot_url = await server.bot_url()
    production_url, candidate_url = await server.add_worker("prod"), await server.add_worker("cand")
    async with (
        bot_side(bot_url) as (pool, scheduler),
        worker(production_url, REVISION, "prod") as by_production,
        worker(candidate_url, CANDIDATE, "cand") as by_candidate,
    ):
        tickets = {
            job_id: submit(scheduler, job_id, f"job{job_id}", CANDIDATE if job_id % 2 else None)
            for job_id in range(1, 9)
        }
        images = await asyncio.wait_for(asyncio.gather(*(ticket.result for ticket in tickets.values())), 30)
        results = dict(zip(tickets, images, strict=True))
        assert {info.revision for info in pool.workers} == {REVISION, CANDIDATE}
        info = BotInfo.read(server.client().get(KEYS.bot))
        assert info is not None and (info.revision, info.candidates) == (REVISION, (CANDIDATE,))
        for job_id, [image] in results.items():
            mark = "cand" if job_id % 2 else "prod"
            assert label(image.png).startswith(f"honest|{mark}:job{job_id}|")
            [rendering] = tickets[job_id].renders
            assert rendering.revision == (CANDIDATE if job_id % 2 else REVISION)
            assert rendering.worker == f"{mark}/cuda:0"
    assert sorted(by_candidate) == [f"job{n}" for n in (1, 3, 5, 7)]
    assert sorted(by_production) == [f"job{n}" for n in (2, 4, 6, 8)]
    assert server.client().exists(KEYS.batches_of(CANDIDATE)) == 1


async def test_a_candidates_room_lets_out_no_production_batch(server: RedisServer) -> None:
    """Only a candidate worker is up: production jobs wait (none is sent), candidate jobs render."""
    async with (
        bot_side(await server.bot_url()) as (_, scheduler),
        worker(await server.add_worker("cand"), CANDIDATE, "cand") as by_candidate,
    ):
        production = submit(scheduler, 1, "prod-job", None)
        candidate = submit(scheduler, 2, "cand-job", CANDIDATE)
        await asyncio.wait_for(candidate.result, 30)
        assert by_candidate == ["cand-job"]
        assert not production.result.done() and not production.started.is_set()
        assert server.client().xlen(KEYS.batches) == 0  # never sent: no production worker has room


async def test_a_worker_of_neither_revision_is_refused(server: RedisServer) -> None:
    async with bot_side(await server.bot_url()):
        with pytest.raises(PinRefused, match=f"serves revision {OTHER}, the bot is pinned to {REVISION} \\(or a"):
            async with worker(await server.add_worker("other"), OTHER, "other"):
                await asyncio.sleep(30)  # the host stops itself once it reads the announcement


async def test_a_consumer_of_the_candidate_taking_a_production_batch_is_struck_and_the_batch_renders_on_production(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Every batches stream is open to every worker user: Mallory's device announcing the candidate takes a production
    batch (her other device announces production, so the bot sends one) and sends a result; it is dropped, and the
    batch renders on an honest production worker."""
    mallory_url = await server.add_worker("mallory")
    async with bot_side(await server.bot_url()) as (pool, scheduler), connect(mallory_url) as mallory:
        for device, revision in (("cuda:0", CANDIDATE), ("cuda:1", REVISION)):
            beat = {
                "name": "x", "host": "h", "device": device, "device_name": "NVIDIA H100", "model": MODEL,
                "revision": revision, "dtype": "float16", "depth": 1, "busy": 0, "started_at": 0.0,
            }  # fmt: skip
            await mallory.set(KEYS.beat("mallory", device), json.dumps(beat), ex=60)
        await until(lambda: len(pool.workers) == 2, within=10, what="the bot accepting Mallory's two devices")
        ticket = submit(scheduler, 1, "prod-job", None)

        async def take() -> Any:
            return await mallory.xreadgroup(GROUP, "mallory/cuda:0", {KEYS.batches: ">"}, count=1)

        ((_, [(_, fields)]),) = await until(take, within=10, what="the production batch")
        batch, plain = unpack(fields)
        assert isinstance(batch, RenderBatch)
        out = io.BytesIO()
        Image.new("RGB", (64, 64)).save(out, format="PNG")
        events = KEYS.events("mallory", plain["session"])
        image = RenderedImage(out.getvalue(), batch.specs[0].seed)
        for message in (Started(batch.batch_id), Rendered(batch.batch_id, (image,), 0.1)):
            await mallory.xadd(events, pack(message, worker="mallory/cuda:0", nonce=plain["nonce"]))  # type: ignore[arg-type]
        await until(lambda: "of another revision than it serves" in caplog.text, within=10, what="the strike")
        assert not ticket.result.done()
        await mallory.delete(KEYS.beat("mallory", "cuda:0"), KEYS.beat("mallory", "cuda:1"))
        async with worker(await server.add_worker("prod"), REVISION, "prod") as by_production:
            [rendered] = await asyncio.wait_for(ticket.result, 30)
            assert label(rendered.png).startswith("honest|prod:prod-job|")
            assert by_production == ["prod-job"]
