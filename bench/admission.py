"""Benchmark admission: every check that can refuse /imagine, and the place taken, with no await; prints JSON.

A server with moderators' rules in place (role and user overrides, a blocklist, bans, channel rules) admits
requests from many users. The baseline, in the same run, is checking the same prompts alone: admission is that
plus the server's rules, the limits and the queue, so the ratio shows what moderation costs on the hot path.

    python bench/admission.py [--requests N] [--users N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: reach bench.prompts

from bench.prompts import BLOCKLIST, make_prompts
from bot.admission import Admission, Requester
from bot.config import Config, PromptsConfig, QueueConfig
from bot.engine.executor import Progress
from bot.engine.types import ImageSpec, RenderedImage
from bot.errors import BotError
from bot.limits import Limits, Scope
from bot.moderation import Target, server_target
from bot.prompts import load_tokenizer
from bot.prompts.vocabulary import Vocabulary
from bot.scheduler import Scheduler
from bot.service import ImageService, open_service
from bot.storage import Database

GUILD = 1
MODERATOR = 2
ROLES = range(100, 120)


def never(specs: Sequence[ImageSpec], progress: Progress | None = None, /) -> list[RenderedImage]:
    raise AssertionError("the benchmark renders nothing")


async def moderated(service: ImageService, users: int) -> None:
    """Put a busy server's rules in place: overrides for roles and users, blocked terms, bans, channel rules."""
    moderation = service.moderation
    await moderation.set_limits(GUILD, MODERATOR, server_target(GUILD), Limits(images_per_hour=600))  # the config cap
    for role in ROLES:
        await moderation.set_limits(GUILD, MODERATOR, Target(Scope.ROLE, role), Limits(max_steps=40 + role % 10))
    for user in range(0, users, 3):
        await moderation.set_limits(GUILD, MODERATOR, Target(Scope.USER, 1000 + user), Limits(max_count=4))
    for term in BLOCKLIST[:25]:
        await moderation.add_term(GUILD, MODERATOR, f"server {term}")
    for banned in range(50):
        await moderation.ban(GUILD, MODERATOR, 90_000 + banned, "bench")
    await moderation.set_channel(GUILD, MODERATOR, 7, "deny")


def rate(work: Callable[[int], object], count: int, *, between: Callable[[], object] = lambda: None) -> float:
    """Return the best requests-per-second over three passes, running ``between`` after each (untimed)."""
    best = 0.0
    for _ in range(3):
        started = time.perf_counter()
        for index in range(count):
            work(index)
        best = max(best, count / (time.perf_counter() - started))
        between()
    return best


async def run(requests: int, users: int) -> dict[str, object]:
    tokenizer = load_tokenizer()
    prompts = make_prompts(requests, Vocabulary.load())
    config = Config(
        token="bench",
        prompts=PromptsConfig(blocklist=tuple(BLOCKLIST)),
        queue=QueueConfig(max_queue=requests * 2, max_per_user=requests),
    )
    with tempfile.TemporaryDirectory() as folder:
        async with (
            await Database.open(Path(folder) / "bench.db") as db,
            Scheduler(never, max_queue=requests * 2) as scheduler,
        ):
            service = await open_service(config, db=db, scheduler=scheduler, model="bench", tokenizer=tokenizer)
            await moderated(service, users)
            askers = [
                Requester(user_id=1000 + user, guild_id=GUILD, channel_id=5, role_ids=(ROLES[user % 20], 300))
                for user in range(users)
            ]
            rules = service.rules(guild_id=GUILD, channel_id=5)

            def check(index: int) -> object:
                try:
                    return service.check_prompts(prompts[index], None, rules)
                except BotError:
                    return None

            outcomes = {"accepted": 0, "refused": 0}
            admitted: list[Admission] = []

            def admit(index: int) -> object:
                try:
                    admission = service.admit(askers[index % users], prompt=prompts[index])
                except BotError:
                    outcomes["refused"] += 1
                    return None
                outcomes["accepted"] += 1
                admitted.append(admission)
                return admission

            def release() -> None:
                # Every pass starts from the same state: an empty queue and an unused hour.
                for admission in admitted:
                    service.release(admission)
                admitted.clear()

            for index in range(min(200, requests)):  # warm the tokenizer's caches for both
                check(index)
            baseline = rate(check, requests)
            accepting = rate(admit, requests, between=release)
            accepted = outcomes["accepted"] // 3
            outcomes.update(accepted=0, refused=0)
            # Refusals, when every user is at their hourly limit: the path a burst mostly takes.
            await service.moderation.set_limits(GUILD, MODERATOR, server_target(GUILD), Limits(images_per_hour=0))
            refusing = rate(admit, requests)
    return {
        "benchmark": "admission",
        "requests": requests,
        "users": users,
        "accepted_per_pass": accepted,
        "refused_at_the_limit_per_pass": outcomes["refused"] // 3,
        "admissions_per_second": round(accepting),
        "refusals_at_the_hourly_limit_per_second": round(refusing),
        "baseline_prompt_checks_per_second": round(baseline),
        "ratio_to_baseline": round(accepting / baseline, 3),
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description="Benchmark admission of /imagine requests; prints JSON.")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--users", type=int, default=50)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.requests, args.users))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
