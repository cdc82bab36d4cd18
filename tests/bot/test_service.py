from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import stat
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bot.admission import Admission, InvalidRequest, Requester
from bot.config import Config, GenerationConfig, PromptsConfig, QueueConfig, StorageConfig, VariationConfig
from bot.engine.executor import Progress, ThreadWorker
from bot.engine.types import ImageSpec, Mode, RenderedImage, Settings
from bot.errors import JobCancelled, JobNotFound, PromptRejected, QueueFull, Refused
from bot.jobs import JobKind, JobStatus
from bot.limits import Limits, Scope
from bot.moderation import Target, server_target
from bot.prompts import Tokenizer
from bot.scheduler import Scheduler
from bot.service import ImageService, Queued, open_service
from bot.storage import Database

GENERATION = GenerationConfig(sizes=("64x64", "64x96", "768x512"), max_steps=50, max_count=4)
GUILD = 2
MODERATOR = 99


def render(specs: Sequence[ImageSpec], progress: Progress | None = None, /) -> list[RenderedImage]:
    return [
        RenderedImage(png=f"{spec.prompt}|{spec.seed}|{spec.settings.mode}".encode(), seed=spec.seed) for spec in specs
    ]


class HeldRender:
    """Renders only once the test lets it, so jobs stay queued."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def __call__(self, specs: Sequence[ImageSpec], progress: Progress | None = None, /) -> list[RenderedImage]:
        self.gate.wait(5)
        return render(specs)


def config(**queue: int) -> Config:
    return Config(
        token="unused",
        generation=GENERATION,
        prompts=PromptsConfig(rating_channels=(77,), blocklist=("forbidden",)),
        queue=QueueConfig(**{"max_per_user": 2, **queue}),
    )


@pytest.fixture
async def service(tmp_path: Path, clip_tokenizer: Tokenizer) -> AsyncIterator[ImageService]:
    async with await Database.open(tmp_path / "sygil.db") as db, Scheduler(render) as scheduler:
        yield await open_service(config(), db=db, scheduler=scheduler, model="tiny", tokenizer=clip_tokenizer)


def asker(user_id: int = 1, **overrides: object) -> Requester:
    params: dict[str, object] = {"user_id": user_id, "guild_id": GUILD, "channel_id": 3}
    params.update(overrides)
    return Requester(**params)  # type: ignore[arg-type]


def admit(service: ImageService, user_id: int = 1, *, who: Requester | None = None, **options: Any) -> Admission:
    params: dict[str, Any] = {"prompt": "Species:Seal"}
    params.update(options)
    return service.admit(who or asker(user_id), **params)


async def finish(service: ImageService, queued: Queued) -> list[RenderedImage]:
    images = await service.wait(queued)
    await service.complete(queued, message_id=None)
    return images


async def test_imagine_stores_queues_and_finishes(service: ImageService) -> None:
    admission = admit(service, seed=41, count=3, size="64x96", steps=12, guidance=5.5, negative="blurry")
    assert admission.request.prompt == "species:seal"
    queued = await service.enqueue(admission)
    images = await finish(service, queued)
    assert [image.seed for image in images] == [41, 42, 43]
    job = await service.db.get_job(job_id=queued.job.id)
    assert job is not None and job.status is JobStatus.DONE
    assert (job.settings.width, job.settings.height, job.settings.steps, job.settings.guidance) == (64, 96, 12, 5.5)
    assert job.negative_prompt == "blurry" and job.count == 3
    image = await service.db.get_image(job_id=job.id, index=2)
    assert image is not None and image.seed == 43


async def test_defaults_come_from_the_settings(service: ImageService) -> None:
    request = admit(service).request
    assert (
        request.count == 1
        and request.settings.steps == 25
        and (request.settings.width, request.settings.height) == (64, 64)
    )
    assert 0 <= request.seed < 2**32


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"steps": 51}, "steps must be between 1 and 50"),
        ({"guidance": 40.0}, "guidance must be between 1 and 15"),
        ({"count": 5}, "count must be between 1 and 4"),
        ({"size": "512x512"}, "size must be one of 64x64, 64x96"),
        ({"seed": -1}, "seed must be between 0 and 4294967295"),
    ],
)
def test_out_of_bounds_settings_are_named(service: ImageService, overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        admit(service, **overrides)
    assert service.scheduler.jobs_of(user_id=1, guild_id=GUILD) == 0


def test_bad_prompts_are_refused_before_anything_is_taken(service: ImageService) -> None:
    with pytest.raises(PromptRejected, match="Did you mean `species:`"):
        admit(service, prompt="speces:seal")
    with pytest.raises(PromptRejected, match="negative prompt"):
        admit(service, negative="cat " * 80)
    with pytest.raises(PromptRejected, match="age-restricted"):
        admit(service, prompt="species:seal, rating:explicit")
    assert admit(service, who=asker(age_restricted=True), prompt="species:seal, rating:explicit").request.prompt
    assert admit(service, who=asker(channel_id=77), prompt="species:seal, rating:explicit").request.prompt
    with pytest.raises(PromptRejected, match="does not allow"):
        admit(service, negative="Forbidden things")
    assert service.usage.used(guild_id=GUILD, user_id=1) == 2  # only the two accepted ones


@pytest.mark.parametrize(
    "negative",
    ["speces:blur", "title:blurry", "rating:explicit", "species:", "Forbidden things", "cat " * 80],
)
def test_a_refused_negative_prompt_is_named(service: ImageService, negative: str) -> None:
    with pytest.raises(PromptRejected) as refused:
        admit(service, negative=negative)
    assert "negative prompt" in str(refused.value)


async def test_reroll_keeps_everything_but_the_seed(service: ImageService) -> None:
    parent = await service.enqueue(admit(service, seed=5, count=2, steps=9))
    await finish(service, parent)
    job = await service.source(job_id=parent.job.id, index=1, guild_id=GUILD)
    request = service.admit_remix(asker(9), kind=JobKind.REROLL, parent=job, index=1).request
    assert request.kind is JobKind.REROLL and request.count == 1 and request.user_id == 9
    assert request.settings == parent.job.settings and request.prompt == parent.job.prompt
    assert request.parent == (parent.job.id, 1)


async def test_variation_is_img2img_from_the_image(service: ImageService) -> None:
    parent = await service.enqueue(admit(service))
    await finish(service, parent)
    job = await service.source(job_id=parent.job.id, index=0, guild_id=GUILD)
    admission = service.admit_remix(asker(), kind=JobKind.VARIATION, parent=job, index=0)
    request = admission.request
    assert request.settings.mode is Mode.IMG2IMG and request.settings.strength == VariationConfig().subtle
    with pytest.raises(ValueError, match="init image"):
        await service.enqueue(admission)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    queued = await service.enqueue(admission, init_image=buffer.getvalue())
    (image,) = await finish(service, queued)
    assert image.png.endswith(b"img2img")

    # A reroll of a variation is a plain txt2img render of the same prompt and size.
    varied = await service.source(job_id=queued.job.id, index=0, guild_id=GUILD)
    reroll = service.admit_remix(asker(), kind=JobKind.REROLL, parent=varied, index=0)
    assert reroll.request.settings.mode is Mode.TXT2IMG and reroll.request.settings.width == job.settings.width
    (image,) = await finish(service, await service.enqueue(reroll))
    assert image.png.endswith(b"txt2img")


async def test_buttons_on_unknown_or_foreign_images_are_refused(service: ImageService) -> None:
    with pytest.raises(JobNotFound):
        await service.source(job_id=999, index=0, guild_id=GUILD)
    parent = await service.enqueue(admit(service, count=1))
    await finish(service, parent)
    with pytest.raises(JobNotFound):
        await service.source(job_id=parent.job.id, index=3, guild_id=GUILD)
    # A forged custom_id naming another server's job does not leak its prompt.
    with pytest.raises(JobNotFound):
        await service.source(job_id=parent.job.id, index=0, guild_id=GUILD + 1)


async def test_a_remix_is_checked_against_todays_blocklist(service: ImageService) -> None:
    parent = await service.enqueue(admit(service, prompt="species:seal, meadow"))
    await finish(service, parent)
    job = await service.source(job_id=parent.job.id, index=0, guild_id=GUILD)
    await service.moderation.add_term(GUILD, MODERATOR, "meadow")
    with pytest.raises(PromptRejected, match="does not allow"):
        service.admit_remix(asker(), kind=JobKind.REROLL, parent=job, index=0)


async def test_queued_limit_applies_before_storing(tmp_path: Path) -> None:
    held = HeldRender()
    async with await Database.open(tmp_path / "sygil.db") as db, Scheduler(held) as scheduler:
        service = await open_service(config(), db=db, scheduler=scheduler, model="tiny")
        first = await service.enqueue(admit(service))
        second = admit(service)  # not stored yet, but its place is taken
        with pytest.raises(QueueFull, match="You already have 2 jobs"):
            admit(service)
        second_queued = await service.enqueue(second)
        assert len(await db.unfinished_jobs()) == 2
        assert admit(service, 2).request.user_id == 2
        held.gate.set()
        await finish(service, first)
        await finish(service, second_queued)
        assert admit(service).request.user_id == 1


async def test_a_burst_cannot_overshoot_the_limits(tmp_path: Path) -> None:
    held = HeldRender()
    async with await Database.open(tmp_path / "sygil.db") as db, Scheduler(held, max_queue=100) as scheduler:
        service = await open_service(config(max_per_user=3), db=db, scheduler=scheduler, model="tiny")
        await service.moderation.set_limits(GUILD, MODERATOR, server_target(GUILD), Limits(images_per_hour=5))

        async def request(user_id: int) -> Queued | str:
            # What the cog does: admit without awaiting, then await the database.
            try:
                admission = admit(service, user_id)
            except (QueueFull, Refused) as exc:
                return str(exc)
            await asyncio.sleep(0)
            return await service.enqueue(admission)

        outcomes = await asyncio.gather(*(request(user_id) for user_id in (1, 2, 3, 4) for _ in range(50)))
        accepted = [outcome for outcome in outcomes if isinstance(outcome, Queued)]
        assert len(accepted) == 12  # 3 at once each, though each could make 5 this hour
        assert len(await db.unfinished_jobs()) == 12
        held.gate.set()
        await asyncio.gather(*(finish(service, queued) for queued in accepted))
        # Now the hourly limit stops each user after 2 more.
        more = await asyncio.gather(*(request(user_id) for user_id in (1, 2, 3, 4) for _ in range(10)))
        assert sum(isinstance(outcome, Queued) for outcome in more) == 8
        refusals = {outcome for outcome in more if isinstance(outcome, str)}
        assert all("of your 5 images per hour" in text and "in 60 min" in text for text in refusals)
        await asyncio.gather(*(finish(service, queued) for queued in more if isinstance(queued, Queued)))


async def test_hourly_limit_counts_bigger_and_longer_images_more(service: ImageService) -> None:
    moderation = service.moderation
    await moderation.set_limits(GUILD, MODERATOR, Target(Scope.USER, 1), Limits(images_per_hour=4))
    with pytest.raises(Refused, match=r"counts as 6 images .* more than your limit of 4"):
        admit(service, size="768x512", steps=50, count=2)
    big = await service.enqueue(admit(service, size="768x512", steps=50))  # counts 3
    assert service.usage.used(guild_id=GUILD, user_id=1) == 3
    small = await service.enqueue(admit(service, steps=3))  # small images count 1
    with pytest.raises(
        Refused, match=r"You have used 4 of your 4 images per hour\. You can make another image in 60 min"
    ):
        admit(service)
    # Other users are not affected.
    assert admit(service, 2, count=4).request.count == 4
    await finish(service, big)
    await finish(service, small)


async def test_user_and_role_overrides_combine_field_by_field(service: ImageService) -> None:
    moderation = service.moderation
    artists, helpers = 501, 502
    await moderation.set_limits(GUILD, MODERATOR, server_target(GUILD), Limits(images_per_hour=10, max_count=2))
    await moderation.set_limits(GUILD, MODERATOR, Target(Scope.ROLE, artists), Limits(images_per_hour=30))
    await moderation.set_limits(GUILD, MODERATOR, Target(Scope.ROLE, helpers), Limits(images_per_hour=20, max_count=3))
    await moderation.set_limits(GUILD, MODERATOR, Target(Scope.USER, 1), Limits(max_count=1))

    plain = moderation.limits(GUILD, 2)
    assert (plain.images_per_hour, plain.max_count, plain.max_queued) == (10, 2, 2)
    both = moderation.limits(GUILD, 2, [artists, helpers])
    assert (both.images_per_hour, both.max_count) == (30, 3)  # the most generous role, field by field
    assert both.origins["images_per_hour"].role_id == artists and both.origins["max_count"].role_id == helpers
    own = moderation.limits(GUILD, 1, [artists, helpers])
    assert (own.images_per_hour, own.max_count) == (30, 1)  # the user's own override wins where it is set
    assert own.origins["max_count"].kind is Scope.USER and own.origins["max_queued"].kind is None
    with pytest.raises(Refused, match="at most 1 image at a time"):
        admit(service, 1, who=asker(1, role_ids=(artists,)), count=2)
    assert admit(service, who=asker(3, role_ids=(helpers,)), count=3).request.count == 3
    await moderation.reset_limits(GUILD, MODERATOR, Target(Scope.USER, 1))
    assert moderation.limits(GUILD, 1, [artists, helpers]).max_count == 3


async def test_a_cancelled_job_never_renders_and_gives_its_share_back(tmp_path: Path) -> None:
    held = HeldRender()
    async with await Database.open(tmp_path / "sygil.db") as db, Scheduler(held) as scheduler:
        service = await open_service(config(), db=db, scheduler=scheduler, model="tiny")
        running = await service.enqueue(admit(service, 5))
        waiting = await service.enqueue(admit(service))
        wait = asyncio.ensure_future(service.wait(waiting))
        assert service.usage.used(guild_id=GUILD, user_id=1) == 1
        with pytest.raises(Refused, match="Only the person who asked"):
            await service.cancel(job_id=waiting.job.id, guild_id=GUILD, actor_id=7, moderator=False)
        with pytest.raises(JobNotFound):
            await service.cancel(job_id=waiting.job.id, guild_id=GUILD + 1, actor_id=1, moderator=False)
        await service.cancel(job_id=waiting.job.id, guild_id=GUILD, actor_id=MODERATOR, moderator=True, reason="spam")
        with pytest.raises(JobCancelled, match="spam"):
            await wait
        assert service.usage.used(guild_id=GUILD, user_id=1) == 0
        job = await db.get_job(job_id=waiting.job.id)
        assert job is not None and job.status is JobStatus.CANCELLED
        (entry,) = await db.audit_log(guild_id=GUILD, count=5)
        assert (entry.action, entry.moderator_id, entry.reason) == ("cancel", MODERATOR, "spam")
        with pytest.raises(Refused, match="already ended"):
            await service.cancel(job_id=waiting.job.id, guild_id=GUILD, actor_id=1, moderator=False)
        held.gate.set()
        await finish(service, running)
    # After a restart, the usage read back from the database still leaves the cancelled job out.
    async with await Database.open(tmp_path / "sygil.db") as db, Scheduler(render) as scheduler:
        service = await open_service(config(), db=db, scheduler=scheduler, model="tiny")
        assert service.usage.used(guild_id=GUILD, user_id=1) == 0
        assert service.usage.used(guild_id=GUILD, user_id=5) == 1


async def test_restore_requeues_unfinished_jobs_and_variations(tmp_path: Path) -> None:
    path = tmp_path / "sygil.db"
    async with await Database.open(path) as db:
        for prompt in ("species:seal", "species:cat"):
            await db.create_job(
                kind=JobKind.IMAGINE,
                user_id=1,
                guild_id=GUILD,
                channel_id=3,
                prompt=prompt,
                negative_prompt="",
                seed=100,
                count=2,
                settings=Settings(steps=5, width=64, height=64),
                model="tiny",
                scheduler="dpm++",
            )
        await db.create_job(
            kind=JobKind.VARIATION,
            user_id=2,
            guild_id=GUILD,
            channel_id=3,
            prompt="species:dog",
            negative_prompt="",
            seed=5,
            count=1,
            settings=Settings(steps=5, width=64, height=64, mode=Mode.IMG2IMG),
            model="tiny",
            scheduler="dpm++",
            init_image=b"source png",
        )
    async with await Database.open(path) as db, Scheduler(render) as scheduler:
        service = await open_service(config(max_per_user=1), db=db, scheduler=scheduler, model="tiny")
        restored = await service.restore()
        assert [queued.job.prompt for queued in restored] == ["species:seal", "species:cat", "species:dog"]
        assert restored[2].ticket.specs[0].init_image == b"source png"
        images = [await finish(service, queued) for queued in restored]
        assert [image.seed for image in images[0]] == [100, 101]
        assert images[2][0].png.endswith(b"img2img")
        assert await db.unfinished_jobs() == []
        assert await db.init_image(job_id=restored[2].job.id) is None  # kept only while needed


async def test_server_rules_refuse_privately_and_take_effect_at_once(service: ImageService) -> None:
    moderation = service.moderation
    await moderation.ban(GUILD, MODERATOR, 1, "spamming")
    with pytest.raises(Refused, match="banned you from using the bot: spamming"):
        admit(service)
    await moderation.unban(GUILD, MODERATOR, 1, None)
    assert admit(service).request

    await moderation.set_channel(GUILD, MODERATOR, 3, "deny")
    with pytest.raises(Refused, match="do not allow the bot"):
        admit(service)
    await moderation.set_channel(GUILD, MODERATOR, 4, "allow")
    await moderation.set_channel(GUILD, MODERATOR, 3, None)
    with pytest.raises(Refused, match="Try <#4>"):
        admit(service)
    assert admit(service, who=asker(2, channel_id=4)).request
    assert admit(service, who=asker(3, channel_id=40, parent_channel_id=4)).request  # a thread of an allowed one

    await moderation.pause(GUILD, MODERATOR, "maintenance")
    with pytest.raises(Refused, match="paused image generation: maintenance"):
        admit(service, who=asker(4, channel_id=4))
    await moderation.resume(GUILD, MODERATOR)

    service.accepting = False
    with pytest.raises(Refused, match="restarting"):
        admit(service, who=asker(4, channel_id=4))


async def test_each_image_records_what_made_it_and_the_jobs_tags(tmp_path: Path, clip_tokenizer: Tokenizer) -> None:
    worker = ThreadWorker(render, name="gpu0", facts={"revision": "sha256:abc", "dtype": "float16", "compiled": True})
    settings = dataclasses.replace(config(), storage=StorageConfig(path=tmp_path / "sygil.db", keep_images=True))
    async with (
        await Database.open(tmp_path / "sygil.db") as db,
        Scheduler(workers=[worker], max_batch=4) as scheduler,
    ):
        service = await open_service(settings, db=db, scheduler=scheduler, model="tiny", tokenizer=clip_tokenizer)
        queued = await service.enqueue(admit(service, prompt="species:seal, studio:dc, cloudy sky", count=2))
        images = await finish(service, queued)
        records = await db.job_images(job_id=queued.job.id)
        tags = await db.job_tags(job_id=queued.job.id)
    await worker.close()
    assert tags == [("species", "seal"), ("studio", "dc")]
    assert [record.index for record in records] == [0, 1]
    for record, image in zip(records, images, strict=True):
        made = record.provenance
        assert made is not None
        assert (made.model_revision, made.dtype, made.compiled, made.batch_size) == ("sha256:abc", "float16", True, 2)
        assert made.waited_s >= 0 and made.rendered_s >= 0
        assert record.file is not None and Path(record.file).read_bytes() == image.png
    assert records[0].provenance and records[1].provenance
    assert records[0].provenance.batch_id == records[1].provenance.batch_id  # one GPU call


async def test_kept_images_and_their_folder_are_for_this_user_only(tmp_path: Path, clip_tokenizer: Tokenizer) -> None:
    storage = tmp_path / "data" / "sygil.db"
    settings = dataclasses.replace(config(), storage=StorageConfig(path=storage, keep_images=True))
    async with await Database.open(storage) as db, Scheduler(render) as scheduler:
        service = await open_service(settings, db=db, scheduler=scheduler, model="tiny", tokenizer=clip_tokenizer)
        queued = await service.enqueue(admit(service, count=2))
        await finish(service, queued)
        files = [Path(record.file or "") for record in await db.job_images(job_id=queued.job.id)]
    modes = {path: stat.S_IMODE(os.stat(path).st_mode) for path in [storage.parent, storage.parent / "images"]}
    modes |= {path: stat.S_IMODE(os.stat(path).st_mode) for path in [storage, *files]}
    assert modes == {storage.parent: 0o700, storage.parent / "images": 0o700} | dict.fromkeys([storage, *files], 0o600)


async def test_upscale_is_img2img_at_twice_the_size_from_the_images_seed_and_costs_four_times_as_much(
    service: ImageService,
) -> None:
    parent = await service.enqueue(admit(service, size="768x512", seed=41, count=2, negative="blurry"))
    await finish(service, parent)
    job = await service.source(job_id=parent.job.id, index=1, guild_id=GUILD)
    admission = service.admit_upscale(asker(), parent=job, index=1)
    request = admission.request
    assert (request.kind, request.parent, request.seed) == (JobKind.UPSCALE, (job.id, 1), 42)
    assert (request.prompt, request.negative, request.count) == ("species:seal", "blurry", 1)
    assert request.settings == Settings(
        steps=25, guidance=7.0, width=1536, height=1024, mode=Mode.IMG2IMG, strength=0.35
    )
    assert admission.charge.cost == 6.0  # 1536x1024 at 25 steps; the 768x512 image counted 1.5
    assert service.usage.used(guild_id=GUILD, user_id=1) == 3.0 + 6.0
    service.release(admission)
    assert service.usage.used(guild_id=GUILD, user_id=1) == 3.0

    wide = dataclasses.replace(job, settings=dataclasses.replace(job.settings, width=1032))
    with pytest.raises(Refused, match="would be 2064×1024, more than 2048 pixels a side"):
        service.admit_upscale(asker(), parent=wide, index=0)
    with pytest.raises(Refused, match="already an upscale"):
        service.admit_upscale(asker(), parent=dataclasses.replace(job, kind=JobKind.UPSCALE), index=0)
    # Two steps at strength 0.35 would be int(0.7) = 0 denoising steps in diffusers.
    short = dataclasses.replace(job, settings=dataclasses.replace(job.settings, steps=2))
    with pytest.raises(InvalidRequest, match=r"2 steps at strength 0\.35 would run no denoising step"):
        service.admit_upscale(asker(), parent=short, index=0)
    assert service.usage.used(guild_id=GUILD, user_id=1) == 3.0  # no refusal charged anything


async def test_vary_strengths_come_from_the_config(service: ImageService) -> None:
    parent = await service.enqueue(admit(service))
    await finish(service, parent)
    job = await service.source(job_id=parent.job.id, index=0, guild_id=GUILD)
    for strength in (None, service.variation.strong):
        admission = service.admit_remix(asker(), kind=JobKind.VARIATION, parent=job, index=0, strength=strength)
        assert admission.request.settings.strength == (strength or 0.35)
        service.release(admission)
    assert service.variation.strong == 0.7
