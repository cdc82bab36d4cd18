"""Benchmark the GPU scheduler on the CPU: its overhead, its fairness, and /imagine's answer with a long queue; JSON.

The engine is a plain render function that sleeps ``--batch-cost`` seconds plus ``--image-cost`` per image and
returns a plain PNG of the size asked for, so the numbers are the scheduler's and the bot's, not a model's.

1. Overhead: ``--jobs`` one-image jobs from ``--users`` users, submitted at once, through a render that costs
   nothing. Overhead per job is the wall time over the jobs (best of three passes); the baseline, in the same run,
   calls the render function directly for batches of the same size.
2. Fairness: one heavy user keeps ``--heavy-jobs`` jobs of ``--heavy-images`` images each in the queue the whole run
   (it submits another whenever one finishes, as a user at their ``max_per_user`` does), so the GPU is never idle,
   while ``--light-users`` light users each send ``--light-jobs`` one-image jobs at seeded random times (uniform over
   ``--span`` seconds; the same times for both runs), with at most ``--light-cap`` queued at once (a job that finds
   its user at the cap is sent when one of theirs finishes). A job's waiting time runs from when it reaches the head
   of its own user's line (it was submitted and all of that user's earlier jobs have started) until its batch
   starts (``Ticket.started``): the time it waits because of other users, which a fair queue bounds and a user's own
   backlog does not enter. Only jobs that reach the head of their line after the first light user starts and start
   by the last light job's start count. A user's waiting time is the mean over their jobs, and ``jain_index`` is
   Jain's index over those per-user means, the heavy user's included: (Σx)² / (n·Σx²), 1 when every user waits
   alike, 1/n when one user does all the waiting. Per-user means over several jobs, because one job per user
   measures batch-boundary luck, not order: a job that arrives while a batch renders waits for it to end, anywhere
   between 0 and one batch, and one such sample per user spreads evenly over that range, which caps the index near
   0.75 however fair the order. Averaging ``--light-jobs`` samples narrows that spread by the square root of their
   number, so what is left of the differences between users is the order the scheduler serves them in.
   The FIFO baseline, in the same run, is the same scheduler with every job submitted under one shared user id (the
   real user kept for the statistics), so it serves jobs in arrival order and batches them the same way. Read the
   index beside the rest: under FIFO every light user waits about equally long behind the heavy user's backlog and
   the heavy user is one of n, so its index over all users is high too; ``jain_index_heavy_vs_light_means`` (the
   index of the two classes' mean waits), the light users' mean/p95 waits (over their jobs) and
   ``light_wait_mean_ratio_fifo_to_fair`` show what the fair order changes. ``jain_index_light_users_only`` leaves
   the heavy user out.
3. Acknowledgement: the real bot (``SygilBot`` with its cogs, as ``tests/cogs/conftest.py`` builds it) logged in to
   the fake Discord, with its render held closed so jobs stay queued. ``--queued`` /imagine jobs from ``--fill-users``
   users fill the queue (in waves that are each answered within Discord's 3 s), then ``--requests`` more, each from
   a user with nothing queued yet, are sent one at a time, ``--gap`` seconds apart. The latency of one is the time
   from the fake dispatching the interaction until it receives the bot's first callback (the deferral), both
   stamped by the fake server, which shares the bot's event loop as in the cog tests.

    python bench/scheduler.py                                                   # about 2 minutes on 2 cores
    python bench/scheduler.py --jobs 500 --light-jobs 4 --span 3 --queued 100 --requests 30  # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: reach bot and tests

from PIL import Image

from bot.client import SygilBot
from bot.config import Config, GenerationConfig, QueueConfig
from bot.engine.executor import Progress
from bot.engine.types import ImageSpec, RenderedImage, Settings
from bot.prompts import load_tokenizer
from bot.scheduler import Scheduler
from bot.scheduler.line import Ticket
from bot.service import open_service
from bot.storage import Database
from tests.fakediscord import FakeDiscord, FakeInteraction, run_bot

PARTS = {"overhead", "fairness", "ack"}
TARGETS = {"overhead_ms_per_job": 1.0, "jain_index": 0.95, "ack_p99_ms": 100.0}
SETTINGS = Settings(steps=25, width=512, height=512)


@functools.cache
def png_of(width: int, height: int) -> bytes:
    """A plain PNG of a size (made once): what the cluster's bot checks a worker's images against."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (40, 90, 160)).save(buffer, format="PNG")
    return buffer.getvalue()


