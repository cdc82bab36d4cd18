"""The blind A/B arena on Discord: a prompt rendered by production and a candidate, posted side by side without
their names, left and right at random, with the vote buttons (``_views.py``) that reveal them privately.

A pair comes from ``/imagine compare:true`` or, at ``arena.rate``, from an ordinary /imagine (the Imagine cog
admits both renders and hands them to ``Arena.accept``). Its two jobs are not delivered one by one: the pair
waits for both and posts one message.
"""

from __future__ import annotations

import asyncio
import io
import logging
import secrets
import time
from typing import TYPE_CHECKING

import discord
from discord.ext import commands

from bot.admission import Admission, because
from bot.arena import anonymous_png
from bot.errors import BotError
from bot.service import Queued
from cogs._posting import wind_down
from cogs.arena._views import DYNAMIC_ITEMS, pair_view
from cogs.imagine._text import status_interval, status_text

if TYPE_CHECKING:
    from bot.client import SygilBot

log = logging.getLogger(__name__)

_NO_PINGS = discord.AllowedMentions.none()
_TOKEN_LIFETIME = 14 * 60.0  # Discord keeps an interaction token 15 minutes: stop using it a minute before


class Arena(commands.Cog):
    """Post blind pairs and take their votes; registers the vote buttons while loaded."""

    def __init__(self, bot: SygilBot) -> None:
        self.bot = bot
        self.service = bot.service
        self._tasks: set[asyncio.Task[None]] = set()
        self._posting: set[asyncio.Task[None]] = set()  # pairs past the wait, being posted and recorded

    async def cog_load(self) -> None:
        self.bot.add_dynamic_items(*DYNAMIC_ITEMS)

    async def cog_unload(self) -> None:
        self.bot.remove_dynamic_items(*DYNAMIC_ITEMS)
        # Pairs still rendering stay queued in the database; one being posted may finish and record its message.
        await wind_down(self._tasks, self._posting)

    async def accept(
        self,
        interaction: discord.Interaction[SygilBot],
        production: Admission,
        candidate: Admission,
        *,
        revision: str,
    ) -> None:
        """Store and queue both renders of a pair, answer, then post the pair once both are done."""
        service = self.service
        try:
            first = await service.enqueue(production)
        except BaseException:
            service.release(candidate)
            raise
        try:
            second = await service.enqueue(candidate, revision=revision)
        except BaseException:
            await service.withdraw(first, error="its comparison could not be queued")
            raise
        try:
            await interaction.response.defer(thinking=True)
        except BaseException:
            for queued in (first, second):
                await service.withdraw(queued, error="the interaction could not be acknowledged")
            raise
        task = asyncio.get_running_loop().create_task(
            self._deliver(interaction, first, second), name=f"arena-{first.job.id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._posting.discard(task)

    async def _deliver(self, interaction: discord.Interaction[SygilBot], production: Queued, candidate: Queued) -> None:
        try:
            await self._post_pair(interaction, production, candidate)
        except asyncio.CancelledError:
            raise
        except BotError as exc:
            log.warning("Arena pair of job %d failed: %s", production.job.id, exc)
            await self._say(interaction, f"❌ {exc}")
        except Exception:
            log.exception("Arena pair of job %d failed", production.job.id)
            await self._say(interaction, "❌ Rendering the comparison failed; it has been logged. Please try again.")

    async def _post_pair(
        self, interaction: discord.Interaction[SygilBot], production: Queued, candidate: Queued
    ) -> None:
        service = self.service
        waiting = asyncio.ensure_future(
            asyncio.gather(service.wait(production), service.wait(candidate), return_exceptions=True)
        )
        shown = ""
        try:
            # While both images wait and render, the requester sees the later one's place in line.
            while not waiting.done() and _alive(interaction):
                text = self._status(production, candidate)
                if text != shown:
                    try:
                        await interaction.edit_original_response(content=text, allowed_mentions=_NO_PINGS)
                    except discord.HTTPException as exc:
                        log.warning("Could not update the status of the pair of job %d: %s", production.job.id, exc)
                        break
                    shown = text
                position = service.scheduler.position(production.job.id)
                await asyncio.wait({waiting}, timeout=status_interval(position))
            rendered = await waiting
        except asyncio.CancelledError:
            waiting.cancel()
            raise
        task = asyncio.current_task()
        if task is not None and task in self._tasks:
            self._posting.add(task)
        failed = next((outcome for outcome in rendered if isinstance(outcome, BaseException)), None)
        if failed is not None:
            # Half a pair is no comparison: the image that did render is not shown, and its charge is given back.
            for queued, outcome in zip((production, candidate), rendered, strict=True):
                if not isinstance(outcome, BaseException):
                    await service.abandon(queued, error="the other image of its comparison failed")
            raise failed
        production_png, candidate_png = (
            outcome[0].png for outcome in rendered if not isinstance(outcome, BaseException)
        )
        production_side = secrets.choice(("left", "right"))
        pair = await service.record_pair(production=production, candidate=candidate, production_side=production_side)
        left, right = (production_png, candidate_png) if production_side == "left" else (candidate_png, production_png)
        # The engine's PNG text chunks name the revision: the pair shows pixels only.
        left, right = await asyncio.gather(
            asyncio.to_thread(anonymous_png, left), asyncio.to_thread(anonymous_png, right)
        )
        files = [
            discord.File(io.BytesIO(left), filename="left.png"),
            discord.File(io.BytesIO(right), filename="right.png"),
        ]
        job = production.job
        prompt = discord.utils.escape_markdown(job.prompt)[:1500]
        text = (
            f"⚖️ **Blind comparison** for <@{job.user_id}>: {prompt}\n"
            "Two models drew this prompt with the same seed and settings. Which image is better? "
            "Your vote shows you which model made which."
        )
        message = None
        # The interaction's token lasts 15 minutes: after a long wait the pair goes to the channel.
        if _alive(interaction):
            try:
                message = await interaction.edit_original_response(
                    content=text, attachments=files, view=pair_view(pair.id), allowed_mentions=_NO_PINGS
                )
            except discord.HTTPException as exc:
                if exc.status not in (401, 404):
                    raise
                log.info("Interaction for the pair of job %d expired; posting to the channel", job.id)
                for file in files:
                    file.reset()
        if message is None:
            channel = self.bot.get_channel(job.channel_id) or await self.bot.fetch_channel(job.channel_id)
            if not isinstance(channel, discord.abc.Messageable):
                raise BotError("The comparison's channel is gone, so it could not be posted.")
            message = await channel.send(content=text, files=files, view=pair_view(pair.id), allowed_mentions=_NO_PINGS)
        await service.pair_shown(pair_id=pair.id, message_id=message.id)
        for queued in (production, candidate):
            await service.complete(queued, message_id=message.id)

    def _status(self, production: Queued, candidate: Queued) -> str:
        scheduler = self.service.scheduler
        positions = [scheduler.position(queued.job.id) or 0 for queued in (production, candidate)]
        later = max(positions)
        etas = [eta for queued in (production, candidate) if (eta := scheduler.eta(queued.job.id)) is not None]
        ticket = production.ticket
        paused, reason = self.service.moderation.pause_reason(production.job.guild_id)
        text = status_text(
            later or None,
            ticket.step,
            ticket.total_steps,
            production.warnings,
            eta=max(etas) if etas else None,
            paused=f"The moderators paused the queue{because(reason)}." if paused else None,
        )
        return f"⚖️ Blind comparison\n{text}"

    async def _say(self, interaction: discord.Interaction[SygilBot], text: str) -> None:
        try:
            await interaction.edit_original_response(content=text, allowed_mentions=_NO_PINGS)
        except discord.HTTPException as exc:
            log.warning("Could not tell the requester their comparison failed: %s", exc)


def _alive(interaction: discord.Interaction[SygilBot]) -> bool:
    """Return whether the interaction's token can still be used."""
    return time.time() - interaction.created_at.timestamp() < _TOKEN_LIFETIME


async def setup(bot: SygilBot) -> None:
    await bot.add_cog(Arena(bot))
