"""ImageService, the core behind every command and button: admitted requests become stored, queued jobs, and
queued jobs become recorded images; it withdraws, cancels and deletes them, and queues again after a restart what
was accepted before it. What can refuse a request, and the place it takes, is ``bot.admission``'s."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bot.admission import MAX_SEED, Admission, Admissions, Requester, because
from bot.arena import Choice, Reveal, Standings, record_pair, standings
from bot.arena import vote as arena_vote
from bot.config import Config, GenerationConfig, PromptsConfig, UpscaleConfig, VariationConfig
from bot.engine.images import open_init_image
from bot.engine.types import ImageSpec, Mode, RenderedImage, Settings
from bot.errors import JobCancelled, JobNotFound, Refused
from bot.jobs import Job, JobStatus, Reply
from bot.limits import WINDOW, Charge, Limits, Usage
from bot.limits import standard_images as cost_of
from bot.moderation import Moderation
from bot.prompts import Tokenizer
from bot.scheduler import Scheduler
from bot.scheduler.line import Ticket
from bot.stats import Figures, figures
from bot.storage import ArenaPair, AuditEntry, ChargedJob, Database, ImageRecord, Provenance, VoteTally
from bot.storage.files import private_folder, write_private

log = logging.getLogger(__name__)

NOT_ITS_MESSAGE = "That button does not belong to this message, so nothing was deleted."


@dataclass(frozen=True, slots=True)
class Queued:
    """A job stored and waiting in the scheduler, with the prompt notes to show its owner."""

    job: Job
    ticket: Ticket
    warnings: tuple[str, ...] = ()
    restored: bool = False  # queued again after a restart


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


def config_limits(config: Config) -> tuple[Limits, Limits]:
    """Return the default limits of every server and the ceilings no override may pass (nor give, when it was
    stored before the config lowered them), from the config."""
    gen = config.generation
    defaults = Limits(
        images_per_hour=config.queue.images_per_hour,
        max_queued=config.queue.max_per_user,
        max_count=gen.max_count,
        max_steps=gen.max_steps,
    )
    # A cap below the config's own default is raised to it: the default is what the operator grants everyone.
    ceilings = Limits(
        images_per_hour=max(config.moderation.max_images_per_hour, config.queue.images_per_hour),
        max_queued=max(config.moderation.max_queued, config.queue.max_per_user),
        max_count=gen.max_count,
        max_steps=gen.max_steps,
    )
    return defaults, ceilings


def _priced(charged: Iterable[ChargedJob]) -> list[Charge]:
    """Return what each stored job charged its user, priced by today's rule (bigger and longer images cost more)."""
    return [
        Charge(
            guild_id=job.guild_id,
            user_id=job.user_id,
            cost=cost_of(Settings(steps=job.steps, width=job.width, height=job.height), job.count),
            at=job.at,
            job_id=job.job_id,
        )
        for job in charged
    ]


async def open_service(
    config: Config, *, db: Database, scheduler: Scheduler, model: str, tokenizer: Tokenizer | None = None
) -> ImageService:
    """Build the service from the config, with the moderators' rules and the last hour's usage read back."""
    defaults, ceilings = config_limits(config)
    moderation = await Moderation.load(
        db, scheduler, defaults=defaults, ceilings=ceilings, blocklist=config.prompts.blocklist
    )
    usage = Usage()
    usage.load(_priced(await db.charges_since(time.time() - WINDOW)))
    return ImageService(
        db=db,
        scheduler=scheduler,
        moderation=moderation,
        usage=usage,
        generation=config.generation,
        variation=config.variation,
        upscale=config.upscale,
        model=model,
        scheduler_name=config.model.scheduler,
        tokenizer=tokenizer,
        prompts=config.prompts,
        image_folder=config.storage.path.parent / "images" if config.storage.keep_images else None,
        forget_deleted=config.storage.forget_deleted,
    )


