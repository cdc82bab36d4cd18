"""/imagine: validate, queue, report the place in line, deliver the images with their buttons."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.config import GenerationConfig
from bot.engine.types import RenderedImage
from bot.errors import BotError
from bot.prompts import SAFE_RATINGS
from bot.prompts.vocabulary import Vocabulary
from bot.service import MAX_SEED, Queued
from bot.storage import Job, JobKind
from cogs.imagine._views import (
    DYNAMIC_ITEMS,
    filename,
    result_text,
    result_view,
    status_text,
    vote_value,
)

if TYPE_CHECKING:
    from bot.client import SygilBot

log = logging.getLogger(__name__)

STATUS_INTERVAL = 2.0  # seconds between edits of the "queued / rendering" message
_TOKEN_MARGIN = 60.0  # stop using an interaction token a minute before Discord expires it
_NO_PINGS = discord.AllowedMentions.none()


class Imagine(commands.Cog):
    """Image generation commands and the buttons on their results."""

    def __init__(self, bot: SygilBot) -> None:
        self.bot = bot
        self.service = bot.service
        self.vocabulary = Vocabulary.load()
        self._command = _imagine_command(self, bot.config.generation)
        self._tasks: set[asyncio.Task[None]] = set()

    async def cog_load(self) -> None:
        self.bot.add_dynamic_items(*DYNAMIC_ITEMS)
        self.bot.tree.add_command(self._command)
        for queued in await self.service.restore():
            self._spawn(queued, None)

    async def cog_unload(self) -> None:
        self.bot.remove_dynamic_items(*DYNAMIC_ITEMS)
        self.bot.tree.remove_command(self._command.name)
        # Stop every delivery before the HTTP session closes; their jobs stay queued in the database.
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, queued: Queued, interaction: discord.Interaction[SygilBot] | None) -> None:
        """Deliver a job in the background: the command returns while the job waits its turn."""

        async def deliver() -> None:
            try:
                await self.deliver(queued, interaction)
            except Exception:
                log.exception("Delivering job %d failed", queued.job.id)

        task = asyncio.get_running_loop().create_task(deliver(), name=f"deliver-{queued.job.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # Commands and buttons

    async def imagine(
        self,
        interaction: discord.Interaction[SygilBot],
        *,
        prompt: str,
        negative: str | None,
        seed: int | None,
        steps: int,
        guidance: float,
        size: str | None,
        count: int,
    ) -> None:
        request = self.service.prepare(
            user_id=interaction.user.id,
            guild_id=interaction.guild_id,
            channel_id=_channel_id(interaction),
            prompt=prompt,
            negative=negative,
            seed=seed,
            steps=steps,
            guidance=guidance,
            size=size,
            count=count,
            age_restricted=_age_restricted(interaction),
        )
        await interaction.response.defer(thinking=True)
        queued = await self.service.enqueue(request)
        self._spawn(queued, interaction)

    async def complete_tags(
        self, interaction: discord.Interaction[SygilBot], current: str
    ) -> list[app_commands.Choice[str]]:
        """Suggest how to finish the tag being typed: namespaces, then tags within one."""
        rules = self.service.rules(channel_id=interaction.channel_id, age_restricted=_age_restricted(interaction))
        return [
            app_commands.Choice(name=value, value=value)
            for value in self.vocabulary.complete(current)
            if rules.allow_rating or not _mature_rating(value.rsplit(",", 1)[-1])
        ]

    async def remix(self, interaction: discord.Interaction[SygilBot], job_id: int, index: int, kind: JobKind) -> None:
        request = await self.service.prepare_remix(
            kind=kind,
            job_id=job_id,
            index=index,
            user_id=interaction.user.id,
            guild_id=interaction.guild_id,
            channel_id=_channel_id(interaction),
        )
        attachment = _attachment(interaction.message, filename(job_id, index)) if kind is JobKind.VARIATION else None
        await interaction.response.defer(thinking=True)
        image = None
        if attachment is not None:
            try:
                image = await attachment.read()
            except discord.HTTPException:
                raise BotError("I could not download that image from Discord; please try again.") from None
        queued = await self.service.enqueue(request, init_image=image)
        self._spawn(queued, interaction)

    async def vote(self, interaction: discord.Interaction[SygilBot], job_id: int, index: int, vote: str) -> None:
        job = await self.bot.db.get_job(job_id=job_id)
        if job is None or index >= job.count or await self.bot.db.get_image(job_id=job_id, index=index) is None:
            raise BotError("That image is no longer in the database, so it cannot be voted on.")
        tally = await self.bot.db.record_vote(
            job_id=job_id, index=index, user_id=interaction.user.id, vote=vote_value(vote)
        )
        tallies = [
            tally if i == index else await self.bot.db.vote_tally(job_id=job_id, index=i) for i in range(job.count)
        ]
        await interaction.response.edit_message(view=result_view(job_id, job.count, tallies))
        if tally.mine:
            note = f"Your {'👍' if tally.mine > 0 else '👎'} on image {index + 1} is recorded."
        else:
            note = f"Your vote on image {index + 1} is withdrawn."
        await interaction.followup.send(note, ephemeral=True)

    # Delivery

    async def deliver(self, queued: Queued, interaction: discord.Interaction[SygilBot] | None) -> None:
        """Keep the requester informed while the job waits, then post its images with their buttons."""
        finished = asyncio.ensure_future(self.service.finish(queued))
        shown = ""
        try:
            while interaction is not None and not finished.done() and _token_alive(interaction):
                ticket = queued.ticket
                text = status_text(
                    self.service.scheduler.position(queued.job.id), ticket.step, ticket.total_steps, queued.warnings
                )
                if text != shown:
                    try:
                        await interaction.edit_original_response(content=text, allowed_mentions=_NO_PINGS)
                    except discord.HTTPException as exc:
                        log.warning("Could not update the status of job %d: %s", queued.job.id, exc)
                        break
                    shown = text
                await asyncio.wait({finished}, timeout=STATUS_INTERVAL)
            images = await finished
        except asyncio.CancelledError:
            finished.cancel()
            raise
        except Exception:
            log.exception("Job %d failed", queued.job.id)
            await self._post(
                queued.job, interaction, content="❌ Rendering failed; it has been logged. Please try again."
            )
            return
        await self._post(queued.job, interaction, images=images, notes=queued.warnings)

    async def _post(
        self,
        job: Job,
        interaction: discord.Interaction[SygilBot] | None,
        *,
        content: str | None = None,
        images: list[RenderedImage] | None = None,
        notes: tuple[str, ...] = (),
    ) -> None:
        """Put the result in the interaction's message while its token lives, else in the job's channel."""
        files = [
            discord.File(io.BytesIO(image.png), filename=filename(job.id, i)) for i, image in enumerate(images or [])
        ]
        view = result_view(job.id, len(files)) if files else discord.utils.MISSING
        text = content if content is not None else result_text(job, images or [], notes)
        message: discord.Message | None = None
        if interaction is not None and _token_alive(interaction):
            try:
                message = await interaction.edit_original_response(
                    content=text, attachments=files, view=view, allowed_mentions=_NO_PINGS
                )
            except discord.HTTPException as exc:
                if exc.status not in (401, 404):
                    raise
                log.info("Interaction for job %d expired; posting to the channel", job.id)
                for file in files:
                    file.reset()
        if message is None:
            await self.bot.wait_until_ready()
            channel = self.bot.get_channel(job.channel_id) or await self.bot.fetch_channel(job.channel_id)
            if not isinstance(channel, discord.abc.Messageable):
                log.warning("Cannot post job %d: channel %d is not a text channel", job.id, job.channel_id)
                return
            message = await channel.send(content=text, files=files, view=view, allowed_mentions=_NO_PINGS)
        if files:
            await self.bot.db.set_message(job_id=job.id, message_id=message.id)


def _channel_id(interaction: discord.Interaction[SygilBot]) -> int:
    if interaction.channel_id is None:
        raise BotError("This command works only in a channel.")
    return interaction.channel_id


def _mature_rating(item: str) -> bool:
    namespace, _, tag = item.strip().lstrip("(").partition(":")
    return namespace == "rating" and tag not in SAFE_RATINGS


def _age_restricted(interaction: discord.Interaction[SygilBot]) -> bool:
    channel = interaction.channel
    return bool(channel is not None and getattr(channel, "nsfw", False))


def _token_alive(interaction: discord.Interaction[SygilBot]) -> bool:
    age = (discord.utils.utcnow() - interaction.created_at).total_seconds()
    return age < 15 * 60 - _TOKEN_MARGIN


def _attachment(message: discord.Message | None, name: str) -> discord.Attachment:
    for attachment in message.attachments if message else ():
        if attachment.filename == name:
            return attachment
    raise BotError("That image is no longer attached to the message, so I cannot make a variation of it.")


def _imagine_command(cog: Imagine, gen: GenerationConfig) -> app_commands.Command[Any, ..., None]:
    """Build /imagine with the bounds from the settings, so Discord shows and enforces them."""

    async def imagine(
        interaction: discord.Interaction[SygilBot],
        prompt: str,
        negative: str | None = None,
        seed: int | None = None,
        steps: int = gen.default_steps,
        guidance: float = gen.default_guidance,
        size: str | None = None,
        count: int = gen.default_count,
    ) -> None:
        await cog.imagine(
            interaction,
            prompt=prompt,
            negative=negative,
            seed=seed,
            steps=steps,
            guidance=guidance,
            size=size,
            count=count,
        )

    # The bounds are settings, known only now: give discord.py the annotations as objects, not strings.
    imagine.__annotations__ = {
        "interaction": discord.Interaction,
        "prompt": app_commands.Range[str, 1, 1500],
        "negative": app_commands.Range[str, 1, 1500],
        "seed": app_commands.Range[int, 0, MAX_SEED],
        "steps": app_commands.Range[int, 1, gen.max_steps],
        "guidance": app_commands.Range[float, gen.min_guidance, gen.max_guidance],
        "size": str,
        "count": app_commands.Range[int, 1, gen.max_count],
        "return": None,
    }
    sizes = [app_commands.Choice(name=size.replace("x", "×"), value=size) for size in gen.sizes]
    callback: Callable[..., Coroutine[Any, Any, None]] = app_commands.choices(size=sizes)(imagine)
    callback = app_commands.autocomplete(prompt=cog.complete_tags, negative=cog.complete_tags)(callback)
    callback = app_commands.describe(
        prompt="What to draw: tags like species:seal, studio:dc and plain words, separated by commas",
        negative="What to keep out of the image",
        seed="Start from this seed to get the same image again (random when empty)",
        steps=f"Denoising steps (default {gen.default_steps}); more is slower and finer",
        guidance=f"How closely to follow the prompt (default {gen.default_guidance:g})",
        size=f"Image size in pixels (default {gen.sizes[0].replace('x', '×')})",
        count=f"How many images (default {gen.default_count})",
    )(callback)
    return app_commands.Command(name="imagine", description="Generate images with Sygil Diffusion", callback=callback)


async def setup(bot: SygilBot) -> None:
    await bot.add_cog(Imagine(bot))
