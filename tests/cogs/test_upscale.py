"""Upscale x2 and Vary (subtle, strong) through the real discord.py client on the fake Discord, tiny model, CPU."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import pytest

from bot.engine.types import Mode, Settings
from bot.jobs import JobKind, JobStatus
from cogs.imagine.buttons import Remix, RemixButton, result_view
from tests.cogs.conftest import GENERATION, Harness, final_message, job_id_of, job_when, pngs, remix_result
from tests.fakediscord import FakeDiscord, FakeInteraction, Message


def made_with(message: Message) -> dict[str, Any]:
    """Return the settings written into a result's first PNG (its ``sygil`` text chunk)."""
    return json.loads(pngs(message)[0].text["sygil"])  # type: ignore[attr-defined]


async def answer(interaction: FakeInteraction) -> str:
    return (await interaction.wait_response())["data"]["content"]


async def used(server: FakeDiscord, user_id: int) -> str:
    """Return what /limits says the member used in the last hour, in standard images."""
    text = await answer(await server.slash("limits", {}, user_id=user_id))
    return text.split("used in the last hour: **", 1)[1].split("**", 1)[0]


async def test_upscale_renders_twice_the_size_from_the_images_own_seed_as_a_reply(harness: Harness) -> None:
    server = harness.server
    async with harness.bot() as bot:
        options = {"prompt": "species:seal", "negative": "blurry", "size": "64x96", "count": 2, "seed": 7, "steps": 4}
        original = await final_message(server, await server.slash("imagine", options))
        job_id = job_id_of(original)
        click = await server.click(original.id, f"imagine:upscale:{job_id}:1")
        assert (await click.wait_response())["type"] == 5 and click.ephemeral  # its place in line is private
        upscaled = await remix_result(server, click)

        assert [image.size for image in pngs(upscaled)] == [(128, 192)]
        assert f"Upscale ×2 of image 2 from job {job_id}" in upscaled.content
        assert upscaled.reference is not None and upscaled.reference["message_id"] == str(original.id)
        job = await job_when(bot.db, job_id_of(upscaled), JobStatus.DONE)
        assert (job.kind, job.parent_job_id, job.parent_index) == (JobKind.UPSCALE, job_id, 1)
        # The same prompt, negative prompt, steps and guidance, and image 2's own seed (7 + 1).
        assert (job.prompt, job.negative_prompt, job.seed) == ("species:seal", "blurry", 8)
        assert job.settings == Settings(steps=4, guidance=7.0, width=128, height=192, mode=Mode.IMG2IMG, strength=0.35)
        png = made_with(upscaled)
        assert (png["seed"], png["width"], png["height"], png["mode"], png["strength"]) == (
            8,
            128,
            192,
            "img2img",
            0.35,
        )

        # An upscale has no Upscale button, and a forged one is refused privately.
        assert not [custom_id for custom_id in upscaled.custom_ids if ":upscale:" in custom_id]
        assert f"imagine:subtle:{job.id}:0" in upscaled.custom_ids
        refused = await server.click(upscaled.id, f"imagine:upscale:{job.id}:0", forged=True)
        assert "already an upscale" in await answer(refused) and refused.ephemeral
        # Its Reroll renders the prompt afresh at the size the upscaled image had.
        rerolled = await remix_result(server, await server.click(upscaled.id, f"imagine:reroll:{job.id}:0"))
        assert [image.size for image in pngs(rerolled)] == [(64, 96)]
        assert job_id_of(rerolled) == job.id + 1  # the refused upscale stored nothing


