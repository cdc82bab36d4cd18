"""Plant arena pairs and votes through the storage API, for the arena's tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from bot.engine.types import Settings
from bot.jobs import JobKind
from bot.storage import ArenaPair, Database, Provenance

SETTINGS = Settings(steps=20, guidance=6.5, width=64, height=64)


async def image(
    db: Database,
    *,
    revision: str,
    prompt: str = "species:seal",
    tags: Sequence[tuple[str, str]] = (("species", "seal"),),
    guild_id: int = 10,
    seed: int = 7,
    file: str | None = None,
) -> tuple[int, int]:
    """Store a finished one-image job rendered by ``revision``; return its image as (job id, index)."""
    job = await db.create_job(
        kind=JobKind.IMAGINE,
        user_id=1,
        guild_id=guild_id,
        channel_id=20,
        prompt=prompt,
        negative_prompt="blurry",
        seed=seed,
        count=1,
        settings=SETTINGS,
        model="tiny",
        scheduler="dpm++",
        tags=tags,
    )
    made = Provenance(revision, "float32", False, batch_id=job.id, batch_size=1, waited_s=0.1, rendered_s=0.5)
    await db.record_images(job_id=job.id, seeds=[seed], nsfw=[False], provenance=[made], files=[file])
    return job.id, 0


async def pair(
    db: Database,
    *,
    left: str,
    right: str,
    production: str | None = None,
    prompt: str = "species:seal",
    tags: Sequence[tuple[str, str]] = (("species", "seal"),),
    guild_id: int = 10,
    files: tuple[str | None, str | None] = (None, None),
) -> ArenaPair:
    """Store a pair of one prompt rendered by ``left`` and ``right``; ``production`` names production's side."""
    shown = [
        await image(db, revision=revision, prompt=prompt, tags=tags, guild_id=guild_id, seed=seed, file=file)
        for revision, seed, file in ((left, 7, files[0]), (right, 8, files[1]))
    ]
    side = None if production is None else "left" if production == left else "right"
    found = await db.record_arena_pair(
        guild_id=guild_id, channel_id=20, requester_id=1, left=shown[0], right=shown[1], production_side=side
    )
    await db.set_arena_message(pair_id=found.id, message_id=9000 + found.id, posted_at=1_000.0)
    return found


async def votes(db: Database, pair_id: int, choices: Mapping[str, int], *, first_member: int = 100) -> int:
    """Cast ``choices`` ({"left": 3, "tie": 1, ...}) on a pair, one distinct member each, five seconds after the
    post; return the next unused member id."""
    member = first_member
    for choice, count in choices.items():
        for _ in range(count):
            await db.record_arena_vote(pair_id=pair_id, user_id=member, choice=choice, seconds=5.0)
            member += 1
    return member
