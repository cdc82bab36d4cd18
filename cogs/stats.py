"""/queue and /limits: what everyone may see of the queue and of their own limits."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.client import requester
from bot.limits import DESCRIPTIONS, describe_images, describe_wait

if TYPE_CHECKING:
    from bot.client import SygilBot

_NO_PINGS = discord.AllowedMentions.none()


class Stats(commands.Cog):
    """Commands for everyone about the queue and their limits."""

    def __init__(self, bot: SygilBot) -> None:
        self.bot = bot
        self.service = bot.service

    @app_commands.command(name="queue")
    @app_commands.guild_only()
    async def queue(self, interaction: discord.Interaction[SygilBot]) -> None:
        """Show how many jobs wait, where yours are, and whether the queue is paused"""
        scheduler = self.service.scheduler
        guild_id = interaction.guild_id
        waiting = scheduler.waiting(guild_id)
        rendering = [ticket for ticket in scheduler.running if ticket.guild_id == guild_id]
        lines = [f"**Queue:** {len(waiting)} job{_s(len(waiting))} waiting, {len(rendering)} rendering."]
        paused, reason = self.service.moderation.pause_reason(guild_id)
        if paused:
            lines.append(f"⏸️ Paused by the moderators{': ' + reason if reason else ''}. Queued jobs keep their place.")
        mine = [ticket for ticket in rendering + waiting if ticket.user_id == interaction.user.id]
        for ticket in mine:
            position = scheduler.position(ticket.job_id)
            if position == 0:
                where = f"rendering, step {ticket.step}/{ticket.total_steps}"
            else:
                where = f"position {position} in line"
                eta = scheduler.eta(ticket.job_id)
                if eta is not None and not paused:
                    where += f", ready in about {describe_wait(eta)}"
            lines.append(f"• Your job {ticket.job_id}: {where}")
        if not mine:
            lines.append("You have no jobs in the queue.")
        await interaction.response.send_message("\n".join(lines), ephemeral=True, allowed_mentions=_NO_PINGS)

    @app_commands.command(name="limits")
    @app_commands.guild_only()
    async def limits(self, interaction: discord.Interaction[SygilBot]) -> None:
        """Show your limits here, what you used in the last hour and when more frees up"""
        allowance = self.service.allowance(requester(interaction))
        limits = allowance.limits
        hourly = limits.images_per_hour
        lines = [
            "**Your limits here**",
            f"• {DESCRIPTIONS['images_per_hour']}: **{hourly}** ({limits.origins['images_per_hour'].describe()}); "
            f"used in the last hour: **{describe_images(allowance.used)}**.",
        ]
        if hourly == 0:
            lines.append("  You cannot generate images here.")
        elif allowance.next_free is not None:
            lines.append(f"  You can make another image in {describe_wait(allowance.next_free - time.time())}.")
        else:
            left = max(0.0, hourly - allowance.used)
            lines.append(f"  You can make {describe_images(left)} more standard image{_s(left)} now.")
        lines.append(
            "  A standard image is 512×512 at 25 steps; a bigger or longer one counts in proportion "
            "(768×512 at 50 steps counts 3)."
        )
        lines.append(
            f"• {DESCRIPTIONS['max_queued']}: **{limits.max_queued}** ({limits.origins['max_queued'].describe()}); "
            f"you have {allowance.queued} now."
        )
        for name in ("max_count", "max_steps"):
            lines.append(f"• {DESCRIPTIONS[name]}: **{limits.value(name)}** ({limits.origins[name].describe()})")
        await interaction.response.send_message("\n".join(lines), ephemeral=True, allowed_mentions=_NO_PINGS)


def _s(count: float) -> str:
    return "" if count == 1 else "s"


async def setup(bot: SygilBot) -> None:
    await bot.add_cog(Stats(bot))
