"""Admission: what can refuse a request, and what an accepted one takes (its place in the queue and its share of
the user's hourly limit).

Admission is synchronous: every check (the server's rules, the prompt, the limits, the place in the queue) runs
and the place is taken with no await in between, so a burst of requests cannot overshoot a limit, and the caller
can refuse privately before anything public is posted.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from bot.config import GenerationConfig, PromptsConfig, UpscaleConfig, VariationConfig
from bot.engine.types import Mode, Settings
from bot.errors import BotError, JobNotFound, PromptRejected, Refused
from bot.jobs import Job, JobKind
from bot.limits import DESCRIPTIONS, Charge, Resolved, Usage, describe_images, describe_wait
from bot.limits import standard_images as cost_of
from bot.markdown import inert
from bot.moderation import Moderation
from bot.prompts import Rules, Tokenizer, check_prompt
from bot.scheduler import Place, Scheduler
from bot.storage import Database

MAX_SEED = 2**32 - 1
MAX_SIDE = 2048  # pixels: the most Settings (and a variation's source image) allow


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
class Allowance:
    """What a user may still do: the limits in force, the hour's usage, and when more frees up."""

    limits: Resolved
    used: float
    queued: int
    next_free: float | None  # when one more standard image fits again; None while one fits now


def random_seed() -> int:
    return secrets.randbelow(MAX_SEED + 1)


class Admissions:
    """Check requests against the server's rules, the prompt rules and the user's limits, and take their place.

    Mixed into ImageService, whose constructor sets the state declared here.
    """

    db: Database
    scheduler: Scheduler
    moderation: Moderation
    usage: Usage
    generation: GenerationConfig
    variation: VariationConfig
    upscale: UpscaleConfig
    tokenizer: Tokenizer | None
    prompts: PromptsConfig
    accepting: bool  # False once the bot is stopping

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
                f"The moderators of this server have banned you from using the bot{because(reason)}. "
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
                f"The moderators have paused image generation{because(reason)}. "
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
        checked = self._check_here(requester, prompt, negative)
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

    def admit_remix(
        self, requester: Requester, *, kind: JobKind, parent: Job, index: int, strength: float | None = None
    ) -> Admission:
        """Admit a new job from one image: a reroll (same prompt and settings, new seed) or a variation.

        A variation is img2img from that image (the caller supplies its PNG to ``enqueue``) at ``strength`` (a Vary
        button's: ``variation.subtle`` when None). A reroll is always txt2img, also of a variation: the variation's
        own source image belongs to another message; a reroll of an upscale renders at the size its source had. The
        prompt is checked again, against today's blocklist and this channel's rules.
        """
        if kind not in (JobKind.REROLL, JobKind.VARIATION):
            raise ValueError(f"a remix is a reroll or a variation, not {kind}")
        self.check_access(requester)
        self.check_open(requester)
        checked = self._recheck(requester, parent)
        source = parent.settings
        variation = kind is JobKind.VARIATION
        halve = not variation and parent.kind is JobKind.UPSCALE
        settings = Settings(
            steps=source.steps,
            guidance=source.guidance,
            width=source.width // 2 if halve else source.width,
            height=source.height // 2 if halve else source.height,
            mode=Mode.IMG2IMG if variation else Mode.TXT2IMG,
            strength=(self.variation.subtle if strength is None else strength) if variation else source.strength,
        )
        if variation:
            _check_denoises(settings, "A variation")
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

    def admit_upscale(self, requester: Requester, *, parent: Job, index: int) -> Admission:
        """Admit an Upscale x2 of one image: img2img from it (the caller supplies its PNG to ``enqueue``) at twice its
        width and height, at ``upscale.strength``, with its prompt, negative prompt, seed, steps and guidance.

        Diffusers runs ``int(steps * strength)`` of the steps from the image, so the steps scale with the strength;
        the charge is the pixels x steps rule's, four times the image's own. An upscale of an upscale, or one past
        2048 pixels a side, is refused.
        """
        self.check_access(requester)
        self.check_open(requester)
        if parent.kind is JobKind.UPSCALE:
            raise Refused("That image is already an upscale; upscale the image it came from instead.")
        source = parent.settings
        width, height = source.width * 2, source.height * 2
        if max(width, height) > MAX_SIDE:
            raise Refused(
                f"An upscale of this {source.width}×{source.height} image would be {width}×{height}, more than "
                f"{MAX_SIDE} pixels a side."
            )
        checked = self._recheck(requester, parent)
        settings = Settings(
            steps=source.steps,
            guidance=source.guidance,
            width=width,
            height=height,
            mode=Mode.IMG2IMG,
            strength=self.upscale.strength,
        )
        _check_denoises(settings, "An upscale")
        request = Request(
            kind=JobKind.UPSCALE,
            user_id=requester.user_id,
            guild_id=requester.guild_id,
            channel_id=requester.channel_id,
            prompt=checked.prompt,
            negative=checked.negative,
            seed=(parent.seed + index) % (MAX_SEED + 1),  # the image's own: its images have consecutive seeds
            count=1,
            settings=settings,
            parent=(parent.id, index),
            tags=checked.tags,
        )
        return self._take_place(requester, request, what="this upscale")

    def _recheck(self, requester: Requester, parent: Job) -> CheckedPrompts:
        """Check a parent's prompts again, against today's blocklist and this channel's rules."""
        return self._check_here(requester, parent.prompt, parent.negative_prompt)

    def _check_here(self, requester: Requester, prompt: str, negative: str | None) -> CheckedPrompts:
        """Check prompts against the rules of the requester's server and channel."""
        rules = self.rules(
            guild_id=requester.guild_id, channel_id=requester.channel_id, age_restricted=requester.age_restricted
        )
        return self.check_prompts(prompt, negative, rules)

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

    def _take_place(self, requester: Requester, request: Request, *, what: str | None = None) -> Admission:
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
            if what is None:
                what = "another image" if request.count == 1 else f"these {request.count} images"
            counts = f" (it counts as {describe_images(cost)} images)" if cost > request.count else ""
            raise Refused(
                f"You have used {describe_images(used)} of your {hourly} {DESCRIPTIONS['images_per_hour']}. "
                f"You can make {what}{counts} in {describe_wait(frees - now)}."
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


def because(reason: str | None) -> str:
    """Add a moderator's reason to a message, shown as written (it formats and mentions nothing)."""
    return f": {inert(reason)}" if reason else ""


def _check_denoises(settings: Settings, what: str) -> None:
    """Refuse img2img settings under which diffusers would run no denoising step (``int(steps * strength)``)."""
    if int(settings.steps * settings.strength) < 1:
        raise InvalidRequest(
            f"{what} of an image made with {settings.steps} step{_s(settings.steps)} at strength "
            f"{settings.strength:g} would run no denoising step; make the image with more steps first."
        )


def _s(count: int) -> str:
    return "" if count == 1 else "s"
