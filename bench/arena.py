"""Benchmark the blind A/B arena on the CPU: the bot's throughput with ``arena.rate`` on, against it off; JSON.

The real bot (``SygilBot`` with its cogs) on the fake Discord, with two workers standing for one GPU: production and
a candidate revision (``ThreadWorker(serves=...)``, as ``model.candidates`` gives the bot), each rendering with a
render that sleeps ``--batch-cost`` seconds plus ``--image-cost`` per image, both holding one lock while they sleep,
so never two batches at once. ``--requests`` one-image /imagine requests from ``--users`` users are sent in waves of
``--wave`` (each wave answered within Discord's 3 s), and the run lasts until every request's result is posted.

The run is done twice in one process, with ``arena.rate`` 0 (the baseline: no pairs) and ``--rate``. images/s counts
every image posted, both of a pair; ``arena_to_baseline_images_per_s`` is the check: at 0.95 or more, a pair costs
no more than its extra image, so the two revisions share the GPU without thrashing it. The arena's random draw is
seeded (``--seed``), so a run makes the same pairs each time.

    python bench/arena.py                                     # about a minute on 2 cores
    python bench/arena.py --requests 30 --users 5 --batch-cost 0.02 --image-cost 0.005   # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: reach bot, bench and tests

from bench.scheduler import SleepRender, responded
from bot.client import SygilBot
from bot.config import ArenaConfig, Config, GenerationConfig, QueueConfig
from bot.engine.executor import Progress, ThreadWorker
from bot.engine.types import ImageSpec, RenderedImage
from bot.prompts import load_tokenizer
from bot.scheduler import Scheduler
from bot.service import open_service
from bot.storage import Database
from tests.fakediscord import FakeDiscord, run_bot

CANDIDATE = "candidate"


class OneGpuRender(SleepRender):
    """A sleeping render that holds the GPU's lock while it sleeps: the workers sharing the lock share one GPU."""

    def __init__(self, gpu: threading.Lock, batch_cost: float, image_cost: float) -> None:
        super().__init__(batch_cost, image_cost)
        self.gpu = gpu
        self.batches: list[int] = []

    def __call__(self, specs: Sequence[ImageSpec], progress: Progress | None = None, /) -> list[RenderedImage]:
        with self.gpu:
            self.batches.append(len(specs))
            return super().__call__(specs, progress)


async def bot_run(args: argparse.Namespace, rate: float) -> dict[str, Any]:
    """Send the requests to the bot with ``arena.rate`` at ``rate``; return what it posted and how fast."""
    random.seed(args.seed)  # the cog's draw of which requests become pairs
    gpu = threading.Lock()
    production = OneGpuRender(gpu, args.batch_cost, args.image_cost)
    candidate = OneGpuRender(gpu, args.batch_cost, args.image_cost)
    queue = QueueConfig(
        max_queue=2 * args.requests + 100,
        max_batch=args.max_batch,
        max_per_user=args.requests,
        images_per_hour=10**6,
        server_share=1.0,  # the fake has one guild
    )
    with tempfile.TemporaryDirectory() as folder:
        async with FakeDiscord() as server:
            config = Config(
                token=server.token,
                discord=server.bot_settings(),
                generation=GenerationConfig(),
                queue=queue,
                arena=ArenaConfig(rate=rate),
            )
            users = [server.add_user(f"user{i}") for i in range(args.users)]
            workers = [
                ThreadWorker(production, name="gpu0", facts={"revision": "production"}),
                ThreadWorker(candidate, name="gpu0+candidate", facts={"revision": CANDIDATE}, serves=CANDIDATE),
            ]
            async with (
                await Database.open(Path(folder) / "bench.db") as db,
                contextlib.AsyncExitStack() as stack,  # closes the workers after the scheduler stops
                Scheduler(workers=workers, max_batch=queue.max_batch, max_queue=queue.max_queue) as scheduler,
            ):
                for worker in workers:
                    stack.push_async_callback(worker.close)
                service = await open_service(
                    config, db=db, scheduler=scheduler, model="bench", tokenizer=load_tokenizer()
                )
                async with run_bot(SygilBot(config=config, service=service), server) as bot:
                    started = time.perf_counter()
                    interactions = []
                    for offset in range(0, args.requests, args.wave):
                        wave = [
                            await server.slash(
                                "imagine",
                                {"prompt": f"species:seal, beach, request {index}"},
                                user_id=users[index % len(users)],
                            )
                            for index in range(offset, min(offset + args.wave, args.requests))
                        ]
                        await responded(wave)
                        interactions += wave
                    results = await asyncio.gather(
                        *(
                            server.wait_for_message(
                                lambda m, asked=interaction.id: m.interaction_id == asked and bool(m.attachments), 600
                            )
                            for interaction in interactions
                        )
                    )
                    seconds = time.perf_counter() - started
                    await bot.shut_down(10)
            violations = [f"{v.code} {v.message}" for v in server.violations]
    images = sum(len(message.attachments) for message in results)
    pairs = sum(1 for message in results if message.attachments[0].filename == "left.png")
    return {
        "rate": rate,
        "requests": len(results),
        "pairs": pairs,
        "images": images,
        "seconds": round(seconds, 2),
        "images_per_s": round(images / seconds, 3),
        "requests_per_s": round(len(results) / seconds, 3),
        "production_batches": len(production.batches),
        "candidate_batches": len(candidate.batches),
        "mean_production_batch": round(sum(production.batches) / max(1, len(production.batches)), 2),
        "mean_candidate_batch": round(sum(candidate.batches) / max(1, len(candidate.batches)), 2),
        "violations": violations[:10],
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    baseline = await bot_run(args, 0.0)
    arena = await bot_run(args, args.rate)
    return {
        "benchmark": "arena",
        "settings": {
            "requests": args.requests,
            "users": args.users,
            "max_batch": args.max_batch,
            "batch_cost_s": args.batch_cost,
            "image_cost_s": args.image_cost,
            "wave": args.wave,
            "seed": args.seed,
        },
        "baseline": baseline,
        "arena": arena,
        "arena_to_baseline_images_per_s": round(arena["images_per_s"] / baseline["images_per_s"], 3),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=0.2, help="arena.rate of the measured run (the baseline's is 0)")
    parser.add_argument("--requests", type=int, default=200, help="one-image /imagine requests per run")
    parser.add_argument("--users", type=int, default=20, help="users the requests come from, in turn")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--batch-cost", type=float, default=0.2, help="seconds per render call")
    parser.add_argument("--image-cost", type=float, default=0.05, help="seconds per image")
    parser.add_argument("--wave", type=int, default=25, help="/imagine sent at once")
    parser.add_argument("--seed", type=int, default=1, help="seeds the arena's draw of pairs")
    args = parser.parse_args()
    if not 0 < args.rate <= 1:
        parser.error(f"--rate must be above 0 and at most 1, got {args.rate}")
    print(json.dumps(asyncio.run(run(args)), ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
