"""/imagine through the real discord.py client, logged in to the fake Discord, with the tiny model on the CPU."""

from __future__ import annotations

import asyncio
import re
import threading

import pytest

from bot.engine.types import Mode
from bot.jobs import JobKind, JobStatus
from cogs.imagine.buttons import CancelButton, Remix, RemixButton, VoteButton
from tests.cogs.conftest import Harness, all_delivered, final_message, job_id_of, job_when, pngs, remix_result


async def test_imagine_defers_then_posts_images_with_buttons(harness: Harness) -> None:
    server = harness.server
    async with harness.bot() as bot:
        command = server.commands["imagine"]
        options = {option["name"]: option for option in command["options"]}
        assert options["steps"]["max_value"] == 8 and options["count"]["max_value"] == 4
        assert [choice["value"] for choice in options["size"]["choices"]] == ["64x64", "64x96"]

        interaction = await server.slash("imagine", {"prompt": "Species:Seal, studio:dc", "count": 2, "seed": 7})
        await interaction.wait_response()
        assert interaction.response_type == 5 and not interaction.ephemeral
        assert interaction.response_delay is not None and interaction.response_delay < 3
        message = await final_message(server, interaction)

        images = pngs(message)
        assert [image.size for image in images] == [(64, 64), (64, 64)]
        assert images[0].tobytes() != images[1].tobytes()
        assert "species:seal, studio:dc" in message.content and "seeds 7, 8" in message.content
        assert message.allowed_mentions == {"parse": []}
        job_id = int(message.attachments[0].filename.split("_")[1])
        assert message.custom_ids == [
            f"imagine:{action}:{job_id}:{index}{suffix}"
            for index in range(2)
            for action, suffix in (("upscale", ""), ("subtle", ""), ("strong", ""), ("vote", ":up"), ("vote", ":down"))
        ] + [f"imagine:reroll:{job_id}:0", f"imagine:info:{job_id}", f"imagine:delete:{job_id}"]
        job = await job_when(bot.db, job_id, JobStatus.DONE)
        assert job.message_id == message.id
        assert job.prompt == "species:seal, studio:dc" and job.user_id == server.user_id


async def test_same_seed_gives_the_same_image(harness: Harness) -> None:
    server = harness.server
    async with harness.bot():
        first = await server.slash("imagine", {"prompt": "species:seal", "seed": 123})
        first_image = pngs(await final_message(server, first))[0]
        second = await server.slash("imagine", {"prompt": "species:seal", "seed": 123})
        second_image = pngs(await final_message(server, second))[0]
    assert first_image.tobytes() == second_image.tobytes()


async def test_unknown_namespace_is_refused_privately_with_a_suggestion(harness: Harness) -> None:
    server = harness.server
    async with harness.bot() as bot:
        interaction = await server.slash("imagine", {"prompt": "speces:seal"})
        response = await interaction.wait_response()
        assert response["type"] == 4 and interaction.ephemeral
        assert "`species:`" in response["data"]["content"]
        assert await bot.db.unfinished_jobs() == []
    assert harness.render.batches == []


async def test_echoed_prompt_pings_no_one(harness: Harness) -> None:
    server = harness.server
    async with harness.bot():
        interaction = await server.slash("imagine", {"prompt": "@everyone species:seal, @here <@123>"})
        message = await final_message(server, interaction)
    assert "@everyone" in message.content
    assert message.allowed_mentions == {"parse": []}
    edits = [r for r in server.requests if r.method == "PATCH" and r.path.startswith("/webhooks/")]
    assert edits and all((r.json or {}).get("allowed_mentions") == {"parse": []} for r in edits)


async def test_users_see_their_place_in_line_and_jobs_share_a_batch(harness: Harness) -> None:
    server = harness.server
    other = server.add_user("other")
    third = server.add_user("third")
    async with harness.bot():
        harness.render.open.clear()
        first = await server.slash("imagine", {"prompt": "species:seal"})
        await server.wait_for_message(lambda m: m.interaction_id == first.id and "Rendering" in m.content)
        second = await server.slash("imagine", {"prompt": "species:cat"}, user_id=other)
        waiting = await server.wait_for_message(lambda m: m.interaction_id == second.id and "next in line" in m.content)
        last = await server.slash("imagine", {"prompt": "species:dog"}, user_id=third)
        await server.wait_for_message(lambda m: m.interaction_id == last.id and "position 2 in line" in m.content)
        assert waiting.allowed_mentions == {"parse": []}
        harness.render.open.set()
        for interaction in (first, second, last):
            await final_message(server, interaction)
    # The two waiting jobs had the same settings: one GPU call rendered both.
    assert harness.render.batches == [1, 2]