class ImageService(Admissions):
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
        variation: VariationConfig | None = None,
        upscale: UpscaleConfig | None = None,
    ) -> None:
        self.db = db
        self.scheduler = scheduler
        self.moderation = moderation
        self.usage = usage
        self.generation = generation
        self.variation = variation or VariationConfig()
        self.upscale = upscale or UpscaleConfig()
        self.model = model
        self.scheduler_name = scheduler_name
        self.tokenizer = tokenizer
        self.prompts = prompts or PromptsConfig()
        self.image_folder = image_folder  # where PNGs are kept (storage.keep_images); None keeps none
        self.forget_deleted = forget_deleted  # a deleted result's rows go too, votes included
        self.accepting = True  # False once the bot is stopping

    # Jobs

    async def enqueue(
        self,
        admission: Admission,
        *,
        init_image: bytes | None = None,
        reply: Reply | None = None,
        revision: str | None = None,
    ) -> Queued:
        """Store an admitted request as a job and queue its images in the place it holds.

        ``revision`` is a candidate revision (``model.candidates``, as configured) to render it with; None: the
        production one. One no worker serves is refused (RevisionUnserved) before anything is stored."""
        request = admission.request
        if not admission.open:
            raise ValueError("that admission was already used or released")
        if (request.settings.mode is Mode.IMG2IMG) != (init_image is not None):
            raise ValueError("img2img requests need their init image, and only they take one")
        try:
            self.scheduler.check_revision(revision)
            if init_image is not None:  # from a download: refused here, in one clear line, before it is stored
                await asyncio.to_thread(open_init_image, init_image)
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
                revision=revision,
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
            revision=job.revision,
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
            if job.revision is not None:  # half of an arena pair: its other half is delivered as a plain result
                await self.db.end_job(
                    job_id=job.id,
                    error="the bot restarted before this blind comparison was shown",
                    status=JobStatus.CANCELLED,
                )
                continue
            if job.revision not in self.scheduler.revisions:  # a candidate taken out of the config since
                await self.db.end_job(
                    job_id=job.id,
                    error=f"the bot restarted without the model revision {job.revision} this job asked for",
                    status=JobStatus.CANCELLED,
                )
                continue
            ticket = self.scheduler.submit(
                job_id=job.id,
                user_id=job.user_id,
                guild_id=job.guild_id,
                specs=job_specs(job, init_image),
                revision=job.revision,
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

    async def delete(
        self, *, job_id: int, guild_id: int | None, actor_id: int, moderator: bool, message_id: int | None
    ) -> Job:
        """Delete a result's images for its requester or a moderator; their rows stay, marked deleted, for the
        statistics (unless storage.forget_deleted). Returns the job.

        ``message_id`` is the message the click came from: a job's Delete acts only on the job's own message (the
        job named by a custom_id is untrusted), once its id is recorded.
        """
        job = await self.db.get_job(job_id=job_id)
        if job is None or job.guild_id != guild_id or not await self.db.job_images(job_id=job_id):
            raise JobNotFound("Those images are no longer in the database.")
        if job.message_id is not None and job.message_id != message_id:
            raise Refused(NOT_ITS_MESSAGE)
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
            "Cancelled by its requester." if own else f"Cancelled by a moderator (<@{actor_id}>){because(reason)}."
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

    # The blind A/B arena

    @property
    def candidates(self) -> tuple[str, ...]:
        """Return the candidate revisions the workers serve (``model.candidates``), by name."""
        return tuple(sorted(revision for revision in self.scheduler.revisions if revision is not None))

    def arena_candidate(self, guild_id: int | None) -> str:
        """Return a candidate revision to pair with production in a server (one at random among several), or raise
        Refused: the bot serves none, or the server's moderators turned the arena off."""
        candidates = self.candidates
        if not candidates:
            raise Refused("The arena is not set up here: this bot serves no candidate model revision to compare with.")
        if not self.moderation.arena_on(guild_id):
            raise Refused("The moderators turned the arena off in this server, so there is nothing to compare.")
        return candidates[0] if len(candidates) == 1 else secrets.choice(candidates)

    def admit_candidate(self, requester: Requester, admission: Admission) -> Admission:
        """Take a place for an admitted request's candidate render, the arena's other image: the same request,
        charged to nobody (a pair costs its requester one image; the second is the server's). No await."""
        limits = self.moderation.limits(requester.guild_id, requester.user_id, requester.role_ids)
        # One more than the member's own cap: a request that fitted brings its comparison with it.
        place = self.scheduler.reserve(
            user_id=requester.user_id, guild_id=requester.guild_id, max_queued=limits.max_queued + 1
        )
        charge = self.usage.charge(guild_id=requester.guild_id, user_id=requester.user_id, cost=0)
        return Admission(request=admission.request, place=place, charge=charge)

    async def record_pair(
        self, *, production: Queued, candidate: Queued, production_side: str, message_id: int | None = None
    ) -> ArenaPair:
        """Store a rendered pair: the first image of each job, production's on ``production_side``."""
        job = production.job
        first, second = (production.job.id, 0), (candidate.job.id, 0)
        left, right = (first, second) if production_side == "left" else (second, first)
        pair = await record_pair(
            self.db,
            guild_id=job.guild_id,
            channel_id=job.channel_id,
            requester_id=job.user_id,
            left=left,
            right=right,
            production_side=production_side,
        )
        if message_id is not None:
            await self.db.set_arena_message(pair_id=pair.id, message_id=message_id)
        return pair

    async def abandon(self, queued: Queued, *, error: str) -> None:
        """End a job whose images will not be shown (the other half of its arena pair failed), giving its charge
        back."""
        self.scheduler.cancel(queued.job.id, error)
        await self.db.end_job(job_id=queued.job.id, error=error)
        self.usage.refund_job(queued.job.id)

    async def pair_shown(self, *, pair_id: int, message_id: int) -> None:
        """Record the message that shows a pair (votes are timed from now)."""
        await self.db.set_arena_message(pair_id=pair_id, message_id=message_id)

    async def arena_vote(
        self, requester: Requester, *, pair_id: int, message_id: int | None, choice: Choice, max_votes_per_day: int
    ) -> Reveal:
        """Record a member's vote on the pair a button names, if that pair is the one its message shows (a
        custom_id is untrusted input), and return the reveal."""
        self.check_access(requester, what="take votes")
        pair = await self.db.arena_pair(pair_id=pair_id)
        if (
            pair is None
            or pair.guild_id != requester.guild_id
            or pair.message_id is None
            or pair.message_id != message_id
        ):
            raise JobNotFound("That comparison is not the one on this message, so no vote was recorded.")
        seconds = time.time() - pair.posted_at if pair.posted_at is not None else None
        return await arena_vote(
            self.db,
            pair_id=pair_id,
            member=requester.user_id,
            choice=choice,
            seconds=seconds,
            max_votes_per_day=max_votes_per_day,
        )

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

    async def arena_standings(self, *, guild_id: int, max_votes_per_day: int) -> Standings:
        """Return a server's blind A/B arena ratings (/stats for: arena)."""
        return await standings(self.db, guild_id=guild_id, max_votes_per_day=max_votes_per_day)


def _keep(folder: Path, job_id: int, images: Sequence[RenderedImage]) -> list[str | None]:
    """Write a job's PNGs under the storage folder (storage.keep_images), for this user only; return their paths."""
    private_folder(folder)
    paths: list[str | None] = []
    for index, image in enumerate(images):
        path = folder / f"sygil_{job_id}_{index}.png"
        write_private(path, image.png)
        paths.append(str(path))
    return paths
