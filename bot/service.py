"""Turn requests into stored, queued jobs and finished images: the core behind every command and button."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

from bot.config import GenerationConfig, PromptsConfig
from bot.engine.types import ImageSpec, Mode, RenderedImage, Settings
from bot.errors import BotError, JobNotFound, PromptRejected
from bot.prompts import Blocklist, Rules, Tokenizer, check_prompt
from bot.scheduler import Scheduler, Ticket
from bot.storage import Database, Job, JobKind, JobStatus

log = logging.getLogger(__name__)

MAX_SEED = 2**32 - 1


class InvalidRequest(BotError):
    """A generation setting is out of bounds."""


@dataclass(frozen=True, slots=True)
class Request:
    """A validated request, not yet stored or queued."""

    kind: JobKind
    user_id: int
    guild_id: int | None
    channel_id: int
    prompt: str
    negative: str
    seed: int
    count: int
    settings: Settings
    warnings: tuple[str, ...] = ()
    parent: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class Queued:
    """A job stored and waiting in the scheduler, with the prompt notes to show its owner."""

    job: Job
    ticket: Ticket
    warnings: tuple[str, ...] = ()


def image_specs(
    *, prompt: str, negative_prompt: str, seed: int, count: int, settings: Settings, init_image: bytes | None = None
) -> list[ImageSpec]:
    """Return the specs of a job's images: consecutive seeds from ``seed``, so each image can be remade alone."""
    return [
        ImageSpec(
            prompt=prompt,
            negative_prompt=negative_prompt,
            seed=(seed + index) % (MAX_SEED + 1),
            settings=settings,
            init_image=init_image,
        )
        for index in range(count)
    ]


def random_seed() -> int:
    return secrets.randbelow(MAX_SEED + 1)


