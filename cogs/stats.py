"""/queue, /limits and /stats: what everyone may see of the queue, their own limits, and the votes."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.admission import because
from bot.arena import Matchup, Standings
from bot.client import requester
from bot.engine.revision import short
from bot.limits import DESCRIPTIONS, describe_images, describe_wait
from bot.stats import Approval, Figures, Rated

if TYPE_CHECKING:
    from bot.client import SygilBot

_NO_PINGS = discord.AllowedMentions.none()
_NAME_LIMIT = 40  # characters of a tag shown
_REVISIONS_SHOWN = 5
_MESSAGE_LIMIT = 2000  # characters in a Discord message


class Stats(commands.Cog):
    """Commands for everyone about the queue, their limits and the votes."""

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
        lines.extend(scheduler.worker_notes())  # a GPU cluster's workers, or why none renders
        paused, reason = self.service.moderation.pause_reason(guild_id)
        if paused:
            lines.append(f"⏸️ Paused by the moderators{because(reason)}. Queued jobs keep their place.")
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

    # One command with an optional choice rather than a group with `server`, `me` and `arena` subcommands: Discord
    # cannot run a group by itself, and plain `/stats` must work. It reads `/stats for: me`, `/stats for: arena`.
    @app_commands.command(name="stats")
    @app_commands.guild_only()
    @app_commands.rename(scope="for")
    @app_commands.describe(
        scope="This server's figures (the default), those of the images you made here, or the blind A/B arena's"
    )
    async def stats(
        self, interaction: discord.Interaction[SygilBot], scope: Literal["server", "me", "arena"] = "server"
    ) -> None:
        """Show images made, votes, approval, the best and worst tags and busiest hours here, or yours"""
        assert interaction.guild_id is not None  # guild_only
        # Private, like /queue and /limits: no channel fills up with figures. The queries take a moment on a big
        # server, so acknowledge first.
        await interaction.response.defer(ephemeral=True, thinking=True)
        if scope == "arena":
            standings = await self.service.arena_standings(
                guild_id=interaction.guild_id, max_votes_per_day=self.bot.config.arena.max_votes_per_day
            )
            await interaction.followup.send(describe_arena(standings), ephemeral=True, allowed_mentions=_NO_PINGS)
            return
        found = await self.service.stats(
            guild_id=interaction.guild_id,
            user_id=interaction.user.id if scope == "me" else None,
            min_votes=self.bot.config.stats.min_votes,
        )
        await interaction.followup.send(describe(found), ephemeral=True, allowed_mentions=_NO_PINGS)


def describe(found: Figures) -> str:
    """Write the figures as a short message, far under Discord's 2,000 characters."""
    cast = found.cast or Approval()
    if found.user_id is None:
        if not found.images:
            return "No images yet in this server: make the first with `/imagine`."
        lines = ["**Stats for this server**", f"{_images(found.images)} made; {_votes(found.approval, bold=True)}."]
    else:
        lines = ["**Your stats here**"]
        if found.images:
            lines.append(f"You made {_images(found.images)}; they got {_votes(found.approval, bold=True)}.")
        else:
            lines.append("You have made no images here yet: try `/imagine`.")
        if cast.rate is not None:
            lines.append(f"You cast **{cast.votes:,}** vote{_s(cast.votes)} here, **{cast.rate:.0%}** of them 👍.")
        if not found.images:
            return "\n".join(lines)
    ranks = [
        ("Best namespaces", found.best_namespaces),
        ("Worst namespaces", found.worst_namespaces),
        ("Best tags", found.best_tags),
        ("Worst tags", found.worst_tags),
    ]
    ranks = [(title, items) for title, items in ranks if items]
    for title, items in ranks:
        lines.append(f"**{title}:** " + " · ".join(_rated(item) for item in items))
    if found.busiest_hours:
        hours = " · ".join(
            f"{hour:02d}:00–{(hour + 1) % 24:02d}:00 ({images:,})" for hour, images in found.busiest_hours
        )
        lines.append(f"**Busiest hours (UTC, images):** {hours}")
    lines.append("**By model revision**, newest first:")
    for row in found.revisions[:_REVISIONS_SHOWN]:
        name = f"`{short(row.revision)}`" if row.revision else "not recorded"
        lines.append(f"• {name}: {_images(row.images, bold=False)}, {_votes(row.approval)}")
    if len(found.revisions) > _REVISIONS_SHOWN:
        lines.append(f"…and {len(found.revisions) - _REVISIONS_SHOWN} more.")
    if ranks:
        lines.append(f"-# Namespaces and tags with {found.min_votes} votes or more are ranked. Deleted images count.")
    else:
        lines.append(f"-# No namespace or tag has the {found.min_votes} votes it needs to be ranked yet.")
    return "\n".join(lines)