async def test_the_waiting_message_estimates_when_the_images_are_ready(harness: Harness) -> None:
    server = harness.server
    other, third = server.add_user("other"), server.add_user("third")
    async with harness.bot():
        await final_message(server, await server.slash("imagine", {"prompt": "species:seal"}))  # measures the speed
        harness.render.open.clear()
        first = await server.slash("imagine", {"prompt": "species:cat"}, user_id=other)
        await server.wait_for_message(lambda m: m.interaction_id == first.id and "Rendering" in m.content)
        second = await server.slash("imagine", {"prompt": "species:dog"}, user_id=third)
        waiting = await server.wait_for_message(lambda m: m.interaction_id == second.id and "next in line" in m.content)
        assert re.search(r"Ready in about \d+ s\.", waiting.content), waiting.content
        harness.render.open.set()
        for interaction in (first, second):
            await final_message(server, interaction)


async def test_reroll_and_variation_post_new_images(harness: Harness) -> None:
    server = harness.server
    async with harness.bot() as bot:
        original = await final_message(
            server, await server.slash("imagine", {"prompt": "species:seal", "size": "64x96"})
        )
        job_id = int(original.attachments[0].filename.split("_")[1])

        reroll = await server.click(original.id, f"imagine:reroll:{job_id}:0")
        assert (await reroll.wait_response())["type"] == 5 and reroll.ephemeral  # its place in line is private
        rerolled = await remix_result(server, reroll)
        assert pngs(rerolled)[0].size == (64, 96)
        assert "Reroll of image 1" in rerolled.content
        assert pngs(rerolled)[0].tobytes() != pngs(original)[0].tobytes()
        # The result is a public reply to the message it came from.
        assert not rerolled.ephemeral and rerolled.type == 19
        assert rerolled.reference is not None and rerolled.reference["message_id"] == str(original.id)

        variation = await server.click(original.id, f"imagine:subtle:{job_id}:0")
        varied = await remix_result(server, variation)
        assert pngs(varied)[0].size == (64, 96)
        assert f"Subtle variation (strength 0.35) of image 1 from job {job_id}" in varied.content
        assert varied.reference is not None and varied.reference["message_id"] == str(original.id)
        assert varied.allowed_mentions is not None and varied.allowed_mentions["parse"] == []

        reroll_job = await bot.db.get_job(job_id=int(rerolled.attachments[0].filename.split("_")[1]))
        variation_job = await bot.db.get_job(job_id=int(varied.attachments[0].filename.split("_")[1]))
        assert variation_job is not None

        # The buttons of a variation work too; its reroll renders the prompt afresh at the same size.
        again = await remix_result(server, await server.click(varied.id, f"imagine:reroll:{variation_job.id}:0"))
        assert pngs(again)[0].size == (64, 96)
        assert again.reference is not None and again.reference["message_id"] == str(varied.id)
        job = await job_when(bot.db, variation_job.id, JobStatus.DONE)
        assert job.message_id == varied.id  # the variation's own message is the parent its remixes reply to

        # A remix whose parent's message is deleted while it waits is posted as a plain message.
        harness.render.open.clear()
        orphan = await server.click(varied.id, f"imagine:strong:{variation_job.id}:0")
        await server.wait_for_message(lambda m: m.interaction_id == orphan.id and "Rendering" in m.content)
        await server.click(varied.id, f"imagine:delete:{variation_job.id}")
        await server.wait_for_message(lambda m: m.id == varied.id and m.deleted)
        harness.render.open.set()
        plain = await remix_result(server, orphan)
        assert plain.reference is None and plain.type == 0
        assert "Strong variation (strength 0.7) of image 1" in plain.content
    assert reroll_job is not None and reroll_job.kind is JobKind.REROLL and reroll_job.parent_job_id == job_id
    assert variation_job is not None and variation_job.settings.mode is Mode.IMG2IMG
    assert variation_job.prompt == reroll_job.prompt == "species:seal"


