"""Benchmark the cluster mode on the CPU: images/s with 1, 2 and 4 remote workers, and what the broker adds; JSON.

A real Redis (``--broker``, else a ``redis-server`` started on a free port) carries the batches between the bot's
``ClusterPool`` under the real ``Scheduler`` and ``WorkerHost``s in this process. Each worker's engine is a render
of configurable cost that sleeps ``--batch-cost`` seconds plus ``--image-cost`` per image (a GPU is busy, the CPU is
free), so the figures are the cluster's, not a model's.

1. Throughput: ``--jobs`` one-image jobs from ``--users`` users, submitted at once, with each worker count of
   ``--workers``. The baseline, in the same run, is the same scheduler driving as many local workers directly
   (``ThreadWorker``s of the same cost, no Redis). Reports images/s for both, the speedup over one worker (near
   linear when the broker is not the bottleneck) and the cluster's share of the direct figure.
2. Overhead per batch: ``--batches`` one-image jobs, one after another, through one worker whose render costs
   nothing, through the cluster and directly: the difference of the mean round trips is what Redis adds to a batch
   (the XADD, a worker's XREADGROUP, the events back, the bot's capped read of them every 5 ms).

    python bench/cluster.py                                  # about a minute
    python bench/cluster.py --jobs 24 --batches 20 --workers 1,2   # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: reach bot, bench and tests

from bench.scheduler import SETTINGS, SleepRender
from bot.cluster.broker import connect
from bot.cluster.pool import ClusterPool
from bot.cluster.remote import Executor, Served, WorkerHost
from bot.config import ClusterConfig
from bot.engine.executor import ThreadWorker, Worker
from bot.engine.types import ImageSpec
from bot.scheduler import Scheduler

REVISION = "sha256:" + "b" * 64  # what every bench worker serves, and the bot's pin
_Workers = AbstractAsyncContextManager[list[Worker]]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", default=None, help="a Redis URL (default: start redis-server on a free port)")
    parser.add_argument("--workers", default="1,2,4", help="worker counts to measure, comma-separated")
    parser.add_argument("--jobs", type=int, default=96, help="one-image jobs per throughput run")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--batch-cost", type=float, default=0.2, help="seconds per render call")
    parser.add_argument("--image-cost", type=float, default=0.05, help="seconds per image")
    parser.add_argument("--batches", type=int, default=100, help="sequential batches for the overhead")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    report = asyncio.run(_run(args))
    print(json.dumps(report, indent=2))
    return 0


async def _run(args: argparse.Namespace) -> dict[str, object]:
    counts = [int(count) for count in args.workers.split(",")]
    async with _broker(args.broker) as url:
        throughput: list[dict[str, object]] = []
        rates: dict[int, float] = {}
        for count in counts:
            render = SleepRender(args.batch_cost, args.image_cost)
            direct = await _throughput(_direct(count, render), args)
            rates[count] = await _throughput(_cluster(url, count, render), args)
            throughput.append(
                {
                    "workers": count,
                    "cluster_images_per_s": round(rates[count], 2),
                    "direct_images_per_s": round(direct, 2),
                    "cluster_to_direct": round(rates[count] / direct, 3),
                    "speedup_over_one_worker": round(rates[count] / rates[1], 2) if 1 in rates else None,
                }
            )
        free = SleepRender()
        direct_ms = await _round_trips(_direct(1, free), args.batches)
        cluster_ms = await _round_trips(_cluster(url, 1, free), args.batches)
    return {
        "benchmark": "cluster",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "settings": {
            "jobs": args.jobs,
            "users": args.users,
            "max_batch": args.max_batch,
            "batch_cost_s": args.batch_cost,
            "image_cost_s": args.image_cost,
        },
        "throughput": throughput,
        "overhead": {
            "batches": args.batches,
            "cluster_round_trip_ms_mean": round(statistics.fmean(cluster_ms), 2),
            "cluster_round_trip_ms_p95": round(_p95(cluster_ms), 2),
            "direct_round_trip_ms_mean": round(statistics.fmean(direct_ms), 2),
            "broker_ms_per_batch": round(statistics.fmean(cluster_ms) - statistics.fmean(direct_ms), 2),
        },
    }


@asynccontextmanager
async def _broker(url: str | None) -> AsyncIterator[str]:
    if url is not None:
        yield url
        return
    from tests.redis_server import RedisServer

    with tempfile.TemporaryDirectory() as folder, RedisServer(Path(folder)) as server:
        yield server.url


@asynccontextmanager
async def _direct(count: int, render: SleepRender) -> AsyncIterator[list[Worker]]:
    workers = [ThreadWorker(render, name=f"direct-{index}") for index in range(count)]
    try:
        yield list(workers)
    finally:
        for worker in workers:
            await worker.close()


@asynccontextmanager
async def _cluster(url: str, count: int, render: SleepRender) -> AsyncIterator[list[Worker]]:
    """A pool under a fresh key prefix, and ``count`` worker hosts serving it, each with one cheap executor."""
    cluster = ClusterConfig(broker=url, prefix=f"bench{time.monotonic_ns()}", lease=1.0, heartbeat=0.1)
    async with AsyncExitStack() as stack:
        pool = await stack.enter_async_context(ClusterPool(cluster, model="bench", revision=REVISION))
        hosts: list[tuple[WorkerHost, asyncio.Task[None]]] = []
        served = Served(device="cpu", device_name="sleep", revision=REVISION, dtype="float32")
        for index in range(count):
            worker = ThreadWorker(render, name=f"sleep-{index}")
            stack.push_async_callback(worker.close)
            redis = connect(url)
            stack.push_async_callback(redis.aclose)
            host = WorkerHost(
                redis, cluster, model="bench", executors=[Executor(worker, lambda: served)], name=f"w{index}"
            )
            hosts.append((host, asyncio.create_task(host.run())))
        try:
            for _ in range(600):  # every worker joined (heartbeats every 0.1 s)
                if pool.parallel >= count:
                    break
                await asyncio.sleep(0.05)
            else:
                raise RuntimeError(f"only {pool.parallel} of {count} workers joined within 30 s")
            yield [pool]
        finally:
            for host, _ in hosts:
                host.stop()
            await asyncio.gather(*(task for _, task in hosts), return_exceptions=True)


async def _throughput(workers_context: _Workers, args: argparse.Namespace) -> float:
    """Return images/s for ``args.jobs`` one-image jobs submitted at once."""
    async with workers_context as workers:
        async with Scheduler(workers=workers, max_batch=args.max_batch, max_queue=args.jobs) as scheduler:
            started = time.perf_counter()
            tickets = [
                scheduler.submit(
                    job_id=job, user_id=job % args.users, guild_id=1, specs=[ImageSpec(f"p{job}", "", job, SETTINGS)]
                )
                for job in range(args.jobs)
            ]
            await asyncio.gather(*(ticket.result for ticket in tickets))
            return args.jobs / (time.perf_counter() - started)


async def _round_trips(workers_context: _Workers, batches: int) -> list[float]:
    """Return the milliseconds each of ``batches`` one-image jobs took, one after another."""
    times: list[float] = []
    async with workers_context as workers:
        async with Scheduler(workers=workers, max_batch=1, max_queue=2) as scheduler:
            for job in range(batches):
                started = time.perf_counter()
                ticket = scheduler.submit(
                    job_id=job, user_id=1, guild_id=1, specs=[ImageSpec(f"p{job}", "", job, SETTINGS)]
                )
                await ticket.result
                times.append((time.perf_counter() - started) * 1000)
    return times[1:] if len(times) > 1 else times  # the first pays for connections


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]


if __name__ == "__main__":
    raise SystemExit(main())