def describe_arena(standings: Standings) -> str:
    """Write the arena's standings as a short message; namespaces that would not fit in 2,000 characters are cut."""
    if not standings.voters:
        return "No arena votes yet in this server: pairs appear under some `/imagine` results once candidates run."
    lines = ["**Arena: blind A/B votes here**"]
    if standings.production is not None:
        lines.append(f"Production: {_revision(standings.production)}. Win rates count a tie as half.")
    for matchup in standings.matchups:
        lines.append(f"• {_matchup(matchup)}")
    if not standings.matchups:
        lines.append("No counted vote compared a candidate with production yet.")
    if standings.ratings:
        lines.append("**Ratings** (Bradley–Terry as Elo, production 1000; 95% bootstrap interval):")
        for rating in standings.ratings:
            lines.append(
                f"• {_revision(rating.revision)}: **{rating.elo:.0f}** ({rating.low:.0f}–{rating.high:.0f}), "
                f"{rating.votes:,} vote{_s(rating.votes)}"
            )
    notes = [f"{standings.both_bad:,} “both bad” vote{_s(standings.both_bad)} (in no rate)"]
    if standings.uncounted:
        notes.append(
            f"{standings.uncounted:,} vote{_s(standings.uncounted)} past the daily cap of "
            f"{standings.max_votes_per_day:,} per member, not counted"
        )
    tail = [
        f"Suspicious voters: **{standings.suspicious:,}** of {standings.voters:,} "
        "(nearly every vote the same, or most within a second).",
        "-# " + "; ".join(notes) + ".",
    ]
    namespaces = [
        f"• {discord.utils.escape_markdown(namespace)}: " + " · ".join(_short_matchup(matchup) for matchup in found)
        for namespace, found in standings.namespaces
    ]
    shown = len(namespaces)
    while True:
        middle = ["**By namespace** of the prompt's tags:", *namespaces[:shown]] if shown else []
        if shown < len(namespaces):
            middle.append(f"…and {len(namespaces) - shown} more namespace{_s(len(namespaces) - shown)}.")
        text = "\n".join([*lines, *middle, *tail])
        if len(text) <= _MESSAGE_LIMIT or shown == 0:
            return text[:_MESSAGE_LIMIT]
        shown -= 1


def _matchup(matchup: Matchup) -> str:
    """Write ``a1b2 vs c3d4: 62% (95%: 55-69%), 120 decisive votes, 10 ties, 4 both bad``."""
    record = matchup.record
    head = f"{_revision(matchup.candidate)} vs {_revision(matchup.production)}: "
    tail = (
        f"{record.decisive:,} decisive vote{_s(record.decisive)}, {record.ties:,} tie{_s(record.ties)}, "
        f"{record.both_bad:,} both bad"
    )
    if record.rate is None or record.interval is None:
        return head + tail
    low, high = record.interval
    return head + f"**{record.rate:.0%}** (95%: {low:.0%}–{high:.0%}), " + tail


def _short_matchup(matchup: Matchup) -> str:
    record = matchup.record
    if record.rate is None or record.interval is None:
        return f"{_revision(matchup.candidate)} no decisive votes"
    low, high = record.interval
    return f"{_revision(matchup.candidate)} {record.rate:.0%} ({low:.0%}–{high:.0%}, {record.votes:,} votes)"


def _revision(revision: str) -> str:
    """Write a revision short and as code; a worker reports it, so no backtick of its own may end the code span."""
    name = short(revision).replace("`", "'")
    return f"`{name}`"


def _rated(item: Rated) -> str:
    """Write ``species:seal 75% 👍 (4 votes)``."""
    name = item.name if len(item.name) <= _NAME_LIMIT else item.name[: _NAME_LIMIT - 1] + "…"
    votes = item.approval.votes
    return f"{discord.utils.escape_markdown(name)} {item.approval.rate or 0:.0%} 👍 ({votes:,} vote{_s(votes)})"


def _images(count: int, *, bold: bool = True) -> str:
    number = f"**{count:,}**" if bold else f"{count:,}"
    return f"{number} image{_s(count)}"


def _votes(approval: Approval, *, bold: bool = False) -> str:
    """Write ``3 votes, 67% 👍``."""
    if approval.rate is None:
        return "no votes"
    count, rate = f"{approval.votes:,}", f"{approval.rate:.0%}"
    if bold:
        count, rate = f"**{count}**", f"**{rate}**"
    return f"{count} vote{_s(approval.votes)}, {rate} 👍"


def _s(count: float) -> str:
    return "" if count == 1 else "s"


async def setup(bot: SygilBot) -> None:
    await bot.add_cog(Stats(bot))