class SleepRender:
    """A render function of fixed cost: ``batch_cost`` seconds per call plus ``image_cost`` per image."""

    def __init__(self, batch_cost: float = 0.0, image_cost: float = 0.0) -> None:
        self.batch_cost = batch_cost
        self.image_cost = image_cost

    def __call__(self, specs: Sequence[ImageSpec], progress: Progress | None = None, /) -> list[RenderedImage]:
        seconds = self.batch_cost + self.image_cost * len(specs)
        if seconds > 0:
            time.sleep(seconds)
        return [RenderedImage(png=png_of(spec.settings.width, spec.settings.height), seed=spec.seed) for spec in specs]


class GatedRender(SleepRender):
    """Renders nothing until the gate opens, so a queue builds up behind the batch it holds."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def __call__(self, specs: Sequence[ImageSpec], progress: Progress | None = None, /) -> list[RenderedImage]:
        self.gate.wait(600)
        return super().__call__(specs, progress)


def image_specs(count: int, seed: int = 0) -> list[ImageSpec]:
    return [
        ImageSpec(prompt="species:seal, beach", negative_prompt="", seed=seed + i, settings=SETTINGS)
        for i in range(count)
    ]


def percentile(values: Sequence[float], fraction: float) -> float:
    """Return the nearest-rank percentile (``fraction`` in 0..1) of a non-empty sequence."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def jain(values: Sequence[float]) -> float:
    """Return Jain's fairness index of non-negative values: 1 when all are equal."""
    square_sum = sum(value * value for value in values)
    return 1.0 if square_sum == 0 else sum(values) ** 2 / (len(values) * square_sum)


# 1. Overhead


async def scheduled_seconds(jobs: int, users: int, max_batch: int) -> float:
    """Return the wall time of ``jobs`` one-image jobs, submitted at once, through the scheduler and a free render."""
    specs = image_specs(jobs)
    async with Scheduler(SleepRender(), max_batch=max_batch, max_queue=jobs) as scheduler:
        started = time.perf_counter()
        tickets = [scheduler.submit(job_id=i, user_id=i % users, guild_id=None, specs=[specs[i]]) for i in range(jobs)]
        await asyncio.gather(*(ticket.result for ticket in tickets))
        return time.perf_counter() - started


def direct_seconds(jobs: int, max_batch: int) -> float:
    """Return the wall time of calling the free render directly for the same images in batches of ``max_batch``."""
    specs = image_specs(jobs)
    render = SleepRender()
    started = time.perf_counter()
    for offset in range(0, jobs, max_batch):
        render(specs[offset : offset + max_batch])
    return time.perf_counter() - started


async def overhead(jobs: int, users: int, max_batch: int) -> dict[str, Any]:
    scheduled = min([await scheduled_seconds(jobs, users, max_batch) for _ in range(3)])
    direct = min(direct_seconds(jobs, max_batch) for _ in range(3))
    return {
        "jobs": jobs,
        "users": users,
        "max_batch": max_batch,
        "scheduler_ms_per_job": round(scheduled / jobs * 1000, 4),
        "baseline_direct_render_ms_per_job": round(direct / jobs * 1000, 4),
        "scheduler_jobs_per_second": round(jobs / scheduled),
        "ratio_to_baseline": round(scheduled / direct, 1),
    }


# 2. Fairness


@dataclass(slots=True)
class _Record:
    user_id: int
    submitted: float
    started: float | None = None


@dataclass
class _Trace:
    """Every job of one run, by job id, and each user's jobs in the order they were submitted."""

    jobs: dict[int, _Record] = field(default_factory=dict)
    by_user: dict[int, list[int]] = field(default_factory=dict)

    def waits(self, since: float, until: float) -> dict[int, list[float]]:
        """Return each user's waiting times, from the head of their own line to the start of the batch.

        Only jobs that reached the head of their line at or after ``since`` and started by ``until`` count: the
        stretch of the run in which the light users compete with the heavy one.
        """
        waits: dict[int, list[float]] = {}
        for user_id, job_ids in self.by_user.items():
            previous_start = 0.0
            for job_id in job_ids:
                record = self.jobs[job_id]
                if record.started is None:
                    break  # this one and the user's later ones never reached the GPU in the run
                head = max(record.submitted, previous_start)
                if since <= head and record.started <= until:
                    waits.setdefault(user_id, []).append(max(0.0, record.started - head))
                previous_start = max(previous_start, record.started)
        return waits


