from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from bot.engine.executor import Progress
from bot.engine.types import ImageSpec, RenderedImage
from bot.limits import Limits, Scope
from bot.moderation import Moderation, ModerationError, Target, server_target
from bot.scheduler import Scheduler
from bot.storage import Database

GUILD = 10
MOD = 99
CONFIG = Limits(images_per_hour=60, max_queued=3, max_count=4, max_steps=50)
CEILINGS = Limits(max_count=4, max_steps=50)


def render(specs: Sequence[ImageSpec], progress: Progress | None = None, /) -> list[RenderedImage]:
    return [RenderedImage(png=b"", seed=spec.seed) for spec in specs]


@pytest.fixture
async def moderation(tmp_path: Path) -> AsyncIterator[Moderation]:
    async with await Database.open(tmp_path / "sygil.db") as db, Scheduler(render) as scheduler:
        yield await Moderation.load(db, scheduler, defaults=CONFIG, ceilings=CEILINGS, blocklist=("forbidden",))


async def reload(moderation: Moderation) -> Moderation:
    return await Moderation.load(
        moderation.db, moderation.scheduler, defaults=CONFIG, ceilings=CEILINGS, blocklist=("forbidden",)
    )


async def test_changes_are_stored_with_their_audit_rows_and_read_back(moderation: Moderation) -> None:
    user = Target(Scope.USER, 5)
    await moderation.set_limits(GUILD, MOD, user, Limits(images_per_hour=2))
    await moderation.add_term(GUILD, MOD, "  Gloomy   swamp ")
    await moderation.set_channel(GUILD, MOD, 300, "deny")
    await moderation.ban(GUILD, MOD, 6, "spam")
    await moderation.pause(GUILD, MOD, "update")
    again = await reload(moderation)
    assert again.limits(GUILD, 5).images_per_hour == 2
    assert again.blocklist(GUILD).matches("a GLOOMY  swamp") and again.blocklist(GUILD).matches("forbidden")
    assert not again.blocklist(GUILD + 1).matches("gloomy swamp")
    assert not again.channel_allowed(GUILD, [300]) and again.channel_allowed(GUILD, [301])
    assert again.ban_reason(GUILD, 6) == (True, "spam")
    assert again.pause_reason(GUILD) == (True, "update") and again.scheduler.is_paused(GUILD)
    entries = await moderation.audit_log(GUILD, 10)
    assert [(entry.action, entry.target, entry.old, entry.new) for entry in entries] == [
        ("pause", "the queue", "running", "paused"),
        ("ban", "<@6>", "allowed", "banned"),
        ("channels deny", "<#300>", "none", "deny"),
        ("blocklist add", "||Gloomy swamp||", None, None),
        ("limits set", "<@5>", "images_per_hour=unset", "images_per_hour=2"),
    ]
    assert all(entry.moderator_id == MOD and entry.at > 0 for entry in entries)


async def test_concurrent_changes_to_one_override_keep_both(moderation: Moderation) -> None:
    user = Target(Scope.USER, 5)
    await asyncio.gather(
        moderation.set_limits(GUILD, MOD, user, Limits(images_per_hour=2)),
        moderation.set_limits(GUILD, MOD, user, Limits(max_queued=1)),
        moderation.set_limits(GUILD, MOD, user, Limits(max_steps=9)),
    )
    expected = Limits(images_per_hour=2, max_queued=1, max_steps=9)
    assert moderation.override(GUILD, user) == expected
    assert (await reload(moderation)).override(GUILD, user) == expected


async def test_bad_changes_say_why_and_change_nothing(moderation: Moderation) -> None:
    server = server_target(GUILD)
    with pytest.raises(ModerationError, match="at least one limit"):
        await moderation.set_limits(GUILD, MOD, server, Limits())
    with pytest.raises(ModerationError, match="max_steps can be at most 50"):
        await moderation.set_limits(GUILD, MOD, server, Limits(max_steps=80))
    with pytest.raises(ModerationError, match="has no limits set"):
        await moderation.reset_limits(GUILD, MOD, Target(Scope.ROLE, 7))
    with pytest.raises(ModerationError, match="already blocked by the bot's config"):
        await moderation.add_term(GUILD, MOD, "FORBIDDEN")
    with pytest.raises(ModerationError, match="only whoever runs the bot"):
        await moderation.remove_term(GUILD, MOD, "forbidden")
    with pytest.raises(ModerationError, match="not on this server's blocklist"):
        await moderation.remove_term(GUILD, MOD, "nothing")
    with pytest.raises(ModerationError, match="at least one letter or digit"):
        await moderation.add_term(GUILD, MOD, "!!!")
    with pytest.raises(ModerationError, match="neither allowed nor denied"):
        await moderation.set_channel(GUILD, MOD, 300, None)
    with pytest.raises(ModerationError, match="is not banned"):
        await moderation.unban(GUILD, MOD, 6, None)
    with pytest.raises(ModerationError, match="not paused"):
        await moderation.resume(GUILD, MOD)
    assert await moderation.audit_log(GUILD, 10) == []


async def test_resetting_the_server_default_restores_the_config(moderation: Moderation) -> None:
    server = server_target(GUILD)
    await moderation.set_limits(GUILD, MOD, server, Limits(images_per_hour=5, max_count=2))
    assert moderation.limits(GUILD, 1).max_count == 2
    with pytest.raises(ModerationError, match="already has those limits"):
        await moderation.set_limits(GUILD, MOD, server, Limits(max_count=2))
    old = await moderation.reset_limits(GUILD, MOD, server)
    assert old == Limits(images_per_hour=5, max_count=2)
    entries = await moderation.audit_log(GUILD, 10)
    assert [(entry.action, entry.old, entry.new) for entry in entries] == [
        ("limits reset", "images_per_hour=5, max_count=2", "images_per_hour=unset, max_count=unset"),
        ("limits set", "images_per_hour=unset, max_count=unset", "images_per_hour=5, max_count=2"),
    ]
    assert moderation.limits(GUILD, 1).max_count == 4 and moderation.limits(GUILD, 1).origins["max_count"].kind is None