async def test_info_shows_what_made_the_images_and_the_parent(harness: Harness) -> None:
    server = harness.server
    revision = harness.render.engine.revision
    assert revision is not None
    async with harness.bot():
        options = {"prompt": "species:seal, studio:dc", "negative": "blurry", "seed": 41, "steps": 4, "guidance": 5.5}
        original = await final_message(server, await server.slash("imagine", options))
        job_id = job_id_of(original)
        info = await server.click(original.id, f"imagine:info:{job_id}")
        text = (await info.wait_response())["data"]["content"]
        assert info.ephemeral
        for expected in (
            "species:seal, studio:dc",
            "blurry",
            "species:seal, studio:dc",
            "seed `41`",
            "4 steps",
            "guidance 5.5",
            "64×64",
            "dpm++",
            f"revision `{revision}`",
            "batch ",
            "of 1",
            "waited ",
        ):
            assert expected in text, (expected, text)

        varied = await remix_result(server, await server.click(original.id, f"imagine:subtle:{job_id}:0"))
        info = await server.click(varied.id, f"imagine:info:{job_id_of(varied)}")
        text = (await info.wait_response())["data"]["content"]
        assert f"**Parent:** image 1 of job {job_id} (variation)" in text
        assert "img2img strength" in text


async def test_delete_is_for_the_requester_or_a_moderator(harness: Harness) -> None:
    server = harness.server
    stranger = server.add_user("stranger")
    async with harness.bot() as bot:
        message = await final_message(server, await server.slash("imagine", {"prompt": "species:seal"}))
        job_id = job_id_of(message)
        refused = await server.click(message.id, f"imagine:delete:{job_id}", user_id=stranger)
        assert "Only the person who asked" in (await refused.wait_response())["data"]["content"]
        assert refused.ephemeral and not server.message(message.id).deleted

        deleted = await server.click(message.id, f"imagine:delete:{job_id}")
        assert "are deleted" in (await deleted.wait_response())["data"]["content"] and deleted.ephemeral
        for _ in range(100):
            if server.message(message.id).deleted:
                break
            await asyncio.sleep(0.02)
        assert server.message(message.id).deleted
        # The rows stay for the statistics, marked deleted.
        [image] = await bot.db.job_images(job_id=job_id)
        assert image.deleted_at is not None


async def test_votes_land_in_sqlite_and_change_or_withdraw(harness: Harness) -> None:
    server = harness.server
    voter = server.add_user("voter")
    async with harness.bot() as bot:
        message = await final_message(server, await server.slash("imagine", {"prompt": "species:seal", "count": 2}))
        job_id = int(message.attachments[0].filename.split("_")[1])

        up = await server.click(message.id, f"imagine:vote:{job_id}:1:up", user_id=voter)
        assert (await up.wait_response())["type"] == 7
        assert (await bot.db.vote_tally(job_id=job_id, index=1, user_id=voter)).mine == 1
        note = await server.wait_for_message(lambda m: m.interaction_id == up.id and m.ephemeral)
        assert "👍 on image 2 is recorded" in note.content
        button = next(c for row in server.message(message.id).components for c in row["components"]
                      if c["custom_id"] == f"imagine:vote:{job_id}:1:up")  # fmt: skip
        assert button["label"] == "1"

        down = await server.click(message.id, f"imagine:vote:{job_id}:1:down", user_id=voter)
        await down.wait_response()
        tally = await bot.db.vote_tally(job_id=job_id, index=1, user_id=voter)
        assert (tally.up, tally.down, tally.mine) == (0, 1, -1)

        again = await server.click(message.id, f"imagine:vote:{job_id}:1:down", user_id=voter)
        await server.wait_for_message(lambda m: m.interaction_id == again.id and "withdrawn" in m.content)
        tally = await bot.db.vote_tally(job_id=job_id, index=1)
        assert (tally.up, tally.down) == (0, 0)