def arrival_times(args: argparse.Namespace) -> dict[int, list[float]]:
    """Return each light user's job arrival times, seconds after the light users start: seeded, sorted uniforms."""
    rng = random.Random(args.seed)
    return {
        user_id: sorted(rng.uniform(0, args.span) for _ in range(args.light_jobs))
        for user_id in range(1, args.light_users + 1)
    }


async def fairness_run(args: argparse.Namespace, arrivals: dict[int, list[float]], *, fifo: bool) -> dict[str, Any]:
    """Serve one heavy and many light users; under ``fifo`` every job shares one user id (arrival order)."""
    heavy = 0
    trace = _Trace()
    render = SleepRender(args.batch_cost, args.image_cost)
    watchers: set[asyncio.Task[None]] = set()
    async with Scheduler(render, max_batch=args.max_batch, max_queue=10**6) as scheduler:
        next_id = 0

        def submit(user_id: int, images: int) -> Ticket:
            nonlocal next_id
            next_id += 1
            trace.jobs[next_id] = record = _Record(user_id, time.perf_counter())
            trace.by_user.setdefault(user_id, []).append(next_id)
            ticket = scheduler.submit(
                job_id=next_id, user_id=-1 if fifo else user_id, guild_id=None, specs=image_specs(images, next_id)
            )

            async def watch() -> None:
                await ticket.started.wait()
                record.started = time.perf_counter()

            task = asyncio.create_task(watch())
            watchers.add(task)
            task.add_done_callback(watchers.discard)
            return ticket

        async def heavy_user() -> None:
            outstanding: set[asyncio.Future[list[RenderedImage]]] = set()
            while True:
                while len(outstanding) < args.heavy_jobs:
                    outstanding.add(submit(heavy, args.heavy_images).result)
                _, outstanding = await asyncio.wait(outstanding, return_when=asyncio.FIRST_COMPLETED)

        async def light_user(user_id: int, times: list[float]) -> None:
            # A job arrives at its time; one that finds the user at their cap is sent when one of theirs finishes.
            outstanding: set[asyncio.Future[list[RenderedImage]]] = set()
            for at in times:
                await asyncio.sleep(max(0.0, origin + at - time.perf_counter()))
                while len(outstanding) >= args.light_cap:
                    _, outstanding = await asyncio.wait(outstanding, return_when=asyncio.FIRST_COMPLETED)
                outstanding.add(submit(user_id, 1).result)
            await asyncio.gather(*outstanding)

        heavy_task = asyncio.create_task(heavy_user())
        await asyncio.sleep(args.batch_cost * 3)  # the heavy user's backlog is there before the first light user
        origin = time.perf_counter()
        await asyncio.gather(*(light_user(user_id, times) for user_id, times in arrivals.items()))
        until = max(record.started or 0.0 for record in trace.jobs.values() if record.user_id != heavy)
        seconds = time.perf_counter() - origin
        heavy_task.cancel()
        await asyncio.gather(heavy_task, return_exceptions=True)
    for task in list(watchers):
        task.cancel()
    waits = trace.waits(origin, until)
    means = {user_id: statistics.fmean(values) for user_id, values in waits.items()}
    light_waits = [wait for user_id, values in waits.items() if user_id != heavy for wait in values]
    light_means = [mean for user_id, mean in means.items() if user_id != heavy]
    heavy_waits = waits.get(heavy, [])
    return {
        "jain_index": round(jain(list(means.values())), 4),
        "jain_index_light_users_only": round(jain(light_means), 4),
        "jain_index_heavy_vs_light_means": round(
            jain([statistics.fmean(heavy_waits), statistics.fmean(light_waits)]), 4
        )
        if heavy_waits
        else None,
        "users": len(means),
        "light_jobs_started": len(light_waits),
        "light_wait_mean_ms": round(statistics.fmean(light_waits) * 1000, 1),
        "light_wait_p95_ms": round(percentile(light_waits, 0.95) * 1000, 1),
        "light_wait_max_ms": round(max(light_waits) * 1000, 1),
        "light_user_mean_min_ms": round(min(light_means) * 1000, 1),
        "light_user_mean_max_ms": round(max(light_means) * 1000, 1),
        "heavy_wait_mean_ms": round(statistics.fmean(heavy_waits) * 1000, 1) if heavy_waits else None,
        "heavy_jobs_started": len(heavy_waits),
        "seconds": round(seconds, 1),
    }