async def test_vary_subtle_and_strong_render_at_their_strengths_and_an_older_variation_button_is_subtle(
    harness: Harness,
) -> None:
    server = harness.server
    async with harness.bot() as bot:
        original = await final_message(server, await server.slash("imagine", {"prompt": "species:seal", "seed": 5}))
        job_id = job_id_of(original)
        subtle = await remix_result(server, await server.click(original.id, f"imagine:subtle:{job_id}:0"))
        strong = await remix_result(server, await server.click(original.id, f"imagine:strong:{job_id}:0"))
        # A message posted before Vary split in two has a Variation button per image (the fake's forged click: a
        # button this message lacks).
        older = await server.click(original.id, f"imagine:variation:{job_id}:0", forged=True)
        legacy = await remix_result(server, older)
        for message, strength, name in ((subtle, 0.35, "Subtle"), (strong, 0.7, "Strong"), (legacy, 0.35, "Subtle")):
            job = await job_when(bot.db, job_id_of(message), JobStatus.DONE)
            assert job.kind is JobKind.VARIATION and job.settings.mode is Mode.IMG2IMG
            assert job.settings.strength == made_with(message)["strength"] == strength
            assert f"{name} variation (strength {strength:g}) of image 1 from job {job_id}" in message.content
            assert [image.size for image in pngs(message)] == [(64, 64)]
            assert message.reference is not None and message.reference["message_id"] == str(original.id)
    assert pngs(subtle)[0].tobytes() != pngs(strong)[0].tobytes()


async def test_an_upscale_costs_four_times_its_image_and_is_refused_privately_past_the_hourly_limit(
    harness: Harness,
) -> None:
    harness.generation = dataclasses.replace(GENERATION, sizes=("64x64", "512x512"), max_steps=25)
    harness.queue = dataclasses.replace(harness.queue, images_per_hour=5)
    server = harness.server
    other = server.add_user("other")
    async with harness.bot() as bot:
        # One standard image, 512x512 at 25 steps (guidance 1: one UNet pass a step, half the CPU time).
        options = {"prompt": "species:seal", "size": "512x512", "steps": 25, "guidance": 1}
        original = await final_message(server, await server.slash("imagine", options), within=120)
        job_id = job_id_of(original)
        assert await used(server, server.user_id) == "1"

        harness.render.open.clear()
        blocker = await server.slash("imagine", {"prompt": "species:cat"}, user_id=other)
        await server.wait_for_message(lambda m: m.interaction_id == blocker.id and "Rendering" in m.content)
        upscale = await server.click(original.id, f"imagine:upscale:{job_id}:0")
        status = await server.wait_for_message(lambda m: m.interaction_id == upscale.id and "Queued" in m.content)
        assert upscale.ephemeral
        assert await used(server, server.user_id) == "5"  # 1 + 4: 1024x1024 at 25 steps
        upscale_job = await bot.db.get_job(job_id=job_id + 2)
        assert upscale_job is not None and upscale_job.kind is JobKind.UPSCALE
        assert (upscale_job.settings.width, upscale_job.settings.height) == (1024, 1024)

        # Another would count 4 more, past the 5 an hour: refused privately, and nothing is stored or posted.
        refused = await server.click(original.id, f"imagine:upscale:{job_id}:0")
        text = await answer(refused)
        assert refused.ephemeral and "You have used 5 of your 5 images per hour" in text
        assert "this upscale (it counts as 4 images)" in text
        assert await bot.db.get_job(job_id=job_id + 3) is None

        # Cancelled before it renders, the upscale gives its 4 back.
        (cancel_id,) = status.custom_ids
        assert "is cancelled" in await answer(await server.click(status.id, cancel_id))
        assert await used(server, server.user_id) == "1"
        harness.render.open.set()
        await final_message(server, blocker)
    posted = [job_id_of(message) for message in server.messages(server.channel_id) if message.attachments]
    assert posted == [job_id, job_id + 1]