async def test_buttons_keep_working_after_a_restart(harness: Harness) -> None:
    server = harness.server
    async with harness.bot():
        message = await final_message(server, await server.slash("imagine", {"prompt": "species:seal"}))
    job_id = int(message.attachments[0].filename.split("_")[1])

    async with harness.bot() as bot:
        vote = await server.click(message.id, f"imagine:vote:{job_id}:0:up")
        await vote.wait_response()
        reroll = await server.click(message.id, f"imagine:reroll:{job_id}:0")
        rerolled = await remix_result(server, reroll)
        tally = await bot.db.vote_tally(job_id=job_id, index=0)
    assert tally.up == 1
    assert pngs(rerolled)[0].size == (64, 64)


async def test_jobs_queued_at_shutdown_are_delivered_after_a_restart(harness: Harness) -> None:
    server = harness.server
    async with harness.bot():
        harness.render.open.clear()
        first = await server.slash("imagine", {"prompt": "species:seal"})
        await server.wait_for_message(lambda m: m.interaction_id == first.id and "Rendering" in m.content)
        waiting = await server.slash("imagine", {"prompt": "species:cat, meadow"})
        await server.wait_for_message(lambda m: m.interaction_id == waiting.id and "next in line" in m.content)
        # Shutting down waits for the batch on the GPU: let it finish soon after the bot has stopped.
        threading.Timer(0.5, harness.render.open.set).start()
    assert not any(m.attachments for m in server.messages(server.channel_id))

    async with harness.bot() as bot:
        delivered = await server.wait_for_message(
            lambda m: "species:cat, meadow" in m.content and bool(m.attachments), timeout=60
        )
        await server.wait_for_message(lambda m: "species:seal" in m.content and bool(m.attachments), timeout=60)
        await all_delivered(bot.db)
    # The token is still alive: the results land in the messages that showed the jobs' place in line.
    assert delivered.interaction_id == waiting.id
    assert f"<@{server.user_id}>" in delivered.content and delivered.allowed_mentions == {"parse": []}


async def test_forged_custom_ids_are_answered_not_crashed(harness: Harness) -> None:
    server = harness.server
    async with harness.bot():
        message = await final_message(server, await server.slash("imagine", {"prompt": "species:seal"}))
        job_id = int(message.attachments[0].filename.split("_")[1])
        # A custom_id naming an image the job does not have: the fake only lets us click ids on the message,
        # so forge one by editing the stored components, as a malicious client could send any id.
        row = server.message(message.id).components[0]["components"]
        row[0] = {**row[0], "custom_id": f"imagine:reroll:{job_id}:7"}
        row[2] = {**row[2], "custom_id": "imagine:vote:999999:0:up"}
        bad_reroll = await server.click(message.id, f"imagine:reroll:{job_id}:7")
        response = await bad_reroll.wait_response()
        assert bad_reroll.ephemeral and "no longer in the database" in response["data"]["content"]
        bad_vote = await server.click(message.id, "imagine:vote:999999:0:up")
        response = await bad_vote.wait_response()
        assert bad_vote.ephemeral and "no longer in the database" in response["data"]["content"]


def test_custom_ids_round_trip_through_their_templates() -> None:
    for item in (
        RemixButton(12, 3, Remix.REROLL),
        RemixButton(12, 0, Remix.VARIATION),
        VoteButton(12, 1, "down"),
        CancelButton(12),
    ):
        match = type(item).__discord_ui_compiled_template__.fullmatch(item.custom_id)
        assert match is not None and len(item.custom_id) <= 100
    assert RemixButton.__discord_ui_compiled_template__.fullmatch("imagine:reroll:12:3:extra") is None
    assert RemixButton.__discord_ui_compiled_template__.fullmatch("imagine:imagine:12:3") is None
    assert VoteButton.__discord_ui_compiled_template__.fullmatch("imagine:vote:12:1:sideways") is None
    assert CancelButton.__discord_ui_compiled_template__.fullmatch("imagine:cancel:0") is None