async def fairness(args: argparse.Namespace) -> dict[str, Any]:
    arrivals = arrival_times(args)
    fair = await fairness_run(args, arrivals, fifo=False)
    fifo = await fairness_run(args, arrivals, fifo=True)
    return {
        "batch_cost_s": args.batch_cost,
        "image_cost_s": args.image_cost,
        "max_batch": args.max_batch,
        "heavy_jobs_queued": args.heavy_jobs,
        "heavy_images_per_job": args.heavy_images,
        "light_users": args.light_users,
        "light_jobs_per_user": args.light_jobs,
        "light_cap": args.light_cap,
        "span_s": args.span,
        "seed": args.seed,
        "scheduler": fair,
        "fifo_baseline": fifo,
        "light_wait_mean_ratio_fifo_to_fair": round(fifo["light_wait_mean_ms"] / fair["light_wait_mean_ms"], 2)
        if fair["light_wait_mean_ms"]
        else None,
    }


# 3. Acknowledgement with a long queue


async def acknowledgement(args: argparse.Namespace) -> dict[str, Any]:
    render = GatedRender()
    tokenizer = load_tokenizer()
    total = args.queued + args.requests
    queue = QueueConfig(max_queue=total + 100, max_batch=8, max_per_user=total, images_per_hour=10**6)
    with tempfile.TemporaryDirectory() as folder:
        async with FakeDiscord() as server:
            config = Config(
                token=server.token,
                discord=server.bot_settings(),
                generation=GenerationConfig(),
                queue=queue,
            )
            fillers = [server.add_user(f"filler{i}") for i in range(args.fill_users)]
            if args.requesters == "new":
                askers = [server.add_user(f"newcomer{i}") for i in range(args.requests)]
            else:
                askers = [fillers[i % len(fillers)] for i in range(args.requests)]
            try:
                async with (
                    await Database.open(Path(folder) / "bench.db") as db,
                    Scheduler(render, max_batch=queue.max_batch, max_queue=queue.max_queue) as scheduler,
                ):
                    service = await open_service(config, db=db, scheduler=scheduler, model="bench", tokenizer=tokenizer)
                    async with run_bot(SygilBot(config=config, service=service), server) as bot:
                        started = time.perf_counter()
                        fill_delays: list[float] = []
                        for offset in range(0, args.queued, args.wave):
                            wave = [
                                await server.slash(
                                    "imagine",
                                    {"prompt": f"species:seal, beach, wave {index}"},
                                    user_id=fillers[index % len(fillers)],
                                )
                                for index in range(offset, min(offset + args.wave, args.queued))
                            ]
                            fill_delays += await responded(wave)
                        fill_seconds = time.perf_counter() - started
                        await asyncio.sleep(args.settle)
                        queued_before = scheduler.pending + len(scheduler.running)
                        requests_before = len(server.requests)
                        delays: list[float] = []
                        started = time.perf_counter()
                        for index, user_id in enumerate(askers):
                            interaction = await server.slash(
                                "imagine", {"prompt": f"species:fox, forest, request {index}"}, user_id=user_id
                            )
                            delays += await responded([interaction])
                            await asyncio.sleep(args.gap)
                        measured_seconds = time.perf_counter() - started
                        during = Counter(
                            f"{request.method} {request.path.split('/')[1]}"
                            for request in server.requests[requests_before:]
                        )
                        queued_after = scheduler.pending + len(scheduler.running)
                        render.gate.set()
                        await bot.shut_down(10)
            finally:
                render.gate.set()
            violations = [f"{v.code} {v.message}" for v in server.violations]
    return {
        "queued_before": queued_before,
        "queued_after": queued_after,
        "fill_users": args.fill_users,
        "fill_seconds": round(fill_seconds, 2),
        "fill_ack_p99_ms": round(percentile(fill_delays, 0.99) * 1000, 1),
        "requests": len(delays),
        "requesters": args.requesters,
        "gap_s": args.gap,
        "measured_seconds": round(measured_seconds, 2),
        "ack_p50_ms": round(percentile(delays, 0.50) * 1000, 1),
        "ack_p99_ms": round(percentile(delays, 0.99) * 1000, 1),
        "ack_max_ms": round(max(delays) * 1000, 1),
        "bot_requests_while_measuring": dict(during.most_common()),
        "violations": violations[:10],
        "violation_count": len(violations),
    }


