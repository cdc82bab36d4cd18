"""/imagine: validate, queue, report the place in line, deliver the images with their buttons."""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.admission import MAX_SEED, Admission
from bot.client import requester
from bot.config import GenerationConfig
from bot.engine.types import RenderedImage
from bot.errors import BotError, JobCancelled, JobNotFound
from bot.jobs import Job, JobKind, Reply
from bot.prompts import SAFE_RATINGS
from bot.prompts.vocabulary import Vocabulary
from bot.service import Queued
from cogs.imagine._views import (
    DYNAMIC_ITEMS,
    cancel_view,
    filename,
    info_text,
    result_text,
    result_view,
    status_interval,
    status_text,
    vote_value,
)

if TYPE_CHECKING:
    from bot.client import SygilBot

log = logging.getLogger(__name__)

_TOKEN_LIFETIME = 15 * 60.0
_TOKEN_MARGIN = 60.0  # stop using an interaction token a minute before Discord expires it
_DOWNLOAD_TIMEOUT = 1.5  # seconds for a variation's source image, of the 3 Discord allows for an answer
_POSTING_TIMEOUT = 3.0  # seconds a stopping bot waits for results being posted
_NO_PINGS = discord.AllowedMentions.none()


class Imagine(commands.Cog):
    """Image generation commands and the buttons on their results."""

    def __init__(self, bot: SygilBot) -> None:
        self.bot = bot
        self.service = bot.service
        self.vocabulary = Vocabulary.load()
        self._command = _imagine_command(self, bot.config.generation)
        self._deliveries: dict[asyncio.Task[None], Queued] = {}
        self._posting: set[asyncio.Task[None]] = set()  # deliveries past the wait, posting their outcome

    async def cog_load(self) -> None:
        self.bot.add_dynamic_items(*DYNAMIC_ITEMS)
        self.bot.tree.add_command(self._command)
        for queued in await self.service.restore():
            self._spawn(queued)

    async def cog_unload(self) -> None:
        self.bot.remove_dynamic_items(*DYNAMIC_ITEMS)
        self.bot.tree.remove_command(self._command.name)
        # Stop every delivery still waiting for its images before the HTTP session closes (their jobs stay queued
        # in the database), but let one that is posting finish and record it: stopped between the two, it would
        # be posted again after the restart.
        waiting = [task for task in self._deliveries if task not in self._posting]
        for task in waiting:
            task.cancel()
        posting = list(self._posting)
        if posting:
            _, late = await asyncio.wait(posting, timeout=_POSTING_TIMEOUT)
            for task in late:
                task.cancel()
        await asyncio.gather(*waiting, *posting, return_exceptions=True)

    async def settle(self) -> None:
        """Wait for the deliveries whose images are ready (the bot is stopping and wants them posted first)."""
        ready = [task for task, queued in self._deliveries.items() if queued.ticket.result.done()]
        await asyncio.gather(*ready, return_exceptions=True)

    def _spawn(self, queued: Queued) -> None:
        """Deliver a job in the background: the command returns while the job waits its turn."""

        async def deliver() -> None:
            try:
                await self.deliver(queued)
            except Exception:
                log.exception("Delivering job %d failed", queued.job.id)

        task = asyncio.get_running_loop().create_task(deliver(), name=f"deliver-{queued.job.id}")
        self._deliveries[task] = queued
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._deliveries.pop(task, None)
        self._posting.discard(task)

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
        # Every check that can refuse runs, and the place is taken, before the first await: refusals stay private.
        admission = self.service.admit(
            requester(interaction),
            prompt=prompt,
            negative=negative,
            seed=seed,
            steps=steps,
            guidance=guidance,
            size=size,
            count=count,
        )
        await self._accept(interaction, admission)

    async def complete_tags(
        self, interaction: discord.Interaction[SygilBot], current: str
    ) -> list[app_commands.Choice[str]]:
        """Suggest how to finish the tag being typed: namespaces, then tags within one."""
        rules = self.service.rules(
            guild_id=interaction.guild_id,
            channel_id=interaction.channel_id,
            age_restricted=_age_restricted(interaction),
        )
        return [
            app_commands.Choice(name=value, value=value)
            for value in self.vocabulary.complete(current)
            if rules.allow_rating or not _mature_rating(value.rsplit(",", 1)[-1])
        ]

    async def remix(self, interaction: discord.Interaction[SygilBot], job_id: int, index: int, kind: JobKind) -> None:
        asker = requester(interaction)
        self.service.check_access(asker)
        parent = await self.service.source(job_id=job_id, index=index, guild_id=interaction.guild_id)
        attachment = _attachment(interaction.message, filename(job_id, index)) if kind is JobKind.VARIATION else None
        admission = self.service.admit_remix(asker, kind=kind, parent=parent, index=index)
        await self._accept(interaction, admission, attachment=attachment, private=True)

    async def _accept(
        self,
        interaction: discord.Interaction[SygilBot],
        admission: Admission,
        *,
        attachment: discord.Attachment | None = None,
        private: bool = False,
    ) -> None:
        """Store the admitted job, then answer and start its delivery.

        Stored first: once the requester sees the bot thinking, the job survives anything, even ``kill -9``. A
        remix (``private``) shows its place in line to its requester only: its result is posted as a reply to the
        parent's message, so the channel gets one message per result, threaded under the image it came from.
        """
        try:
            image = await _download(attachment) if attachment is not None else None
            reply = Reply(token=interaction.token, message_id=None, at=interaction.created_at.timestamp())
            queued = await self.service.enqueue(admission, init_image=image, reply=reply)
        except BaseException:
            self.service.release(admission)
            raise
        try:
            callback = await interaction.response.defer(thinking=True, ephemeral=private)
        except BaseException:
            await self.service.withdraw(queued, error="the interaction could not be acknowledged")
            raise
        message_id = callback.message_id if callback is not None else None
        if message_id is None:
            try:
                message_id = (await interaction.original_response()).id
            except discord.HTTPException as exc:
                log.warning("No message id for job %d (its result goes to the channel): %s", queued.job.id, exc)
        self._spawn(await self.service.acknowledged(queued, message_id=message_id))

    async def info(self, interaction: discord.Interaction[SygilBot], job_id: int) -> None:
        """Show privately everything that made a result's images."""
        db = self.bot.db
        job = await db.get_job(job_id=job_id)
        images = await db.job_images(job_id=job_id) if job is not None else []
        if job is None or job.guild_id != interaction.guild_id or not images:
            raise JobNotFound("Those images are no longer in the database.")
        tags = await db.job_tags(job_id=job_id)
        await interaction.response.send_message(
            info_text(job, images, tags), ephemeral=True, allowed_mentions=_NO_PINGS
        )

    async def delete(self, interaction: discord.Interaction[SygilBot], job_id: int) -> None:
        """Delete a result's message for its requester or a moderator."""
        job = await self.service.delete(
            job_id=job_id,
            guild_id=interaction.guild_id,
            actor_id=interaction.user.id,
            moderator=self.bot.is_moderator(interaction),
        )
        await interaction.response.send_message(f"The images of job {job.id} are deleted.", ephemeral=True)
        if interaction.message is not None:
            try:
                await interaction.message.delete()
            except discord.HTTPException as exc:
                log.warning("Could not delete the message of job %d: %s", job.id, exc)

    async def vote(self, interaction: discord.Interaction[SygilBot], job_id: int, index: int, vote: str) -> None:
        self.service.check_access(requester(interaction), what="take votes")
        job = await self.bot.db.get_job(job_id=job_id)
        if (
            job is None
            or job.guild_id != interaction.guild_id
            or index >= job.count
            or await self.bot.db.get_image(job_id=job_id, index=index) is None
        ):
            raise JobNotFound("That image is no longer in the database, so it cannot be voted on.")
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

    async def cancel(self, interaction: discord.Interaction[SygilBot], job_id: int) -> None:
        """Withdraw a job from its Cancel button: its requester's or a moderator's click."""
        asker = requester(interaction)
        banned, _ = self.service.moderation.ban_reason(asker.guild_id, asker.user_id)
        if banned:
            self.service.check_access(asker)  # raises the ban's message
        await self.service.cancel(
            job_id=job_id,
            guild_id=interaction.guild_id,
            actor_id=interaction.user.id,
            moderator=self.bot.is_moderator(interaction),
        )
        await interaction.response.send_message(f"Job {job_id} is cancelled.", ephemeral=True)

    # Delivery

    async def deliver(self, queued: Queued) -> None:
        """Keep the requester informed while the job waits, then post its images with their buttons."""
        job = queued.job
        finished = asyncio.ensure_future(self.service.wait(queued))
        # A job rendered before a restart may already show its images: no status over them while it renders again.
        quiet = queued.restored and await self.bot.db.get_image(job_id=job.id, index=0) is not None
        shown = ""
        try:
            while not quiet and not finished.done() and _alive(job.reply):
                text = self._status(queued)
                if text != shown:
                    try:
                        await self._edit_reply(job, content=text, view=None if shown else cancel_view(job.id))
                    except discord.HTTPException as exc:
                        log.warning("Could not update the status of job %d: %s", job.id, exc)
                        break
                    shown = text
                await asyncio.wait({finished}, timeout=status_interval(self.service.scheduler.position(job.id)))
            images = await finished
        except asyncio.CancelledError:
            finished.cancel()
            raise
        except JobCancelled as exc:
            self._posting_now()
            await self._post(job, content=f"🚫 {exc}\n-# {_prompt_line(job)}")
            return
        except BotError as exc:  # a failure whose message is for the user, such as an image too big for the GPU
            log.warning("Job %d failed: %s", job.id, exc)
            self._posting_now()
            await self._post(job, content=f"❌ {exc}\n-# {_prompt_line(job)}")
            return
        except Exception:
            log.exception("Job %d failed", job.id)
            self._posting_now()
            await self._post(job, content="❌ Rendering failed; it has been logged. Please try again.")
            return
        self._posting_now()
        message_id = await self._post(job, images=images, notes=queued.warnings)
        await self.service.complete(queued, message_id=message_id)

    def _posting_now(self) -> None:
        task = asyncio.current_task()
        if task in self._deliveries:
            self._posting.add(task)  # type: ignore[arg-type]

    def _status(self, queued: Queued) -> str:
        scheduler = self.service.scheduler
        job = queued.job
        paused, reason = self.service.moderation.pause_reason(job.guild_id)
        return status_text(
            scheduler.position(job.id),
            queued.ticket.step,
            queued.ticket.total_steps,
            queued.warnings,
            eta=scheduler.eta(job.id),
            paused=f"The moderators paused the queue{': ' + reason if reason else ''}." if paused else None,
        )

    async def _edit_reply(
        self,
        job: Job,
        *,
        content: str,
        view: discord.ui.View | None = None,
        files: list[discord.File] | None = None,
        clear_view: bool = False,
    ) -> discord.Message:
        """Edit the message that answers the job's interaction, through its token (also after a restart)."""
        assert job.reply is not None and job.reply.message_id is not None and self.bot.application_id is not None
        webhook = discord.Webhook.partial(self.bot.application_id, job.reply.token, client=self.bot)
        return await webhook.edit_message(
            job.reply.message_id,
            content=content,
            attachments=files if files is not None else discord.utils.MISSING,
            view=None if clear_view else view if view is not None else discord.utils.MISSING,
            allowed_mentions=_NO_PINGS,
        )

    async def _post(
        self,
        job: Job,
        *,
        content: str | None = None,
        images: list[RenderedImage] | None = None,
        notes: tuple[str, ...] = (),
    ) -> int | None:
        """Put a job's outcome in its interaction's message while its token lives, else in its channel.

        A remix's images always go to the channel, as a reply to its parent's message, and its private status
        message then links to them. Returns the message's id. A channel post carries the job's nonce, so if the
        bot dies after posting and before recording it, the post after the restart finds the first one instead of
        making a second.
        """
        files = [
            discord.File(io.BytesIO(image.png), filename=filename(job.id, i)) for i, image in enumerate(images or [])
        ]
        text = content if content is not None else result_text(job, images or [], notes)
        remix = job.parent_job_id is not None
        if _alive(job.reply) and not (remix and files):
            try:
                view = result_view(job.id, len(files)) if files else None
                message = await self._edit_reply(job, content=text, files=files, view=view, clear_view=view is None)
                return message.id
            except discord.HTTPException as exc:
                if exc.status not in (401, 404):
                    raise
                log.info("Interaction for job %d expired; posting to the channel", job.id)
                for file in files:
                    file.reset()
        await self.bot.wait_until_ready()
        channel = self.bot.get_channel(job.channel_id) or await self.bot.fetch_channel(job.channel_id)
        if not isinstance(channel, discord.abc.Messageable):
            log.warning("Cannot post job %d: channel %d is not a text channel", job.id, job.channel_id)
            return None
        # discord.py takes reference=None (no reply), though its overloads leave it out.
        message = await channel.send(  # pyright: ignore[reportCallIssue]
            content=text,
            files=files,
            view=result_view(job.id, len(files)) if files else discord.utils.MISSING,
            allowed_mentions=_NO_PINGS,
            nonce=f"sygil-job-{job.id}",
            reference=await self._parent_message(job),  # pyright: ignore[reportArgumentType]
        )
        if not remix and job.reply is not None and job.reply.message_id is not None:
            await self._retire_status(channel, job.reply.message_id, message.jump_url)
        elif remix and _alive(job.reply):
            try:
                await self._edit_reply(job, content=f"➡️ Posted: {message.jump_url}", clear_view=True)
            except discord.HTTPException as exc:
                log.info("Could not point the status of job %d at its result: %s", job.id, exc)
        return message.id

    async def _parent_message(self, job: Job) -> discord.MessageReference | None:
        """Return a reference to the message showing a remix's parent image, if it was posted."""
        if job.parent_job_id is None:
            return None
        parent = await self.bot.db.get_job(job_id=job.parent_job_id)
        if parent is None or parent.message_id is None:
            return None
        # Without the parent's message (deleted since), Discord posts the result as a plain message.
        return discord.MessageReference(
            message_id=parent.message_id,
            channel_id=parent.channel_id,
            guild_id=parent.guild_id,
            fail_if_not_exists=False,
        )

    async def _retire_status(self, channel: discord.abc.Messageable, message_id: int, result_url: str) -> None:
        """Point a status message whose token expired at the result posted below it, without its Cancel button."""
        if not isinstance(channel, discord.TextChannel | discord.Thread):
            return
        try:
            await channel.get_partial_message(message_id).edit(
                content=f"➡️ Posted below: {result_url}", view=None, allowed_mentions=_NO_PINGS
            )
        except discord.HTTPException as exc:
            log.info("Could not update the old status message %d: %s", message_id, exc)


async def _download(attachment: discord.Attachment) -> bytes:
    """Fetch a variation's source image quickly enough to answer within Discord's 3 seconds."""
    try:
        async with asyncio.timeout(_DOWNLOAD_TIMEOUT):
            return await attachment.read()
    except (discord.HTTPException, TimeoutError):
        raise BotError("I could not get that image from Discord quickly enough; please try again.") from None


def _prompt_line(job: Job) -> str:
    prompt = discord.utils.escape_markdown(job.prompt)
    return f"<@{job.user_id}> · job {job.id} · {prompt[:300]}"


def _alive(reply: Reply | None) -> bool:
    """Return whether an interaction token can still be used (Discord keeps it 15 minutes)."""
    return (
        reply is not None and reply.message_id is not None and time.time() - reply.at < _TOKEN_LIFETIME - _TOKEN_MARGIN
    )


def _mature_rating(item: str) -> bool:
    namespace, _, tag = item.strip().lstrip("(").partition(":")
    return namespace == "rating" and tag not in SAFE_RATINGS


def _age_restricted(interaction: discord.Interaction[SygilBot]) -> bool:
    channel = interaction.channel
    return bool(channel is not None and getattr(channel, "nsfw", False))


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
    callback = app_commands.guild_only(callback)
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
