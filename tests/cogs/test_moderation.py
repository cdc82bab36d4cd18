"""/mod, /queue, /limits and the Cancel button through the real discord.py client, logged in to the fake Discord."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bot.config import ModerationConfig, QueueConfig
from bot.jobs import JobStatus
from tests.cogs.conftest import Harness, all_delivered, final_message, job_id_of, job_when
from tests.fakediscord import FakeDiscord, FakeInteraction

MANAGE_GUILD = 1 << 5


async def answer(interaction: FakeInteraction) -> str:
    """Return the text of a private answer (and fail if it was public)."""
    response = await interaction.wait_response()
    assert response["type"] == 4, response
    assert interaction.ephemeral, f"public answer: {response}"
    assert response["data"].get("allowed_mentions") == {"parse": []}
    return response["data"]["content"]


def leaves(schema: list[dict[str, Any]], prefix: str = "mod") -> list[tuple[str, list[dict[str, Any]]]]:
    """Return every subcommand of a command schema with its options, nested groups included."""
    found: list[tuple[str, list[dict[str, Any]]]] = []
    for option in schema:
        name = f"{prefix} {option['name']}"
        if option["type"] == 2:
            found += leaves(option.get("options") or [], name)
        elif option["type"] == 1:
            found.append((name, option.get("options") or []))
    return found


def minimal_options(server: FakeDiscord, options: list[dict[str, Any]], *, member: int, role: int) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for option in options:
        if not option.get("required") and option["type"] != 4:
            continue
        kind = option["type"]
        if option.get("choices"):
            values[option["name"]] = option["choices"][0]["value"]
        elif kind == 6:
            values[option["name"]] = member
        elif kind == 8:
            values[option["name"]] = role
        elif kind == 7:
            values[option["name"]] = server.channel_id
        elif kind == 4:
            values[option["name"]] = max(1, option.get("min_value", 1))
        elif kind == 3:
            values[option["name"]] = "forbidden"
    return values


async def test_every_mod_command_refuses_members_without_the_permission(harness: Harness) -> None:
    server = harness.server
    stranger = server.add_user("stranger")
    role = server.add_role("Artists")
    async with harness.bot() as bot:
        mod = server.commands["mod"]
        assert int(mod["default_member_permissions"]) == MANAGE_GUILD
        assert mod.get("dm_permission") is False or mod.get("contexts") == [0]
        commands = leaves(mod["options"])
        assert {"mod limits set", "mod channels deny", "mod blocklist add", "mod ban", "mod audit", "mod arena"} <= {
            name for name, _ in commands
        }
        assert len(commands) == 17
        before = await bot.db.guild_rules()
        for name, options in commands:
            values = minimal_options(server, options, member=stranger, role=role)
            interaction = await server.slash(name, values, user_id=stranger)
            text = await answer(interaction)
            assert "Only moderators can use /mod" in text, (name, text)
        assert await bot.db.guild_rules() == before
        assert await bot.db.audit_log(guild_id=server.guild_id, count=50) == []


async def test_a_moderator_role_from_the_config_may_moderate(harness: Harness) -> None:
    server = harness.server
    helpers = server.add_role("Helpers")
    curators = server.add_role("Curators")
    helper = server.add_user("helper", roles=[helpers])
    curator = server.add_user("curator", roles=[curators])
    harness.moderation = ModerationConfig(roles=(helpers, "curators"))  # an id and a name
    async with harness.bot() as bot:
        text = await answer(await server.slash("mod limits set", {"images_per_hour": 5}, user_id=helper))
        assert "`images_per_hour` unset → **5**" in text
        text = await answer(await server.slash("mod blocklist add", {"term": "gloom"}, user_id=curator))
        assert "||gloom||" in text
        entries = await bot.db.audit_log(guild_id=server.guild_id, count=5)
        assert [(entry.moderator_id, entry.action) for entry in entries] == [
            (curator, "blocklist add"),
            (helper, "limits set"),
        ]


async def test_images_per_hour_for_one_user_and_the_audit_log(harness: Harness) -> None:
    server = harness.server
    admin = server.add_user("admin", roles=[server.add_role("Admins", MANAGE_GUILD)])
    limited = server.add_user("limited")
    other = server.add_user("other")
    async with harness.bot():
        text = await answer(
            await server.slash("mod limits set", {"user": limited, "images_per_hour": 2}, user_id=admin)
        )
        assert "60 → **2**" not in text and "`images_per_hour` unset → **2**" in text
        for _ in range(2):
            await final_message(server, await server.slash("imagine", {"prompt": "species:seal"}, user_id=limited))
        refused = await server.slash("imagine", {"prompt": "species:seal"}, user_id=limited)
        text = await answer(refused)
        assert "You have used 2 of your 2 images per hour" in text
        assert "You can make another image in 60 min" in text
        # Other users are not affected.
        for _ in range(3):
            await final_message(server, await server.slash("imagine", {"prompt": "species:cat"}, user_id=other))
        # /limits tells the limited user the same.
        text = await answer(await server.slash("limits", user_id=limited))
        assert "images per hour: **2** (set for this user); used in the last hour: **2**" in text
        assert "another image in 60 min" in text

        await answer(await server.slash("mod limits set", {"user": limited, "images_per_hour": 3}, user_id=admin))
        audit = await answer(await server.slash("mod audit", {"count": 5}, user_id=admin))
        lines = audit.splitlines()
        assert len(lines) == 2
        assert f"<@{admin}> **limits set** <@{limited}>: images_per_hour=2 → images_per_hour=3" in lines[0]
        assert f"<@{admin}> **limits set** <@{limited}>: images_per_hour=unset → images_per_hour=2" in lines[1]
        assert lines[0].startswith("<t:")


async def test_role_and_user_overrides_combine(harness: Harness) -> None:
    server = harness.server
    admin = server.add_user("admin", roles=[server.add_role("Admins", MANAGE_GUILD)])
    artists = server.add_role("Artists")
    patrons = server.add_role("Patrons")
    member = server.add_user("member", roles=[artists, patrons])
    async with harness.bot():
        for options in (
            {"max_count": 1, "images_per_hour": 10},
            {"role": artists, "max_count": 2},
            {"role": patrons, "max_count": 3, "max_steps": 5},
            {"user": member, "max_steps": 4},
        ):
            await answer(await server.slash("mod limits set", options, user_id=admin))
        shown = await answer(await server.slash("mod limits show", {"user": member}, user_id=admin))
        assert f"images per request (`max_count`): **3** (role <@&{patrons}>)" in shown
        assert f"steps per image (`max_steps`): **4** (set for <@{member}>)" in shown
        assert "images per hour (`images_per_hour`): **10** (server default)" in shown
        assert "(`max_queued`): **3** (config default)" in shown

        text = await answer(await server.slash("imagine", {"prompt": "species:seal", "steps": 5}, user_id=member))
        assert "at most 4 steps" in text
        await final_message(server, await server.slash("imagine", {"prompt": "x", "count": 3}, user_id=member))
        text = await answer(await server.slash("imagine", {"prompt": "x", "count": 4}, user_id=member))
        assert "at most 3 images" in text
        # Without the user's override, the most generous role decides the steps; without the roles, the server.
        await answer(await server.slash("mod limits reset", {"user": member}, user_id=admin))
        await final_message(server, await server.slash("imagine", {"prompt": "x", "steps": 5}, user_id=member))
        server.set_roles(member, [])
        # Each interaction carries the member's roles as they are now: nothing to wait for.
        text = await answer(await server.slash("imagine", {"prompt": "x", "count": 2}, user_id=member))
        assert "at most 1 image at a time" in text


async def test_pause_refuses_new_requests_and_resume_renders_the_queue_in_order(harness: Harness) -> None:
    server = harness.server
    admin = server.add_user("admin", roles=[server.add_role("Admins", MANAGE_GUILD)])
    users = [server.add_user(f"user{i}") for i in range(3)]
    async with harness.bot() as bot:
        harness.render.open.clear()
        blocker = await server.slash("imagine", {"prompt": "species:seal"}, user_id=users[0])
        await server.wait_for_message(lambda m: m.interaction_id == blocker.id and "Rendering" in m.content)
        queued = [
            await server.slash("imagine", {"prompt": f"species:cat, {i}", "size": "64x96"}, user_id=users[1 + i])
            for i in range(2)
        ]
        for interaction in queued:
            await server.wait_for_message(lambda m, i=interaction: m.interaction_id == i.id and "Queued" in m.content)
        text = await answer(await server.slash("mod pause", {"reason": "model update"}, user_id=admin))
        assert "Paused" in text
        harness.render.open.set()
        await final_message(server, blocker)
        await server.wait_for_message(
            lambda m: m.interaction_id == queued[0].id and "paused the queue: model update" in m.content
        )
        await asyncio.sleep(0.5)
        assert harness.render.batches == [1]  # nothing new started
        refused = await answer(await server.slash("imagine", {"prompt": "species:dog"}, user_id=users[0]))
        assert "paused image generation: model update" in refused
        status = await answer(await server.slash("queue", user_id=users[1]))
        assert "2 jobs waiting" in status and "Paused by the moderators: model update" in status
        assert "position 1 in line" in status

        await answer(await server.slash("mod resume", user_id=admin))
        first, second = [await final_message(server, interaction) for interaction in queued]
        assert harness.render.batches == [1, 2]  # the two waiting jobs, together, after the resume
        await all_delivered(bot.db)
        assert job_id_of(first) < job_id_of(second)
        actions = [entry.action for entry in await bot.db.audit_log(guild_id=server.guild_id, count=5)]
        assert actions == ["resume", "pause"]


async def test_a_pause_lasts_across_a_restart_until_a_moderator_resumes(harness: Harness) -> None:
    server = harness.server
    admin = server.add_user("admin", roles=[server.add_role("Admins", MANAGE_GUILD)])
    async with harness.bot():
        harness.render.open.clear()
        blocker = await server.slash("imagine", {"prompt": "species:seal"})
        await server.wait_for_message(lambda m: m.interaction_id == blocker.id and "Rendering" in m.content)
        waiting = await server.slash("imagine", {"prompt": "species:cat", "size": "64x96"})
        await server.wait_for_message(lambda m: m.interaction_id == waiting.id and "Queued" in m.content)
        await answer(await server.slash("mod pause", user_id=admin))
        harness.render.open.set()
        await final_message(server, blocker)
    async with harness.bot():
        text = await answer(await server.slash("imagine", {"prompt": "species:dog"}))
        assert "The moderators have paused image generation." in text
        await asyncio.sleep(0.5)
        assert harness.render.batches == [1]  # the restored job waits too
        await answer(await server.slash("mod resume", user_id=admin))
        await final_message(server, waiting)
    assert harness.render.batches == [1, 1]


async def test_blocklist_channels_and_bans_apply_to_the_very_next_request(harness: Harness) -> None:
    server = harness.server
    admin = server.add_user("admin", roles=[server.add_role("Admins", MANAGE_GUILD)])
    member = server.add_user("member")
    elsewhere = server.add_channel("art")
    async with harness.bot():
        prompt = {"prompt": "species:seal, gloomy swamp"}
        await answer(await server.slash("mod blocklist add", {"term": "Gloomy"}, user_id=admin))
        text = await answer(await server.slash("imagine", prompt, user_id=member))
        assert "a term this server does not allow" in text and "loomy" not in text
        listed = await answer(await server.slash("mod blocklist list", user_id=admin))
        assert "||Gloomy||" in listed and "||forbidden||" in listed
        await answer(await server.slash("mod blocklist remove", {"term": "gloomy"}, user_id=admin))
        await final_message(server, await server.slash("imagine", prompt, user_id=member))

        await answer(await server.slash("mod channels allow", {"channel": elsewhere}, user_id=admin))
        text = await answer(await server.slash("imagine", {"prompt": "a"}, user_id=member))
        assert f"do not allow the bot to generate images in this channel. Try <#{elsewhere}>" in text
        await final_message(
            server, await server.slash("imagine", {"prompt": "a"}, user_id=member, channel_id=elsewhere)
        )
        await answer(await server.slash("mod channels deny", {"channel": elsewhere}, user_id=admin))
        text = await answer(await server.slash("imagine", {"prompt": "a"}, user_id=member, channel_id=elsewhere))
        assert "do not allow the bot" in text
        listed = await answer(await server.slash("mod channels list", user_id=admin))
        assert f"**Denied:** <#{elsewhere}>" in listed and "**Allowed:** none" in listed
        await answer(await server.slash("mod channels clear", {"channel": elsewhere}, user_id=admin))
        result = await final_message(server, await server.slash("imagine", {"prompt": "b"}, user_id=member))

        await answer(await server.slash("mod ban", {"user": member, "reason": "spam"}, user_id=admin))
        text = await answer(await server.slash("imagine", {"prompt": "c"}, user_id=member))
        assert "banned you from using the bot: spam" in text
        job_id = job_id_of(result)
        for custom_id in (f"imagine:reroll:{job_id}:0", f"imagine:vote:{job_id}:0:up"):
            click = await server.click(result.id, custom_id, user_id=member)
            assert "banned you" in await answer(click)
        await answer(await server.slash("mod unban", {"user": member}, user_id=admin))
        await final_message(server, await server.slash("imagine", {"prompt": "d"}, user_id=member))
        actions = [entry.action for entry in await harness_audit(harness)]
        assert actions == [
            "unban",
            "ban",
            "channels clear",
            "channels deny",
            "channels allow",
            "blocklist remove",
            "blocklist add",
        ]


async def harness_audit(harness: Harness) -> list[Any]:
    from bot.storage import Database

    async with await Database.open(harness.database) as db:
        return await db.audit_log(guild_id=harness.server.guild_id, count=20)


async def test_cancel_button_and_mod_cancel(harness: Harness) -> None:
    server = harness.server
    admin = server.add_user("admin", roles=[server.add_role("Admins", MANAGE_GUILD)])
    requester = server.add_user("requester")
    stranger = server.add_user("stranger")
    async with harness.bot() as bot:
        harness.render.open.clear()
        blocker = await server.slash("imagine", {"prompt": "species:seal"}, user_id=stranger)
        await server.wait_for_message(lambda m: m.interaction_id == blocker.id and "Rendering" in m.content)
        mine = await server.slash("imagine", {"prompt": "species:cat"}, user_id=requester)
        theirs = await server.slash("imagine", {"prompt": "species:dog"}, user_id=requester)
        waiting = await server.wait_for_message(lambda m: m.interaction_id == mine.id and "Queued" in m.content)
        await server.wait_for_message(lambda m: m.interaction_id == theirs.id and "Queued" in m.content)
        (cancel_id,) = waiting.custom_ids
        assert cancel_id.startswith("imagine:cancel:")
        job_id = int(cancel_id.rsplit(":", 1)[1])

        refused = await answer(await server.click(waiting.id, cancel_id, user_id=stranger))
        assert "Only the person who asked for this job, or a moderator" in refused
        done = await answer(await server.click(waiting.id, cancel_id, user_id=requester))
        assert f"Job {job_id} is cancelled" in done
        told = await server.wait_for_message(lambda m: m.id == waiting.id and "🚫" in m.content)
        assert "Cancelled by its requester" in told.content and told.custom_ids == []

        other_job = job_id + 1
        text = await answer(await server.slash("mod cancel", {"job": other_job, "reason": "off-topic"}, user_id=admin))
        assert f"Cancelled job {other_job} of <@{requester}>" in text
        told = await server.wait_for_message(lambda m: m.interaction_id == theirs.id and "🚫" in m.content)
        assert f"Cancelled by a moderator (<@{admin}>): off-topic" in told.content

        harness.render.open.set()
        await final_message(server, blocker)
        await asyncio.sleep(0.3)
        assert harness.render.batches == [1]  # the cancelled jobs never rendered
        for cancelled in (job_id, other_job):
            job = await job_when(bot.db, cancelled, JobStatus.CANCELLED)
            assert job.started_at is None
        assert not any(
            m.attachments for m in server.messages(server.channel_id) if m.interaction_id in (mine.id, theirs.id)
        )
        # Both gave their share of the hour back.
        limits = await answer(await server.slash("limits", user_id=requester))
        assert "used in the last hour: **0**" in limits
        text = await answer(await server.slash("mod cancel", {"job": job_id}, user_id=admin))
        assert "already ended" in text
        (entry,) = await bot.db.audit_log(guild_id=server.guild_id, count=5)
        assert (entry.action, entry.reason) == ("cancel", "off-topic")


async def test_a_burst_of_200_requests_is_answered_in_time_and_refused_privately(harness: Harness) -> None:
    server = harness.server
    harness.queue = QueueConfig(max_queue=64, max_batch=8, max_per_user=3, images_per_hour=5)
    users = [server.add_user(f"user{i}") for i in range(4)]
    async with harness.bot() as bot:
        harness.render.open.clear()
        await server.slash("queue")  # wait until the commands are synced
        started = time.monotonic()
        # Once the command is synced, slash() dispatches without waiting: the 200 go out back to back.
        interactions = [
            await server.slash("imagine", {"prompt": f"species:seal, {n}"}, user_id=users[n % 4]) for n in range(200)
        ]
        responses = await asyncio.gather(*(interaction.wait_response(10) for interaction in interactions))
        assert time.monotonic() - started < 10
        assert all(i.response_delay is not None and i.response_delay < 3 for i in interactions)
        accepted = [i for i, r in zip(interactions, responses, strict=True) if r["type"] == 5]
        refused = [i for i, r in zip(interactions, responses, strict=True) if r["type"] != 5]
        assert len(accepted) == 12  # 3 at once for each of the 4 users
        assert all(
            i.ephemeral and r["type"] == 4 for i, r in zip(interactions, responses, strict=True) if r["type"] != 5
        )
        assert all("You already have 3 jobs in the queue" in (i.response or {})["data"]["content"] for i in refused)
        harness.render.open.set()
        await asyncio.gather(*(final_message(server, interaction) for interaction in accepted))
        await all_delivered(bot.db)
    public = server.messages(server.channel_id)
    assert len(public) == 12 and all(message.attachments for message in public)
    assert not any("❌" in message.content for message in public)