class ImageService:
    """Validate, store and queue jobs; record how they end."""

    def __init__(
        self,
        *,
        db: Database,
        scheduler: Scheduler,
        generation: GenerationConfig,
        model: str,
        scheduler_name: str,
        tokenizer: Tokenizer | None = None,
        prompts: PromptsConfig | None = None,
    ) -> None:
        self.db = db
        self.scheduler = scheduler
        self.generation = generation
        self.model = model
        self.scheduler_name = scheduler_name
        self.tokenizer = tokenizer
        self.prompts = prompts or PromptsConfig()
        self.blocklist = Blocklist(self.prompts.blocklist)

    def check_settings(
        self, *, steps: int | None, guidance: float | None, size: str | None, count: int | None
    ) -> tuple[Settings, int]:
        """Return the settings and image count for a request, or raise InvalidRequest naming the bad one."""
        gen = self.generation
        steps = gen.default_steps if steps is None else steps
        guidance = gen.default_guidance if guidance is None else guidance
        count = gen.default_count if count is None else count
        size = gen.sizes[0] if size is None else size
        if not 1 <= steps <= gen.max_steps:
            raise InvalidRequest(f"steps must be between 1 and {gen.max_steps}, not {steps}.")
        if not gen.min_guidance <= guidance <= gen.max_guidance:
            raise InvalidRequest(
                f"guidance must be between {gen.min_guidance:g} and {gen.max_guidance:g}, not {guidance:g}."
            )
        if not 1 <= count <= gen.max_count:
            raise InvalidRequest(f"count must be between 1 and {gen.max_count}, not {count}.")
        if size not in gen.sizes:
            raise InvalidRequest(f"size must be one of {', '.join(gen.sizes)}, not {size!r}.")
        width, height = gen.size(size)
        return Settings(steps=steps, guidance=guidance, width=width, height=height), count

    def rules(self, *, channel_id: int | None = None, age_restricted: bool = False) -> Rules:
        """Return the prompt rules of a channel: mature ratings only where it is age-restricted or listed."""
        return Rules(
            allow_truncation=self.prompts.allow_truncation,
            allow_rating=age_restricted or channel_id in self.prompts.rating_channels,
            blocklist=self.blocklist,
        )

    def check_prompts(self, prompt: str, negative: str | None, rules: Rules) -> tuple[str, str, tuple[str, ...]]:
        """Return the normalised prompt and negative prompt and any notes, or raise PromptRejected."""
        verdicts = [
            check_prompt(prompt, tokenizer=self.tokenizer, rules=rules),
            check_prompt(
                negative or "", field_name="negative prompt", tokenizer=self.tokenizer, rules=rules, allow_empty=True
            ),
        ]
        problems = [error.message for verdict in verdicts for error in verdict.errors]
        if problems:
            raise PromptRejected("\n".join(problems))
        return verdicts[0].prompt, verdicts[1].prompt, verdicts[0].warnings + verdicts[1].warnings

    def prepare(
        self,
        *,
        user_id: int,
        guild_id: int | None,
        channel_id: int,
        prompt: str,
        negative: str | None = None,
        seed: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        size: str | None = None,
        count: int | None = None,
        age_restricted: bool = False,
    ) -> Request:
        """Validate a new request without waiting on anything, so a refusal can be answered at once."""
        settings, count = self.check_settings(steps=steps, guidance=guidance, size=size, count=count)
        rules = self.rules(channel_id=channel_id, age_restricted=age_restricted)
        prompt, negative, warnings = self.check_prompts(prompt, negative, rules)
        if seed is not None and not 0 <= seed <= MAX_SEED:
            raise InvalidRequest(f"seed must be between 0 and {MAX_SEED}, not {seed}.")
        self.scheduler.check_room(user_id)
        return Request(
            kind=JobKind.IMAGINE,
            user_id=user_id,
            guild_id=guild_id,
            channel_id=channel_id,
            prompt=prompt,
            negative=negative,
            seed=random_seed() if seed is None else seed,
            count=count,
            settings=settings,
            warnings=warnings,
        )

    async def prepare_remix(
        self, *, kind: JobKind, job_id: int, index: int, user_id: int, guild_id: int | None, channel_id: int
    ) -> Request:
        """Prepare a new job from one image of a job: a reroll (same prompt and settings, new seed) or a variation.

        A variation is img2img from that image (the caller supplies its PNG to ``enqueue``). A reroll is always
        txt2img, also of a variation: the variation's own source image belongs to another message.
        """
        if kind not in (JobKind.REROLL, JobKind.VARIATION):
            raise ValueError(f"a remix is a reroll or a variation, not {kind}")
        parent = await self._source(job_id, index)
        self.scheduler.check_room(user_id)
        source = parent.settings
        variation = kind is JobKind.VARIATION
        settings = Settings(
            steps=source.steps,
            guidance=source.guidance,
            width=source.width,
            height=source.height,
            mode=Mode.IMG2IMG if variation else Mode.TXT2IMG,
            strength=self.generation.variation_strength if variation else source.strength,
        )
        return Request(
            kind=kind,
            user_id=user_id,
            guild_id=guild_id,
            channel_id=channel_id,
            prompt=parent.prompt,
            negative=parent.negative_prompt,
            seed=random_seed(),
            count=1,
            settings=settings,
            parent=(parent.id, index),
        )

    async def restore(self) -> list[Queued]:
        """Queue again every job accepted before a restart that never finished (variations need their image)."""
        restored: list[Queued] = []
        for job in await self.db.unfinished_jobs():
            if job.settings.mode is Mode.IMG2IMG:
                await self.db.fail_job(
                    job_id=job.id, error="the bot restarted before this variation ran", status=JobStatus.CANCELLED
                )
                continue
            specs = image_specs(
                prompt=job.prompt,
                negative_prompt=job.negative_prompt,
                seed=job.seed,
                count=job.count,
                settings=job.settings,
            )
            ticket = self.scheduler.submit(job_id=job.id, user_id=job.user_id, specs=specs, force=True)
            restored.append(Queued(job=job, ticket=ticket))
        if restored:
            log.info("Restored %d unfinished jobs to the queue", len(restored))
        return restored

    async def finish(self, queued: Queued) -> list[RenderedImage]:
        """Wait for a queued job's images, recording its start and its end in the database."""
        job_id = queued.job.id
        ticket = queued.ticket
        try:
            await ticket.started.wait()
            await self.db.mark_started(job_id=job_id)
            images = await ticket.result
        except Exception as exc:
            await self.db.fail_job(job_id=job_id, error=f"{type(exc).__name__}: {exc}")
            raise
        await self.db.finish_job(
            job_id=job_id, seeds=[image.seed for image in images], nsfw=[image.nsfw for image in images]
        )
        return images

    async def _source(self, job_id: int, index: int) -> Job:
        job = await self.db.get_job(job_id=job_id)
        image = await self.db.get_image(job_id=job_id, index=index)
        if job is None or image is None:
            raise JobNotFound("That image is no longer in the database, so it cannot be reused.")
        return job

    async def enqueue(self, request: Request, *, init_image: bytes | None = None) -> Queued:
        """Store a prepared request as a job and queue its images."""
        if (request.settings.mode is Mode.IMG2IMG) != (init_image is not None):
            raise ValueError("img2img requests need their init image, and only they take one")
        job = await self.db.create_job(
            kind=request.kind,
            user_id=request.user_id,
            guild_id=request.guild_id,
            channel_id=request.channel_id,
            prompt=request.prompt,
            negative_prompt=request.negative,
            seed=request.seed,
            count=request.count,
            settings=request.settings,
            model=self.model,
            scheduler=self.scheduler_name,
            parent_job_id=request.parent[0] if request.parent else None,
            parent_index=request.parent[1] if request.parent else None,
        )
        specs = image_specs(
            prompt=request.prompt,
            negative_prompt=request.negative,
            seed=request.seed,
            count=request.count,
            settings=request.settings,
            init_image=init_image,
        )
        try:
            ticket = self.scheduler.submit(job_id=job.id, user_id=request.user_id, specs=specs)
        except BotError as exc:
            # Another request took the last place while this one was being stored: never run it after a restart.
            await self.db.fail_job(job_id=job.id, error=str(exc), status=JobStatus.CANCELLED)
            raise
        return Queued(job=job, ticket=ticket, warnings=request.warnings)
