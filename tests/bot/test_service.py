from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from bot.config import GenerationConfig, PromptsConfig
from bot.engine.types import ImageSpec, Mode, RenderedImage, Settings
from bot.errors import JobNotFound, PromptRejected, QueueFull
from bot.prompts import Tokenizer
from bot.scheduler import Progress, Scheduler
from bot.service import ImageService, InvalidRequest
from bot.storage import Database, JobKind, JobStatus

GENERATION = GenerationConfig(sizes=("64x64", "64x96"), max_steps=30, max_count=4)


def render(specs: Sequence[ImageSpec], progress: Progress | None = None, /) -> list[RenderedImage]:
    return [
        RenderedImage(png=f"{spec.prompt}|{spec.seed}|{spec.settings.mode}".encode(), seed=spec.seed) for spec in specs
    ]


@pytest.fixture
async def service(tmp_path: Path, clip_tokenizer: Tokenizer) -> AsyncIterator[ImageService]:
    async with await Database.open(tmp_path / "sygil.db") as db, Scheduler(render, max_per_user=2) as scheduler:
        yield ImageService(
            db=db,
            scheduler=scheduler,
            generation=GENERATION,
            model="tiny",
            scheduler_name="dpm++",
            tokenizer=clip_tokenizer,
        )


def prepare(service: ImageService, **overrides: object):
    params: dict[str, object] = {"user_id": 1, "guild_id": 2, "channel_id": 3, "prompt": "Species:Seal"}
    params.update(overrides)
    return service.prepare(**params)  # type: ignore[arg-type]


async def test_imagine_stores_queues_and_finishes(service: ImageService) -> None:
    request = prepare(service, seed=41, count=3, size="64x96", steps=12, guidance=5.5, negative="blurry")
    assert request.prompt == "species:seal"
    queued = await service.enqueue(request)
    images = await service.finish(queued)
    assert [image.seed for image in images] == [41, 42, 43]
    job = await service.db.get_job(job_id=queued.job.id)
    assert job is not None and job.status is JobStatus.DONE
    assert (job.settings.width, job.settings.height, job.settings.steps, job.settings.guidance) == (64, 96, 12, 5.5)
    assert job.negative_prompt == "blurry" and job.count == 3
    image = await service.db.get_image(job_id=job.id, index=2)
    assert image is not None and image.seed == 43


