"""Hostile moderator input and forged buttons, replayed through the real bot logged in to the fake Discord.

Reasons and blocked terms are shown as written but inert (no formatting, link or mention) and with pings off; a
grant above the config's caps is refused privately with nothing saved; a forged Delete deletes nothing.
"""

from __future__ import annotations

from typing import Any

from bot.config import Config, ModerationConfig, QueueConfig
from bot.markdown import inert
from bot.service import config_limits
from tests.cogs.conftest import Harness, final_message, job_id_of
from tests.cogs.test_moderation import MANAGE_GUILD, answer
from tests.fakediscord import FakeDiscord

HOSTILE = "@everyone <@123> [x](https://evil.example) **bold** ||sp|| `code` # no"
NO_PINGS = {"parse": []}


def assert_inert(text: str, allowed_mentions: dict[str, Any] | None) -> None:
    """The hostile text is there, escaped: it formats nothing, links nowhere and pings nobody."""
    assert inert(HOSTILE) in text, text
    for markup in ("@everyone", "<@123>", "[x](", "**bold**", "||sp||", "`code`"):
        assert markup not in text, (markup, text)
    assert allowed_mentions == NO_PINGS


def moderator(server: FakeDiscord) -> int:
    return server.add_user("admin", roles=[server.add_role("Admins", MANAGE_GUILD)])


async def test_a_ban_reason_is_shown_escaped_to_the_banned_member_and_in_the_audit_log(harness: Harness) -> None:
    server = harness.server
    admin = moderator(server)
    member = server.add_user("member")
    async with harness.bot():
        await answer(await server.slash("mod ban", {"user": member, "reason": HOSTILE}, user_id=admin))
        refused = await server.slash("imagine", {"prompt": "species:seal"}, user_id=member)
        text = await answer(refused)
        assert "banned you from using the bot: " in text
        assert_inert(text, (refused.response or {})["data"].get("allowed_mentions"))
        audit = await server.slash("mod audit", user_id=admin)
        assert_inert(await answer(audit), (audit.response or {})["data"].get("allowed_mentions"))
        await answer(await server.slash("mod unban", {"user": member, "reason": HOSTILE}, user_id=admin))
        audit = await server.slash("mod audit", user_id=admin)
        lines = (await answer(audit)).splitlines()
        assert len(lines) == 2  # a reason cannot add lines of its own to the log
        assert all(inert(HOSTILE) in line for line in lines)


async def test_cancel_and_pause_reasons_are_shown_escaped_in_public_and_private(harness: Harness) -> None:
    server = harness.server
    admin = moderator(server)
    users = [server.add_user(f"user{i}") for i in range(3)]
    async with harness.bot():
        harness.render.open.clear()
        blocker = await server.slash("imagine", {"prompt": "species:seal"}, user_id=users[0])
        await server.wait_for_message(lambda m: m.interaction_id == blocker.id and "Rendering" in m.content)
        cancelled = await server.slash("imagine", {"prompt": "species:cat"}, user_id=users[1])
        waiting = await server.slash("imagine", {"prompt": "species:dog"}, user_id=users[2])
        status = await server.wait_for_message(lambda m: m.interaction_id == cancelled.id and "Queued" in m.content)
        await server.wait_for_message(lambda m: m.interaction_id == waiting.id and "Queued" in m.content)
        job_id = int(status.custom_ids[0].rsplit(":", 1)[1])

        await answer(await server.slash("mod cancel", {"job": job_id, "reason": HOSTILE}, user_id=admin))
        told = await server.wait_for_message(lambda m: m.interaction_id == cancelled.id and "🚫" in m.content)
        assert not told.ephemeral and f"Cancelled by a moderator (<@{admin}>): " in told.content
        assert_inert(told.content, told.allowed_mentions)

        await answer(await server.slash("mod pause", {"reason": HOSTILE}, user_id=admin))
        shown = await server.wait_for_message(
            lambda m: m.interaction_id == waiting.id and "paused the queue" in m.content
        )
        assert_inert(shown.content, shown.allowed_mentions)
        refused = await server.slash("imagine", {"prompt": "species:fox"}, user_id=users[1])
        assert_inert(await answer(refused), (refused.response or {})["data"].get("allowed_mentions"))
        queue = await server.slash("queue", user_id=users[1])
        assert_inert(await answer(queue), (queue.response or {})["data"].get("allowed_mentions"))
        await answer(await server.slash("mod resume", user_id=admin))
        harness.render.open.set()
        await final_message(server, waiting)


