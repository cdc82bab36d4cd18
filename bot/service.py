"""Turn requests into stored, queued jobs and finished images: the core behind every command and button.

Admission is synchronous: every check that can refuse a request (the server's rules, the prompt, the limits,
the place in the queue) runs and the place is taken with no await in between, so a burst of requests cannot
overshoot a limit, and the caller can refuse privately before anything public is posted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bot.config import Config, GenerationConfig, PromptsConfig
from bot.engine.types import ImageSpec, Mode, RenderedImage, Settings
from bot.errors import BotError, JobCancelled, JobNotFound, PromptRejected, Refused
from bot.limits import DESCRIPTIONS, WINDOW, Charge, Limits, Resolved, Usage, describe_images, describe_wait
from bot.limits import standard_images as cost_of
from bot.moderation import Moderation
from bot.prompts import Rules, Tokenizer, check_prompt
from bot.scheduler import Place, Scheduler, Ticket
from bot.stats import Figures, figures
from bot.storage import AuditEntry, Database, ImageRecord, Job, JobKind, JobStatus, Provenance, Reply, VoteTally
from bot.storage.files import private_folder, write_private

log = logging.getLogger(__name__)

MAX_SEED = 2**32 - 1


class InvalidRequest(BotError):
    """A generation setting is out of bounds."""


@dataclass(frozen=True, slots=True)
class Requester:
    """Who asks, and where: plain ids read off the interaction."""

    user_id: int
    guild_id: int | None
    channel_id: int
    parent_channel_id: int | None = None  # a thread's channel
    role_ids: tuple[int, ...] = ()
    age_restricted: bool = False


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
    tags: tuple[tuple[str, str], ...] = ()  # (namespace, tag) of the prompt, stored for per-tag statistics


@dataclass(frozen=True, slots=True)
class CheckedPrompts:
    prompt: str
    negative: str
    warnings: tuple[str, ...]
    tags: tuple[tuple[str, str], ...]


@dataclass(eq=False, slots=True)
class Admission:
    """An accepted request: it holds a place in the queue and its share of the user's hourly limit."""

    request: Request
    place: Place
    charge: Charge
    open: bool = field(default=True, repr=False)


@dataclass(frozen=True, slots=True)
class Queued:
    """A job stored and waiting in the scheduler, with the prompt notes to show its owner."""

    job: Job
    ticket: Ticket
    warnings: tuple[str, ...] = ()
    restored: bool = False  # queued again after a restart


@dataclass(frozen=True, slots=True)
class Allowance:
    """What a user may still do: the limits in force, the hour's usage, and when more frees up."""

    limits: Resolved
    used: float
    queued: int
    next_free: float | None  # when one more standard image fits again; None while one fits now


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


def job_specs(job: Job, init_image: bytes | None = None) -> list[ImageSpec]:
    """Return the specs of a stored job's images."""
    return image_specs(
        prompt=job.prompt,
        negative_prompt=job.negative_prompt,
        seed=job.seed,
        count=job.count,
        settings=job.settings,
        init_image=init_image,
    )


def random_seed() -> int:
    return secrets.randbelow(MAX_SEED + 1)


def config_limits(config: Config) -> tuple[Limits, Limits]:
    """Return the default limits of every server and the ceilings no override may pass, from the config."""
    gen = config.generation
    defaults = Limits(
        images_per_hour=config.queue.images_per_hour,
        max_queued=config.queue.max_per_user,
        max_count=gen.max_count,
        max_steps=gen.max_steps,
    )
    return defaults, Limits(max_count=gen.max_count, max_steps=gen.max_steps)