async def test_defaults_come_from_the_settings(service: ImageService) -> None:
    request = prepare(service)
    assert (
        request.count == 1
        and request.settings.steps == 25
        and (request.settings.width, request.settings.height) == (64, 64)
    )
    assert 0 <= request.seed < 2**32


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"steps": 31}, "steps must be between 1 and 30"),
        ({"guidance": 40.0}, "guidance must be between 1 and 15"),
        ({"count": 5}, "count must be between 1 and 4"),
        ({"size": "512x512"}, "size must be one of 64x64, 64x96"),
        ({"seed": -1}, "seed must be between 0 and 4294967295"),
    ],
)
def test_out_of_bounds_settings_are_named(service: ImageService, overrides: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        prepare(service, **overrides)


def test_bad_prompts_are_refused_before_anything_is_stored(service: ImageService) -> None:
    with pytest.raises(PromptRejected, match="Did you mean `species:`"):
        prepare(service, prompt="speces:seal")
    with pytest.raises(PromptRejected, match="negative prompt"):
        prepare(service, negative="cat " * 80)


async def test_reroll_keeps_everything_but_the_seed(service: ImageService) -> None:
    parent = await service.enqueue(prepare(service, seed=5, count=2, steps=9))
    await service.finish(parent)
    request = await service.prepare_remix(
        kind=JobKind.REROLL, job_id=parent.job.id, index=1, user_id=9, guild_id=2, channel_id=3
    )
    assert request.kind is JobKind.REROLL and request.count == 1 and request.user_id == 9
    assert request.settings == parent.job.settings and request.prompt == parent.job.prompt
    assert request.parent == (parent.job.id, 1)
    queued = await service.enqueue(request)
    await service.finish(queued)
    stored = await service.db.get_job(job_id=queued.job.id)
    assert stored is not None and stored.parent_job_id == parent.job.id and stored.parent_index == 1


async def test_variation_is_img2img_from_the_image(service: ImageService) -> None:
    parent = await service.enqueue(prepare(service))
    await service.finish(parent)
    request = await service.prepare_remix(
        kind=JobKind.VARIATION, job_id=parent.job.id, index=0, user_id=1, guild_id=2, channel_id=3
    )
    assert request.settings.mode is Mode.IMG2IMG and request.settings.strength == GENERATION.variation_strength
    with pytest.raises(ValueError, match="init image"):
        await service.enqueue(request)
    queued = await service.enqueue(request, init_image=b"png")
    (image,) = await service.finish(queued)
    assert image.png.endswith(b"img2img")

    # A reroll of a variation is a plain txt2img render of the same prompt and size.
    reroll = await service.prepare_remix(
        kind=JobKind.REROLL, job_id=queued.job.id, index=0, user_id=1, guild_id=2, channel_id=3
    )
    assert reroll.settings.mode is Mode.TXT2IMG and reroll.settings.width == parent.job.settings.width
    (image,) = await service.finish(await service.enqueue(reroll))
    assert image.png.endswith(b"txt2img")


async def test_buttons_on_unknown_images_are_refused(service: ImageService) -> None:
    with pytest.raises(JobNotFound):
        await service.prepare_remix(kind=JobKind.REROLL, job_id=999, index=0, user_id=1, guild_id=None, channel_id=3)
    parent = await service.enqueue(prepare(service, count=1))
    await service.finish(parent)
    with pytest.raises(JobNotFound):
        await service.prepare_remix(
            kind=JobKind.VARIATION, job_id=parent.job.id, index=3, user_id=1, guild_id=None, channel_id=3
        )


async def test_per_user_limit_applies_before_storing(tmp_path: Path) -> None:
    gate = threading.Event()

    def held(specs: Sequence[ImageSpec], progress: Progress | None = None, /) -> list[RenderedImage]:
        gate.wait(5)
        return render(specs)

    async with await Database.open(tmp_path / "sygil.db") as db, Scheduler(held, max_per_user=2) as scheduler:
        service = ImageService(db=db, scheduler=scheduler, generation=GENERATION, model="tiny", scheduler_name="dpm++")
        first = await service.enqueue(prepare(service))
        second = await service.enqueue(prepare(service))
        with pytest.raises(QueueFull, match="You already have 2 jobs"):
            prepare(service)
        assert len(await db.unfinished_jobs()) == 2
        assert prepare(service, user_id=2).user_id == 2
        gate.set()
        await service.finish(first)
        await service.finish(second)
        assert prepare(service).user_id == 1


async def test_restore_requeues_unfinished_jobs(tmp_path: Path) -> None:
    path = tmp_path / "sygil.db"
    async with await Database.open(path) as db:
        for prompt in ("species:seal", "species:cat"):
            await db.create_job(
                kind=JobKind.IMAGINE,
                user_id=1,
                guild_id=None,
                channel_id=3,
                prompt=prompt,
                negative_prompt="",
                seed=100,
                count=2,
                settings=Settings(steps=5, width=64, height=64),
                model="tiny",
                scheduler="dpm++",
            )
    async with await Database.open(path) as db, Scheduler(render, max_per_user=1) as scheduler:
        service = ImageService(db=db, scheduler=scheduler, generation=GENERATION, model="tiny", scheduler_name="dpm++")
        restored = await service.restore()
        assert [queued.job.prompt for queued in restored] == ["species:seal", "species:cat"]
        images = [await service.finish(queued) for queued in restored]
        assert [image.seed for image in images[0]] == [100, 101]
        assert await db.unfinished_jobs() == []


async def test_mature_ratings_depend_on_the_channel(tmp_path: Path, clip_tokenizer: Tokenizer) -> None:
    prompts = PromptsConfig(rating_channels=(77,), blocklist=("forbidden",))
    async with await Database.open(tmp_path / "sygil.db") as db, Scheduler(render) as scheduler:
        service = ImageService(
            db=db, scheduler=scheduler, generation=GENERATION, model="tiny", scheduler_name="dpm++",
            tokenizer=clip_tokenizer, prompts=prompts,
        )  # fmt: skip
        with pytest.raises(PromptRejected, match="age-restricted"):
            prepare(service, prompt="species:seal, rating:explicit")
        assert prepare(service, prompt="species:seal, rating:explicit", age_restricted=True).prompt
        assert prepare(service, prompt="species:seal, rating:explicit", channel_id=77).prompt
        with pytest.raises(PromptRejected, match="does not allow"):
            prepare(service, prompt="species:seal", negative="Forbidden things")
