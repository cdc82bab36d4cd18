from __future__ import annotations

import pytest

from bot.engine.types import Settings
from bot.limits import Limits, Origin, Scope, Usage, describe_wait, resolve, standard_images

CONFIG = Limits(images_per_hour=60, max_queued=3, max_count=4, max_steps=50)


def test_each_field_comes_from_the_nearest_level_that_sets_it() -> None:
    resolved = resolve(
        config=CONFIG,
        server=Limits(images_per_hour=20),
        roles={7: Limits(images_per_hour=30, max_count=2), 8: Limits(images_per_hour=25, max_count=3)},
        user=Limits(max_steps=10),
    )
    assert (resolved.images_per_hour, resolved.max_queued, resolved.max_count, resolved.max_steps) == (30, 3, 3, 10)
    assert resolved.origins == {
        "images_per_hour": Origin(Scope.ROLE, 7),
        "max_queued": Origin(None),
        "max_count": Origin(Scope.ROLE, 8),
        "max_steps": Origin(Scope.USER),
    }


def test_a_user_override_wins_even_when_less_generous_and_ceilings_cap_everything() -> None:
    resolved = resolve(
        config=CONFIG,
        roles={7: Limits(images_per_hour=100)},
        user=Limits(images_per_hour=0, max_steps=80),
        ceilings=Limits(max_steps=50),
    )
    assert resolved.images_per_hour == 0 and resolved.max_steps == 50


def test_cost_counts_bigger_and_longer_images_more_and_smaller_ones_as_one() -> None:
    assert standard_images(Settings(width=512, height=512, steps=25)) == 1
    assert standard_images(Settings(width=768, height=512, steps=50)) == 3
    assert standard_images(Settings(width=64, height=64, steps=3), 4) == 4
    assert standard_images(Settings(width=640, height=640, steps=25), 2) == pytest.approx(3.125)


def test_usage_rolls_over_the_hour_and_says_when_room_frees_up() -> None:
    now = [1000.0]
    usage = Usage(clock=lambda: now[0])
    first = usage.charge(guild_id=1, user_id=5, cost=1)
    now[0] += 600
    usage.charge(guild_id=1, user_id=5, cost=2)
    assert usage.used(guild_id=1, user_id=5) == 3 and usage.used(guild_id=2, user_id=5) == 0
    assert usage.frees_at(guild_id=1, user_id=5, need=1, limit=4) == now[0]  # fits now
    assert usage.frees_at(guild_id=1, user_id=5, need=1, limit=3) == first.at + 3600
    assert usage.frees_at(guild_id=1, user_id=5, need=2, limit=3) == first.at + 3600 + 600
    assert usage.frees_at(guild_id=1, user_id=5, need=4, limit=3) is None  # never fits
    usage.attach(first, job_id=42)
    assert usage.refund_job(42) and not usage.refund_job(42)
    assert usage.used(guild_id=1, user_id=5) == 2
    now[0] += 3600
    assert usage.used(guild_id=1, user_id=5) == 0


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.2, "1 s"), (45, "45 s"), (61, "2 min"), (3599, "60 min"), (3660, "1 h 1 min")]
)
def test_waits_read_the_way_people_say_them(seconds: float, text: str) -> None:
    assert describe_wait(seconds) == text


def test_limits_describe_what_they_set() -> None:
    assert str(Limits()) == "none" and not Limits()
    assert str(Limits(images_per_hour=2, max_steps=9)) == "images_per_hour=2, max_steps=9"
    assert Limits(images_per_hour=2).updated(Limits(max_count=1)) == Limits(images_per_hour=2, max_count=1)
    with pytest.raises(ValueError, match="max_queued must not be negative"):
        Limits(max_queued=-1)