async def responded(interactions: Sequence[FakeInteraction]) -> list[float]:
    """Wait for each interaction's first callback; return the delays the fake measured, in seconds."""
    await asyncio.gather(*(interaction.wait_response(10) for interaction in interactions))
    return [interaction.response_delay or 0.0 for interaction in interactions]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, object] = {"benchmark": "scheduler"}
    measured: dict[str, float] = {}
    if "overhead" in args.parts:
        over = await overhead(args.jobs, args.users, args.max_batch)
        report["overhead"] = over
        measured["overhead_ms_per_job"] = over["scheduler_ms_per_job"]
    if "fairness" in args.parts:
        fair = await fairness(args)
        report["fairness"] = fair
        measured["jain_index"] = fair["scheduler"]["jain_index"]
    if "ack" in args.parts:
        ack = await acknowledgement(args)
        report["acknowledgement"] = ack
        measured["ack_p99_ms"] = ack["ack_p99_ms"]
    report["targets"] = {
        name: {
            "target": f"{'≥' if name == 'jain_index' else '<'} {target:g}",
            "measured": measured[name],
            "met": measured[name] >= target if name == "jain_index" else measured[name] < target,
        }
        for name, target in TARGETS.items()
        if name in measured
    }
    return {
        **report,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description="Benchmark the GPU scheduler on the CPU; prints JSON.")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument(
        "--parts", type=lambda text: set(text.split(",")), default=PARTS, help="comma-separated: overhead,fairness,ack"
    )
    group = parser.add_argument_group("overhead")
    group.add_argument("--jobs", type=int, default=5000, help="one-image jobs through a free render")
    group.add_argument("--users", type=int, default=100)
    group = parser.add_argument_group("fairness")
    group.add_argument("--batch-cost", type=float, default=0.05, help="seconds per render call")
    group.add_argument("--image-cost", type=float, default=0.01, help="seconds per image")
    group.add_argument("--heavy-jobs", type=int, default=8, help="jobs the heavy user keeps queued")
    group.add_argument("--heavy-images", type=int, default=4, help="images per job of the heavy user")
    group.add_argument("--light-users", type=int, default=30, help="light users, several one-image jobs each")
    group.add_argument("--light-jobs", type=int, default=12, help="one-image jobs per light user")
    group.add_argument("--light-cap", type=int, default=1, help="jobs a light user has queued at most")
    group.add_argument("--span", type=float, default=20.0, help="seconds over which light users' jobs arrive")
    group.add_argument("--seed", type=int, default=1)
    group = parser.add_argument_group("acknowledgement")
    group.add_argument("--queued", type=int, default=1000, help="/imagine jobs queued before measuring")
    group.add_argument("--fill-users", type=int, default=250, help="users the queued jobs come from")
    group.add_argument("--wave", type=int, default=25, help="/imagine sent at once while filling")
    group.add_argument("--settle", type=float, default=3.0, help="seconds between filling and measuring")
    group.add_argument("--requests", type=int, default=200, help="/imagine measured, one at a time, from new users")
    group.add_argument(
        "--requesters",
        choices=["new", "queued"],
        default="new",
        help="measured /imagine come from new users (ahead of queued users' later jobs) or from the queued users",
    )
    group.add_argument("--gap", type=float, default=0.05, help="seconds between measured requests")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args)), ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