async def open_service(
    config: Config, *, db: Database, scheduler: Scheduler, model: str, tokenizer: Tokenizer | None = None
) -> ImageService:
    """Build the service from the config, with the moderators' rules and the last hour's usage read back."""
    defaults, ceilings = config_limits(config)
    moderation = await Moderation.load(
        db, scheduler, defaults=defaults, ceilings=ceilings, blocklist=config.prompts.blocklist
    )
    usage = Usage()
    usage.load(await db.charges_since(time.time() - WINDOW))
    return ImageService(
        db=db,
        scheduler=scheduler,
        moderation=moderation,
        usage=usage,
        generation=config.generation,
        model=model,
        scheduler_name=config.model.scheduler,
        tokenizer=tokenizer,
        prompts=config.prompts,
        image_folder=config.storage.path.parent / "images" if config.storage.keep_images else None,
        forget_deleted=config.storage.forget_deleted,
    )


class ImageService:
    """Admit, store and queue jobs; record how they end."""

    def __init__(
        self,
        *,
        db: Database,
        scheduler: Scheduler,
        moderation: Moderation,
        usage: Usage,
        generation: GenerationConfig,
        model: str,
        scheduler_name: str,
        tokenizer: Tokenizer | None = None,
        prompts: PromptsConfig | None = None,
        image_folder: Path | None = None,
        forget_deleted: bool = False,
    ) -> None:
        self.db = db
        self.scheduler = scheduler
        self.moderation = moderation
        self.usage = usage
        self.generation = generation
        self.model = model
        self.scheduler_name = scheduler_name
        self.tokenizer = tokenizer
        self.prompts = prompts or PromptsConfig()
        self.image_folder = image_folder  # where PNGs are kept (storage.keep_images); None keeps none
        self.forget_deleted = forget_deleted  # a deleted result's rows go too, votes included
        self.accepting = True  # False once the bot is stopping

    # Checks

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

    def rules(self, *, guild_id: int | None, channel_id: int | None = None, age_restricted: bool = False) -> Rules:
        """Return the prompt rules of a channel: the server's blocklist; mature ratings where allowed."""
        return Rules(
            allow_truncation=self.prompts.allow_truncation,
            allow_rating=age_restricted or channel_id in self.prompts.rating_channels,
            blocklist=self.moderation.blocklist(guild_id),
        )

    def check_prompts(self, prompt: str, negative: str | None, rules: Rules) -> CheckedPrompts:
        """Return the normalised prompt and negative prompt, their notes and the prompt's tags, or raise
        PromptRejected."""
        verdicts = [
            check_prompt(prompt, tokenizer=self.tokenizer, rules=rules),
            check_prompt(
                negative or "", field_name="negative prompt", tokenizer=self.tokenizer, rules=rules, allow_empty=True
            ),
        ]
        problems = [error.message for verdict in verdicts for error in verdict.errors]
        if problems:
            raise PromptRejected("\n".join(problems))
        return CheckedPrompts(
            prompt=verdicts[0].prompt,
            negative=verdicts[1].prompt,
            warnings=verdicts[0].warnings + verdicts[1].warnings,
            tags=tuple(dict.fromkeys((tag.namespace, tag.tag) for tag in verdicts[0].tags)),
        )

    def check_access(self, requester: Requester, *, what: str = "generate images") -> None:
        """Refuse a user the server banned, a channel the moderators closed, and everyone while stopping."""
        if not self.accepting:
            raise Refused("The bot is restarting. Please try again in a minute.")
        guild_id = requester.guild_id
        banned, reason = self.moderation.ban_reason(guild_id, requester.user_id)
        if banned:
            raise Refused(
                f"The moderators of this server have banned you from using the bot{_because(reason)}. "
                "Ask them if you think this is a mistake."
            )
        channels = [requester.channel_id]
        if requester.parent_channel_id is not None:
            channels.append(requester.parent_channel_id)
        if not self.moderation.channel_allowed(guild_id, channels):
            allowed = sorted(self.moderation.rules(guild_id).allowed) if guild_id is not None else []
            where = f" Try {', '.join(f'<#{channel}>' for channel in allowed[:10])}." if allowed else ""
            raise Refused(f"The moderators do not allow the bot to {what} in this channel.{where}")

    def check_open(self, requester: Requester) -> None:
        """Refuse new work while the moderators have paused the server's queue."""
        paused, reason = self.moderation.pause_reason(requester.guild_id)
        if paused:
            raise Refused(
                f"The moderators have paused image generation{_because(reason)}. "
                "Nothing new is accepted until they resume it; please try again later."
            )

    # Admission: no await from the first check to the place taken

    def admit(
        self,
        requester: Requester,
        *,
        prompt: str,
        negative: str | None = None,
        seed: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        size: str | None = None,
        count: int | None = None,
    ) -> Admission:
        """Check a new request against everything that can refuse it and take its place, or raise a BotError."""
        self.check_access(requester)
        self.check_open(requester)
        settings, count = self.check_settings(steps=steps, guidance=guidance, size=size, count=count)
        rules = self.rules(
            guild_id=requester.guild_id, channel_id=requester.channel_id, age_restricted=requester.age_restricted
        )
        checked = self.check_prompts(prompt, negative, rules)
        if seed is not None and not 0 <= seed <= MAX_SEED:
            raise InvalidRequest(f"seed must be between 0 and {MAX_SEED}, not {seed}.")
        request = Request(
            kind=JobKind.IMAGINE,
            user_id=requester.user_id,
            guild_id=requester.guild_id,
            channel_id=requester.channel_id,
            prompt=checked.prompt,
            negative=checked.negative,
            seed=random_seed() if seed is None else seed,
            count=count,
            settings=settings,
            warnings=checked.warnings,
            tags=checked.tags,
        )
        return self._take_place(requester, request)

    async def source(self, *, job_id: int, index: int, guild_id: int | None) -> Job:
        """Return the job an image belongs to, if it exists in this server (a custom_id is untrusted input)."""
        job = await self.db.get_job(job_id=job_id)
        image = await self.db.get_image(job_id=job_id, index=index)
        if job is None or image is None or job.guild_id != guild_id:
            raise JobNotFound("That image is no longer in the database, so it cannot be reused.")
        return job

    def admit_remix(self, requester: Requester, *, kind: JobKind, parent: Job, index: int) -> Admission:
        """Admit a new job from one image: a reroll (same prompt and settings, new seed) or a variation.

        A variation is img2img from that image (the caller supplies its PNG to ``enqueue``). A reroll is always
        txt2img, also of a variation: the variation's own source image belongs to another message. The prompt is
        checked again, against today's blocklist and this channel's rules.
        """
        if kind not in (JobKind.REROLL, JobKind.VARIATION):
            raise ValueError(f"a remix is a reroll or a variation, not {kind}")
        self.check_access(requester)
        self.check_open(requester)
        rules = self.rules(
            guild_id=requester.guild_id, channel_id=requester.channel_id, age_restricted=requester.age_restricted
        )
        checked = self.check_prompts(parent.prompt, parent.negative_prompt, rules)
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
        request = Request(
            kind=kind,
            user_id=requester.user_id,
            guild_id=requester.guild_id,
            channel_id=requester.channel_id,
            prompt=checked.prompt,
            negative=checked.negative,
            seed=random_seed(),
            count=1,
            settings=settings,
            parent=(parent.id, index),
            tags=checked.tags,
        )
        return self._take_place(requester, request)

    def allowance(self, requester: Requester) -> Allowance:
        """Return a user's limits, what they used in the last hour, and when another image fits."""
        limits = self.moderation.limits(requester.guild_id, requester.user_id, requester.role_ids)
        used = self.usage.used(guild_id=requester.guild_id, user_id=requester.user_id)
        frees = self.usage.frees_at(
            guild_id=requester.guild_id, user_id=requester.user_id, need=1.0, limit=limits.images_per_hour
        )
        now = self.usage.clock()
        queued = self.scheduler.jobs_of(user_id=requester.user_id, guild_id=requester.guild_id)
        return Allowance(
            limits=limits, used=used, queued=queued, next_free=frees if frees is None or frees > now else None
        )

    def _take_place(self, requester: Requester, request: Request) -> Admission:
        limits = self.moderation.limits(requester.guild_id, requester.user_id, requester.role_ids)
        if request.count > limits.max_count:
            raise Refused(
                f"You can ask for at most {limits.max_count} image{_s(limits.max_count)} at a time here "
                f"(you asked for {request.count})."
            )
        if request.settings.steps > limits.max_steps:
            raise Refused(
                f"You can use at most {limits.max_steps} steps here (you asked for {request.settings.steps})."
            )
        cost = cost_of(request.settings, request.count)
        hourly = limits.images_per_hour
        if hourly == 0:
            raise Refused("You cannot generate images in this server (your limit is 0 images per hour).")
        frees = self.usage.frees_at(guild_id=request.guild_id, user_id=request.user_id, need=cost, limit=hourly)
        if frees is None:
            raise Refused(
                f"This request counts as {describe_images(cost)} images (bigger and longer images count more), "
                f"more than your limit of {hourly} {DESCRIPTIONS['images_per_hour']}. "
                "Ask for fewer, smaller or shorter images."
            )
        now = self.usage.clock()
        if frees > now:
            used = self.usage.used(guild_id=request.guild_id, user_id=request.user_id)
            what = "another image" if request.count == 1 else f"these {request.count} images"
            raise Refused(
                f"You have used {describe_images(used)} of your {hourly} {DESCRIPTIONS['images_per_hour']}. "
                f"You can make {what} in {describe_wait(frees - now)}."
            )
        place = self.scheduler.reserve(user_id=request.user_id, guild_id=request.guild_id, max_queued=limits.max_queued)
        charge = self.usage.charge(guild_id=request.guild_id, user_id=request.user_id, cost=cost)
        return Admission(request=request, place=place, charge=charge)

    def release(self, admission: Admission) -> None:
        """Give back an admission's place and charge when its job will not be stored (a no-op once it was)."""
        if admission.open:
            admission.open = False
            self.scheduler.release(admission.place)
            self.usage.refund(admission.charge)

    # Jobs

    async def enqueue(
        self, admission: Admission, *, init_image: bytes | None = None, reply: Reply | None = None
    ) -> Queued:
        """Store an admitted request as a job and queue its images in the place it holds."""
        request = admission.request
        if not admission.open:
            raise ValueError("that admission was already used or released")
        if (request.settings.mode is Mode.IMG2IMG) != (init_image is not None):
            raise ValueError("img2img requests need their init image, and only they take one")
        try:
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
                init_image=init_image,
                reply=reply,
                tags=request.tags,
            )
        except BaseException:
            self.release(admission)
            raise
        ticket = self.scheduler.submit(
            job_id=job.id,
            user_id=job.user_id,
            guild_id=job.guild_id,
            specs=job_specs(job, init_image),
            place=admission.place,
        )
        admission.open = False
        self.usage.attach(admission.charge, job.id)
        return Queued(job=job, ticket=ticket, warnings=request.warnings)

    async def acknowledged(self, queued: Queued, *, message_id: int | None) -> Queued:
        """Record the message that answers the job's interaction (once it was acknowledged); return the job with it."""
        reply = queued.job.reply
        if reply is None or message_id is None:
            return queued
        await self.db.set_reply_message(job_id=queued.job.id, message_id=message_id)
        job = dataclasses.replace(queued.job, reply=dataclasses.replace(reply, message_id=message_id))
        return dataclasses.replace(queued, job=job)

    async def withdraw(self, queued: Queued, *, error: str) -> None:
        """Take back a stored job whose requester was never told (acknowledging the interaction failed)."""
        job_id = queued.job.id
        self.scheduler.cancel(job_id, error)
        if queued.ticket.result.done() and not queued.ticket.result.cancelled():
            queued.ticket.result.exception()  # retrieved: nobody else waits for it
        await self.db.end_job(job_id=job_id, error=error, status=JobStatus.CANCELLED)
        self.usage.refund_job(job_id)

    async def restore(self) -> list[Queued]:
        """Queue again every job accepted before a restart that never finished, variations with their image."""
        restored: list[Queued] = []
        for job in await self.db.unfinished_jobs():
            init_image = None
            if job.settings.mode is Mode.IMG2IMG:
                init_image = await self.db.init_image(job_id=job.id)
                if init_image is None:  # stored before source images were kept
                    await self.db.end_job(
                        job_id=job.id, error="the bot restarted before this variation ran", status=JobStatus.CANCELLED
                    )
                    continue
            ticket = self.scheduler.submit(
                job_id=job.id, user_id=job.user_id, guild_id=job.guild_id, specs=job_specs(job, init_image)
            )
            restored.append(Queued(job=job, ticket=ticket, restored=True))
        if restored:
            log.info("Restored %d unfinished jobs to the queue", len(restored))
        return restored

    async def wait(self, queued: Queued) -> list[RenderedImage]:
        """Wait for a queued job's images, recording when it starts, and its failure if it fails.

        Raises JobCancelled when it was withdrawn (whoever withdrew it recorded that).
        """
        job_id = queued.job.id
        ticket = queued.ticket
        started = asyncio.ensure_future(ticket.started.wait())
        try:
            await asyncio.wait({started, ticket.result}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            started.cancel()
        if ticket.started.is_set():
            await self.db.mark_started(job_id=job_id)
        try:
            images = await ticket.result
        except JobCancelled:
            raise
        except Exception as exc:
            await self.db.end_job(job_id=job_id, error=f"{type(exc).__name__}: {exc}")
            self.usage.refund_job(job_id)
            raise
        renders = ticket.renders if len(ticket.renders) == len(images) else [None] * len(images)
        provenance = [
            None
            if rendering is None
            else Provenance(
                model_revision=rendering.revision,
                dtype=rendering.dtype,
                compiled=rendering.compiled,
                batch_id=rendering.batch_id,
                batch_size=rendering.batch_size,
                waited_s=max(0.0, rendering.started_at - queued.job.created_at),
                rendered_s=rendering.seconds,
            )
            for rendering in renders
        ]
        files = None
        if self.image_folder is not None:
            files = await asyncio.to_thread(_keep, self.image_folder, job_id, images)
        await self.db.record_images(
            job_id=job_id,
            seeds=[image.seed for image in images],
            nsfw=[image.nsfw for image in images],
            provenance=provenance,
            files=files,
        )
        return images

    async def complete(self, queued: Queued, *, message_id: int | None) -> None:
        """Record that a job's images were delivered, in ``message_id``."""
        await self.db.complete_job(job_id=queued.job.id, message_id=message_id)

    async def delete(self, *, job_id: int, guild_id: int | None, actor_id: int, moderator: bool) -> Job:
        """Delete a result's images for its requester or a moderator; their rows stay, marked deleted, for the
        statistics (unless storage.forget_deleted). Returns the job."""
        job = await self.db.get_job(job_id=job_id)
        if job is None or job.guild_id != guild_id or not await self.db.job_images(job_id=job_id):
            raise JobNotFound("Those images are no longer in the database.")
        if actor_id != job.user_id and not moderator:
            raise Refused("Only the person who asked for these images, or a moderator, can delete them.")
        await self.db.delete_images(job_id=job_id, forget=self.forget_deleted)
        return job

    async def cancel(
        self, *, job_id: int, guild_id: int | None, actor_id: int, moderator: bool, reason: str | None = None
    ) -> Job:
        """Withdraw a job for its requester or a moderator; a moderator's cancel is audited. Returns the job."""
        job = await self.db.get_job(job_id=job_id)
        if job is None or job.guild_id != guild_id:
            raise JobNotFound(f"There is no job {job_id} in this server.")
        own = actor_id == job.user_id
        if not own and not moderator:
            raise Refused("Only the person who asked for this job, or a moderator, can cancel it.")
        if job.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
            raise Refused(f"Job {job_id} has already ended ({job.status.value}); there is nothing to cancel.")
        message = (
            "Cancelled by its requester." if own else f"Cancelled by a moderator (<@{actor_id}>){_because(reason)}."
        )
        running = self.scheduler.cancel(job_id, message)
        if running is None:
            raise Refused(f"Job {job_id} has finished rendering; its images are on their way.")
        audit = None
        if not own:
            audit = AuditEntry(
                guild_id=job.guild_id or 0,
                moderator_id=actor_id,
                action="cancel",
                target=f"job {job_id} of <@{job.user_id}>",
                old=job.status.value if not running else "running",
                new="cancelled",
                reason=reason,
            )
        await self.db.end_job(job_id=job_id, error=message, status=JobStatus.CANCELLED, audit=audit)
        if not running:
            self.usage.refund_job(job_id)
        return job

    # What the cogs read and the votes they record: no cog uses the database itself

    async def job(self, *, job_id: int) -> Job | None:
        """Return a job, or None when there is none with that id."""
        return await self.db.get_job(job_id=job_id)

    async def rendered(self, *, job_id: int) -> bool:
        """Return whether a job's images are recorded (a job queued again after a restart may already show them)."""
        return await self.db.get_image(job_id=job_id, index=0) is not None

    async def details(
        self, *, job_id: int, guild_id: int | None
    ) -> tuple[Job, list[ImageRecord], list[tuple[str, str]]]:
        """Return a result's job, images and tags, if it exists in this server (a custom_id is untrusted input)."""
        job = await self.db.get_job(job_id=job_id)
        images = await self.db.job_images(job_id=job_id) if job is not None else []
        if job is None or job.guild_id != guild_id or not images:
            raise JobNotFound("Those images are no longer in the database.")
        return job, images, await self.db.job_tags(job_id=job_id)

    async def vote(self, requester: Requester, *, job_id: int, index: int, vote: int) -> list[VoteTally]:
        """Record a vote of +1 or -1 on an image; the same vote again withdraws it.

        Returns the votes on each of the job's images; the voted one's ``mine`` is the voter's vote (0: withdrawn).
        """
        self.check_access(requester, what="take votes")
        job = await self.db.get_job(job_id=job_id)
        if (
            job is None
            or job.guild_id != requester.guild_id
            or index >= job.count
            or await self.db.get_image(job_id=job_id, index=index) is None
        ):
            raise JobNotFound("That image is no longer in the database, so it cannot be voted on.")
        tally = await self.db.record_vote(job_id=job_id, index=index, user_id=requester.user_id, vote=vote)
        tallies = await self.db.vote_tallies(job_id=job_id, count=job.count)
        tallies[index] = tally
        return tallies

    async def stats(self, *, guild_id: int, user_id: int | None, min_votes: int) -> Figures:
        """Return the /stats figures of a server, or (with ``user_id``) of the images one member made there."""
        return await figures(self.db, guild_id=guild_id, user_id=user_id, min_votes=min_votes)


def _because(reason: str | None) -> str:
    return f": {reason}" if reason else ""


def _s(count: int) -> str:
    return "" if count == 1 else "s"


def _keep(folder: Path, job_id: int, images: Sequence[RenderedImage]) -> list[str | None]:
    """Write a job's PNGs under the storage folder (storage.keep_images), for this user only; return their paths."""
    private_folder(folder)
    paths: list[str | None] = []
    for index, image in enumerate(images):
        path = folder / f"sygil_{job_id}_{index}.png"
        write_private(path, image.png)
        paths.append(str(path))
    return paths