async def test_upscales_of_two_members_are_rendered_in_one_batch(harness: Harness) -> None:
    server = harness.server
    painter, sculptor, other = (server.add_user(name) for name in ("painter", "sculptor", "other"))
    async with harness.bot():
        original = await final_message(server, await server.slash("imagine", {"prompt": "species:seal", "count": 2}))
        job_id = job_id_of(original)
        harness.render.open.clear()
        blocker = await server.slash("imagine", {"prompt": "species:cat"}, user_id=other)
        await server.wait_for_message(lambda m: m.interaction_id == blocker.id and "Rendering" in m.content)
        clicks = [
            await server.click(original.id, f"imagine:upscale:{job_id}:{index}", user_id=member)
            for index, member in enumerate((painter, sculptor))
        ]
        for click in clicks:
            await server.wait_for_message(lambda m, c=click: m.interaction_id == c.id and "Queued" in m.content)
        harness.render.open.set()
        upscaled = [await remix_result(server, click) for click in clicks]
    assert [pngs(message)[0].size for message in upscaled] == [(128, 128), (128, 128)]
    # The image, the blocker, then both upscales in one GPU call.
    assert harness.render.batches == [2, 1, 2]


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_result_buttons_fit_discords_five_rows_of_five(count: int) -> None:
    for upscalable in (True, False):
        view = result_view(7, count, upscalable=upscalable)
        rows = [[button["custom_id"] for button in row["components"]] for row in view.to_components()]
        assert len(rows) <= 5 and all(len(row) <= 5 for row in rows)
        upscale = ["upscale"] if upscalable else []
        if count == 1:
            expected = [
                [f"imagine:{action}:7:0" for action in ("reroll", "subtle", "strong", *upscale)],
                ["imagine:vote:7:0:up", "imagine:vote:7:0:down", "imagine:info:7", "imagine:delete:7"],
            ]
        else:
            expected = [
                [f"imagine:{action}:7:{index}" for action in (*upscale, "subtle", "strong")]
                + [f"imagine:vote:7:{index}:up", f"imagine:vote:7:{index}:down"]
                for index in range(count)
            ] + [["imagine:reroll:7:0", "imagine:info:7", "imagine:delete:7"]]
        assert rows == expected


def test_remix_custom_ids_round_trip_and_the_older_variation_id_still_matches() -> None:
    for action in Remix:
        button = RemixButton(12, 3, action, count=4)
        match = RemixButton.__discord_ui_compiled_template__.fullmatch(button.custom_id)
        assert match is not None and match["action"] == action.value and len(button.custom_id) <= 100
    assert RemixButton.__discord_ui_compiled_template__.fullmatch("imagine:variation:12:0") is not None
    assert RemixButton.__discord_ui_compiled_template__.fullmatch("imagine:upscale:12:0:x") is None
    assert RemixButton.__discord_ui_compiled_template__.fullmatch("imagine:zoom:12:0") is None


async def test_a_burst_of_upscale_clicks_takes_only_the_members_places_and_refuses_the_rest_privately(
    harness: Harness,
) -> None:
    server = harness.server
    async with harness.bot():
        original = await final_message(server, await server.slash("imagine", {"prompt": "species:seal", "steps": 6}))
        job_id = job_id_of(original)
        harness.render.open.clear()
        # Twenty clicks in the same moment; the member may have 3 jobs queued (queue.max_per_user).
        clicks = await asyncio.gather(*(server.click(original.id, f"imagine:upscale:{job_id}:0") for _ in range(20)))
        responses = await asyncio.gather(*(click.wait_response() for click in clicks))
        assert all(click.ephemeral for click in clicks), "every answer is private"
        accepted = [click for click in clicks if click.deferred]
        answered = zip(clicks, responses, strict=True)
        refusals = [response["data"]["content"] for click, response in answered if not click.deferred]
        assert len(accepted) == 3 and len(refusals) == 17
        assert all("You already have 3 jobs" in text for text in refusals)
        harness.render.open.set()
        results = await asyncio.gather(*(remix_result(server, click) for click in accepted))
    assert all(m.reference is not None and m.reference["message_id"] == str(original.id) for m in results)
    assert all(pngs(message)[0].size == (128, 128) for message in results)
    public = [message for message in server.messages(server.channel_id) if not message.ephemeral]
    assert len(public) == 4, "the original and the three upscales: nothing public of the refused clicks"