async def test_a_blocked_term_is_shown_escaped_inside_its_spoiler(harness: Harness) -> None:
    server = harness.server
    admin = moderator(server)
    term = "@everyone <@123> [x](https://evil.example) **bold** ||sp|| `code` # no"
    spoilered = f"||{inert(term)}||"
    async with harness.bot():
        for name, options in (
            ("mod blocklist add", {"term": term}),
            ("mod blocklist list", {}),
            ("mod audit", {}),
            ("mod blocklist remove", {"term": term}),
            ("mod audit", {}),
        ):
            interaction = await server.slash(name, options, user_id=admin)
            text = await answer(interaction)
            assert spoilered in text, (name, text)
            assert_inert(text, (interaction.response or {})["data"].get("allowed_mentions"))


async def test_a_grant_above_the_config_caps_is_refused_privately_and_nothing_is_saved(harness: Harness) -> None:
    server = harness.server
    admin = moderator(server)
    member = server.add_user("member")
    async with harness.bot() as bot:
        before = await bot.db.guild_rules()
        for options, expected in (
            (
                {"images_per_hour": 100_000},
                "images_per_hour can be at most 600 here (the bot's config caps it: "
                "moderation.max_images_per_hour), not 100000. Nothing changed.",
            ),
            (
                {"user": member, "max_queued": 1000, "max_count": 2},
                "max_queued can be at most 32 here (the bot's config caps it: moderation.max_queued), not 1000. "
                "Nothing changed.",
            ),
        ):
            text = await answer(await server.slash("mod limits set", options, user_id=admin))
            assert text == expected
        assert await bot.db.guild_rules() == before
        assert await bot.db.audit_log(guild_id=server.guild_id, count=10) == []
        # At the cap is allowed.
        text = await answer(await server.slash("mod limits set", {"images_per_hour": 600}, user_id=admin))
        assert "`images_per_hour` unset → **600**" in text


def test_a_cap_below_the_configs_own_default_is_raised_to_it() -> None:
    config = Config(
        token="unused",
        queue=QueueConfig(images_per_hour=900, max_per_user=50),
        moderation=ModerationConfig(max_images_per_hour=600, max_queued=32),
    )
    defaults, ceilings = config_limits(config)
    assert (
        (ceilings.images_per_hour, ceilings.max_queued) == (defaults.images_per_hour, defaults.max_queued) == (900, 50)
    )
    _, ceilings = config_limits(Config(token="unused"))
    assert (ceilings.images_per_hour, ceilings.max_queued, ceilings.max_count, ceilings.max_steps) == (600, 32, 4, 50)


async def test_limits_stored_above_a_lowered_cap_give_the_cap(harness: Harness) -> None:
    server = harness.server
    admin = moderator(server)
    member = server.add_user("member")
    async with harness.bot():
        await answer(
            await server.slash(
                "mod limits set", {"user": member, "images_per_hour": 500, "max_queued": 20}, user_id=admin
            )
        )
    harness.moderation = ModerationConfig(max_images_per_hour=100, max_queued=5)
    async with harness.bot():
        shown = await answer(await server.slash("mod limits show", {"user": member}, user_id=admin))
        assert f"images per hour (`images_per_hour`): **100** (set for <@{member}>)" in shown
        assert f"(`max_queued`): **5** (set for <@{member}>)" in shown
        mine = await answer(await server.slash("limits", user_id=member))
        assert "images per hour: **100**" in mine


async def test_a_forged_delete_or_vote_naming_another_job_leaves_the_message_alone(harness: Harness) -> None:
    server = harness.server
    admin = moderator(server)
    victim = server.add_user("victim")
    attacker = server.add_user("attacker")
    async with harness.bot() as bot:
        target = await final_message(server, await server.slash("imagine", {"prompt": "species:seal"}, user_id=victim))
        own = await final_message(server, await server.slash("imagine", {"prompt": "species:cat"}, user_id=attacker))
        own_job = job_id_of(own)
        buttons = list(target.components)

        for clicker in (attacker, admin):  # the attacker's own job, and a moderator's click: neither deletes it
            forged = await server.click(target.id, f"imagine:delete:{own_job}", user_id=clicker, forged=True)
            text = await answer(forged)
            assert text == "That button does not belong to this message, so nothing was deleted."
        vote = await server.click(target.id, f"imagine:vote:{own_job}:0:up", user_id=attacker, forged=True)
        assert "is recorded" in await answer(vote)

        assert not server.message(target.id).deleted and not server.message(own.id).deleted
        assert server.message(target.id).components == buttons  # its buttons were not swapped for another job's
        assert [image.deleted_at for image in await bot.db.job_images(job_id=own_job)] == [None]
        assert [image.deleted_at for image in await bot.db.job_images(job_id=job_id_of(target))] == [None]

        # The real button still works.
        deleted = await server.click(own.id, f"imagine:delete:{own_job}", user_id=attacker)
        assert "are deleted" in await answer(deleted)
        await server.wait_for_message(lambda m: m.id == own.id and m.deleted)
    assert [m.id for m in server.messages(server.channel_id, include_deleted=True) if m.deleted] == [own.id]
