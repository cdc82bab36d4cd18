"""Delivery: every accepted job's way from its interaction to its posted images, in background tasks.

While a job waits, its status message shows its place and a Cancel button; its images then go into that message
through the interaction's token, or into the channel once the token has expired (a remix's always go to the
channel, as a reply to its parent's message). Jobs queued before a restart are delivered again after it. The
Imagine extension makes one ``Deliveries`` and sets it as ``bot.deliveries``, where the buttons and
``SygilBot.shut_down`` find it.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from typing import TYPE_CHECKING

import discord

from bot.admission import Admission, because
from bot.engine.types import RenderedImage
from bot.errors import BotError, JobCancelled
from bot.jobs import Job, JobKind, Reply
from bot.service import Queued
from cogs._posting import wind_down
from cogs.imagine._text import PREVIEW_FILENAME, filename, result_text, status_interval, status_text
from cogs.imagine.buttons import cancel_view, result_view

if TYPE_CHECKING:
    from bot.client import SygilBot

log = logging.getLogger(__name__)

_TOKEN_LIFETIME = 15 * 60.0
_TOKEN_MARGIN = 60.0  # stop using an interaction token a minute before Discord expires it
_DOWNLOAD_TIMEOUT = 1.5  # seconds for a variation's source image, of the 3 Discord allows for an answer
_NO_PINGS = discord.AllowedMentions.none()


class Deliveries:
    """The jobs being delivered, each in its own task: accept, restore, settle and stop them."""

    def __init__(self, bot: SygilBot) -> None:
        self.bot = bot
        self.service = bot.service
        self._tasks: dict[asyncio.Task[None], Queued] = {}
        self._posting: set[asyncio.Task[None]] = set()  # deliveries past the wait, posting their outcome

    async def restore(self) -> None:
        """Deliver again every job accepted before a restart that never finished."""
        for queued in await self.service.restore():
            self._spawn(queued)

    async def accept(
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

    async def settle(self) -> None:
        """Wait for the deliveries whose images are ready (the bot is stopping and wants them posted first)."""
        ready = [task for task, queued in self._tasks.items() if queued.ticket.result.done()]
        await asyncio.gather(*ready, return_exceptions=True)

    async def stop(self) -> None:
        """Stop every delivery still waiting for its images, before the HTTP session closes.

        Their jobs stay queued in the database. One that is posting may finish and record it: stopped between
        the two, it would be posted again after the restart.
        """
        await wind_down(self._tasks, self._posting)

    def _spawn(self, queued: Queued) -> None:
        """Deliver a job in the background: the command returns while the job waits its turn."""

        async def deliver() -> None:
            try:
                await self.deliver(queued)
            except Exception:
                log.exception("Delivering job %d failed", queued.job.id)

        task = asyncio.get_running_loop().create_task(deliver(), name=f"deliver-{queued.job.id}")
        self._tasks[task] = queued
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        self._posting.discard(task)

    async def deliver(self, queued: Queued) -> None:
        """Keep the requester informed while the job waits, then post its images with their buttons."""
        job = queued.job
        finished = asyncio.ensure_future(self.service.wait(queued))
        # A job rendered before a restart may already show its images: no status over them while it renders again.
        quiet = queued.restored and await self.service.rendered(job_id=job.id)
        try:
            if not quiet:
                await self._show_status(queued, finished)
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

    async def _show_status(self, queued: Queued, finished: asyncio.Future[list[RenderedImage]]) -> None:
        """Keep the job's message saying where it is, and while it renders the newest frame of its image forming,
        until its outcome is known.

        Edits come at least ``preview.min_interval`` apart (counted from when Discord answered the last one, so
        however the requests are delayed on the way), each with the newest frame: older ones are dropped, so no
        queue of edits builds up. The loop ends before the outcome is posted, which replaces the frame.
        """
        job, ticket = queued.job, queued.ticket
        interval = self.bot.config.preview.min_interval
        shown, frame = "", None
        edited: float | None = None  # when Discord answered the last edit
        while not finished.done() and _alive(job.reply):
            ticket.new_preview.clear()  # before reading the frame: one arriving later sets it again
            text, newest = self._status(queued), ticket.preview
            if text != shown or newest is not frame:
                wait = 0.0 if edited is None else edited + interval - time.monotonic()
                if wait > 0:
                    await asyncio.wait({finished}, timeout=wait)
                    continue  # and show what is newest then
                files = None
                if newest is not frame:  # a new frame; none: back in line after its worker died, so the old one goes
                    files = [discord.File(io.BytesIO(newest.jpeg), filename=PREVIEW_FILENAME)] if newest else []
                try:
                    await self._edit_reply(job, content=text, view=None if shown else cancel_view(job.id), files=files)
                except discord.HTTPException as exc:
                    log.warning("Could not update the status of job %d: %s", job.id, exc)
                    return
                edited = time.monotonic()
                shown, frame = text, newest
            # Wake for the outcome or a new frame; the text alone is looked at again after a while.
            framed = asyncio.ensure_future(ticket.new_preview.wait())
            try:
                await asyncio.wait(
                    {finished, framed},
                    timeout=status_interval(self.service.scheduler.position(job.id)),
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                framed.cancel()

    def _posting_now(self) -> None:
        task = asyncio.current_task()
        if task is not None and task in self._tasks:
            self._posting.add(task)

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
            paused=f"The moderators paused the queue{because(reason)}." if paused else None,
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
        text = content if content is not None else result_text(job, images or [], notes, self.bot.config.variation)
        remix = job.parent_job_id is not None
        upscalable = job.kind is not JobKind.UPSCALE
        if _alive(job.reply) and not (remix and files):
            try:
                view = result_view(job.id, len(files), upscalable=upscalable) if files else None
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
            view=result_view(job.id, len(files), upscalable=upscalable) if files else discord.utils.MISSING,
            allowed_mentions=_NO_PINGS,
            nonce=f"sygil-job-{job.id}",
            reference=await self._parent_message(job),  # pyright: ignore[reportArgumentType]
        )
        if not remix and job.reply is not None and job.reply.message_id is not None:
            await self._retire_status(channel, job.reply.message_id, message.jump_url)
        elif remix and _alive(job.reply):
            try:  # no files: the last preview frame goes too
                await self._edit_reply(job, content=f"➡️ Posted: {message.jump_url}", files=[], clear_view=True)
            except discord.HTTPException as exc:
                log.info("Could not point the status of job %d at its result: %s", job.id, exc)
        return message.id

    async def _parent_message(self, job: Job) -> discord.MessageReference | None:
        """Return a reference to the message showing a remix's parent image, if it was posted."""
        if job.parent_job_id is None:
            return None
        parent = await self.service.job(job_id=job.parent_job_id)
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
                content=f"➡️ Posted below: {result_url}", view=None, attachments=[], allowed_mentions=_NO_PINGS
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