async def test_queue_full_is_refused_privately(harness: Harness) -> None:
    server = harness.server
    async with harness.bot():
        harness.render.open.clear()
        tickets = [await server.slash("imagine", {"prompt": f"species:seal, {i}"}) for i in range(3)]
        for interaction in tickets:
            # Wait until each job is stored and queued: its status shows.
            await server.wait_for_message(
                lambda m, i=interaction: m.interaction_id == i.id and m.content.startswith(("⏳", "🎨"))
            )
        refused = await server.slash("imagine", {"prompt": "species:seal, 4"})
        response = await refused.wait_response()
        assert refused.ephemeral and "You already have 3 jobs" in response["data"]["content"]
        harness.render.open.set()
        await asyncio.gather(*(final_message(server, interaction) for interaction in tickets))


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("species:seal, subreddit:aww", "`subreddit:` records where a training image came from"),
        ("style:anime", "`style:` is not a namespace Sygil knows"),
        ("species:seal, rating:explicit", "age-restricted"),
        ("species:seal, f0rbidden", "a term this server does not allow"),
        (", ".join(["species:seal"] * 20) + ", last words", "82 tokens long and the model reads only 75"),
    ],
)
async def test_prompt_refusals_are_private_and_specific(harness: Harness, prompt: str, expected: str) -> None:
    server = harness.server
    async with harness.bot() as bot:
        interaction = await server.slash("imagine", {"prompt": prompt})
        response = await interaction.wait_response()
        assert response["type"] == 4 and interaction.ephemeral
        assert expected in response["data"]["content"]
        assert "rbidden" not in response["data"]["content"]
        assert await bot.db.unfinished_jobs() == []


async def test_negative_prompt_follows_the_same_rules(harness: Harness) -> None:
    server = harness.server
    async with harness.bot():
        interaction = await server.slash("imagine", {"prompt": "species:seal", "negative": "speces:cat"})
        response = await interaction.wait_response()
        assert interaction.ephemeral and "Did you mean `species:`?" in response["data"]["content"]


async def test_mature_ratings_render_in_age_restricted_channels(harness: Harness) -> None:
    server = harness.server
    nsfw = server.add_channel("after-dark", nsfw=True)
    async with harness.bot():
        interaction = await server.slash("imagine", {"prompt": "species:seal, rating:explicit"}, channel_id=nsfw)
        message = await final_message(server, interaction)
    assert message.channel_id == nsfw and "rating:explicit" in message.content


async def test_notes_reach_the_user(harness: Harness) -> None:
    server = harness.server
    async with harness.bot():
        interaction = await server.slash("imagine", {"prompt": "artist:chris_rallis, species:seal"})
        message = await final_message(server, interaction)
    assert "creator:chris rallis, species:seal" in message.content
    assert "`artist:` became `creator:`" in message.content


async def test_autocomplete_suggests_namespaces_and_tags(harness: Harness) -> None:
    server = harness.server
    nsfw = server.add_channel("after-dark", nsfw=True)
    async with harness.bot():
        namespaces = await server.autocomplete("imagine", {"prompt": "spe"}, focused="prompt")
        tags = await server.autocomplete("imagine", {"prompt": "a beach, species:se"}, focused="prompt")
        negative = await server.autocomplete("imagine", {"prompt": "x", "negative": "stu"}, focused="negative")
        ratings = await server.autocomplete("imagine", {"prompt": "rating:"}, focused="prompt")
        mature = await server.autocomplete("imagine", {"prompt": "rating:"}, focused="prompt", channel_id=nsfw)
        nothing = await server.autocomplete("imagine", {"prompt": "speces:"}, focused="prompt")
    assert namespaces[0]["value"] == "species:"
    assert "a beach, species:seal" in [choice["value"] for choice in tags]
    assert all(choice["value"].startswith("a beach, species:se") for choice in tags)
    assert negative[0]["value"] == "studio:"
    assert [choice["value"] for choice in ratings] == ["rating:safe"]
    assert "rating:explicit" in [choice["value"] for choice in mature]
    assert nothing == []
    for choices in (namespaces, tags, negative, mature):
        assert 0 < len(choices) <= 25
        assert all(len(choice["name"]) <= 100 and len(choice["value"]) <= 100 for choice in choices)
    answered = [i for i in server.interactions if i.kind == "autocomplete"]
    assert all(i.response_delay is not None and i.response_delay < 0.5 for i in answered)
