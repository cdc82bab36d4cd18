"""/mod: moderators change limits, the blocklist, channels, pauses, bans and jobs live; every change is audited.

The group is registered for members with Manage Server, and the bot checks again on every use (Discord's
setting can be changed by the server's admins): Manage Server, or a role listed in ``moderation.roles``. The
check is the cog's ``interaction_check``: discord.py 2.7.1 runs it for every app command bound to the cog,
those of nested groups (``/mod limits set``) included, whereas a group's own check skips its nested groups'.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.limits import Limits, Scope
from bot.moderation import ModerationError, Target, server_target
from cogs.moderation import _format

if TYPE_CHECKING:
    from bot.client import SygilBot

log = logging.getLogger(__name__)

_NO_PINGS = discord.AllowedMentions.none()
_Reason = app_commands.Range[str, 1, 300]
_Channel = discord.TextChannel | discord.Thread | discord.VoiceChannel


class NotModerator(app_commands.CheckFailure):
    """The member may not use /mod."""


async def _answer(interaction: discord.Interaction[SygilBot], text: str) -> None:
    await interaction.response.send_message(text, ephemeral=True, allowed_mentions=_NO_PINGS)


def _target(
    interaction: discord.Interaction[SygilBot], user: discord.Member | None, role: discord.Role | None
) -> Target:
    if user is not None and role is not None:
        raise ModerationError("Give a user or a role, not both (neither means the server default).")
    if user is not None:
        return Target(Scope.USER, user.id)
    if role is not None:
        return Target(Scope.ROLE, role.id)
    assert interaction.guild_id is not None  # the group is guild-only
    return server_target(interaction.guild_id)


def _guild(interaction: discord.Interaction[SygilBot]) -> int:
    assert interaction.guild_id is not None  # the group is guild-only
    return interaction.guild_id


class Moderation(commands.Cog):
    """Moderator commands: limits, blocklist, channels, pause, cancel, bans and the audit log."""

    mod = app_commands.Group(
        name="mod",
        description="Moderate the image bot: limits, blocklist, channels, pause, bans",
        guild_only=True,
        default_permissions=discord.Permissions(manage_guild=True),
    )
    limits = app_commands.Group(name="limits", description="Per-user, per-role and server-wide limits", parent=mod)
    blocklist = app_commands.Group(name="blocklist", description="Terms refused in prompts", parent=mod)
    channels = app_commands.Group(name="channels", description="Where the bot may be used", parent=mod)

    def __init__(self, bot: SygilBot) -> None:
        self.bot = bot
        self.moderation = bot.service.moderation

    async def interaction_check(self, interaction: discord.Interaction[SygilBot], /) -> bool:
        # Command._check_can_run calls this for each command whose binding is this cog, nested ones included.
        if not self.bot.is_moderator(interaction):
            raise NotModerator(
                "Only moderators can use /mod: you need the Manage Server permission or a moderator role. "
                "Nothing changed."
            )
        return True

    # Limits

    @limits.command(name="show")
    @app_commands.describe(user="Whose limits (leave both empty for the server default)", role="Which role's limits")
    async def limits_show(
        self,
        interaction: discord.Interaction[SygilBot],
        user: discord.Member | None = None,
        role: discord.Role | None = None,
    ) -> None:
        """Show the limits in force and where each comes from"""
        target = _target(interaction, user, role)
        guild_id = _guild(interaction)
        if user is not None:
            roles = [member_role.id for member_role in user.roles]
            resolved = self.moderation.limits(guild_id, user.id, roles)
            title = f"Limits in force for {user.mention}"
        elif role is not None:
            resolved = self.moderation.limits(guild_id, 0, [role.id])
            title = f"Limits in force for members with {role.mention} (and no other override)"
        else:
            resolved = self.moderation.limits(guild_id, 0)
            title = "Server default limits"
        text = _format.limits_in_force(title, resolved, user_id=user.id if user else None)
        await _answer(interaction, f"{text}\n{_format.override(target, self.moderation.override(guild_id, target))}")

    @limits.command(name="set")
    @app_commands.describe(
        user="Set them for this user",
        role="Set them for this role (members get the most generous of their roles)",
        images_per_hour="Images per rolling hour (512×512 at 25 steps; bigger or longer count more); 0 stops",
        max_queued="Jobs a user may have waiting or rendering at once",
        max_count="Most images in one request",
        max_steps="Most steps per image",
    )
    async def limits_set(
        self,
        interaction: discord.Interaction[SygilBot],
        user: discord.Member | None = None,
        role: discord.Role | None = None,
        images_per_hour: app_commands.Range[int, 0, 100_000] | None = None,
        max_queued: app_commands.Range[int, 1, 1000] | None = None,
        max_count: app_commands.Range[int, 1, 4] | None = None,
        max_steps: app_commands.Range[int, 1, 150] | None = None,
    ) -> None:
        """Set limits for a user, a role or (neither) the whole server"""
        target = _target(interaction, user, role)
        changes = Limits(
            images_per_hour=images_per_hour, max_queued=max_queued, max_count=max_count, max_steps=max_steps
        )
        old, new = await self.moderation.set_limits(_guild(interaction), interaction.user.id, target, changes)
        await _answer(interaction, _format.change(target, old, new))

    @limits.command(name="reset")
    @app_commands.describe(user="Remove this user's override", role="Remove this role's override")
    async def limits_reset(
        self,
        interaction: discord.Interaction[SygilBot],
        user: discord.Member | None = None,
        role: discord.Role | None = None,
    ) -> None:
        """Remove the limits set for a user or role, or restore the server default to the config's"""
        target = _target(interaction, user, role)
        old = await self.moderation.reset_limits(_guild(interaction), interaction.user.id, target)
        after = "the config's values apply" if target.scope is Scope.SERVER else "the next level applies"
        await _answer(interaction, f"Removed the limits set for {target.describe()} ({old}); {after}.")

    # Blocklist

    @blocklist.command(name="add")
    @app_commands.describe(term="A word or phrase refused in prompts, whatever its spelling tricks")
    async def blocklist_add(
        self, interaction: discord.Interaction[SygilBot], term: app_commands.Range[str, 1, 100]
    ) -> None:
        """Block a word or phrase in prompts"""
        added = await self.moderation.add_term(_guild(interaction), interaction.user.id, term)
        await _answer(interaction, f"Blocked {_format.spoiler(added)}; prompts using it are refused from now on.")

    @blocklist.command(name="remove")
    @app_commands.describe(term="The blocked word or phrase to allow again")
    async def blocklist_remove(
        self, interaction: discord.Interaction[SygilBot], term: app_commands.Range[str, 1, 100]
    ) -> None:
        """Allow a blocked word or phrase again"""
        removed = await self.moderation.remove_term(_guild(interaction), interaction.user.id, term)
        await _answer(interaction, f"Removed {_format.spoiler(removed)} from the blocklist.")

    @blocklist.command(name="list")
    async def blocklist_list(self, interaction: discord.Interaction[SygilBot]) -> None:
        """List the blocked terms (spoilered)"""
        rules = self.moderation.rules(_guild(interaction))
        await _answer(interaction, _format.terms(self.moderation.config_terms, rules.terms))

    # Channels

    @channels.command(name="allow")
    @app_commands.describe(channel="Allow the bot here; once any channel is allowed, only allowed ones work")
    async def channels_allow(self, interaction: discord.Interaction[SygilBot], channel: _Channel) -> None:
        """Allow the bot in a channel (then only allowed channels work)"""
        await self._channel(interaction, channel.id, "allow")

    @channels.command(name="deny")
    @app_commands.describe(channel="Never allow the bot here")
    async def channels_deny(self, interaction: discord.Interaction[SygilBot], channel: _Channel) -> None:
        """Deny the bot in a channel"""
        await self._channel(interaction, channel.id, "deny")

    @channels.command(name="clear")
    @app_commands.describe(channel="Remove this channel from the allowed and denied lists")
    async def channels_clear(self, interaction: discord.Interaction[SygilBot], channel: _Channel) -> None:
        """Remove a channel from both lists"""
        await self._channel(interaction, channel.id, None)

    @channels.command(name="list")
    async def channels_list(self, interaction: discord.Interaction[SygilBot]) -> None:
        """List the allowed and denied channels"""
        await _answer(interaction, _format.channels(self.moderation.rules(_guild(interaction))))

    async def _channel(self, interaction: discord.Interaction[SygilBot], channel_id: int, rule: str | None) -> None:
        old = await self.moderation.set_channel(_guild(interaction), interaction.user.id, channel_id, rule)
        done = {"allow": "allowed", "deny": "denied", None: "neither allowed nor denied"}[rule]
        await _answer(interaction, f"<#{channel_id}> is now {done} (it was {old or 'neither'}).")

    # The queue

    @mod.command(name="pause")
    @app_commands.describe(reason="Shown to everyone whose request is refused while paused")
    async def pause(self, interaction: discord.Interaction[SygilBot], reason: _Reason | None = None) -> None:
        """Pause the queue: nothing new renders or is accepted; queued jobs keep their place"""
        await self.moderation.pause(_guild(interaction), interaction.user.id, reason)
        await _answer(interaction, "Paused. Queued jobs keep their place; /mod resume starts them again.")

    @mod.command(name="arena")
    @app_commands.describe(state="on: pairs from /imagine compare:true and arena.rate; off: none in this server")
    async def arena(self, interaction: discord.Interaction[SygilBot], state: Literal["on", "off"]) -> None:
        """Turn the blind A/B arena between model revisions on or off in this server"""
        changed = await self.moderation.set_arena(_guild(interaction), interaction.user.id, state == "on")
        if not changed:
            await _answer(interaction, f"The arena is already {state} here; nothing changed.")
        elif state == "on":
            await _answer(interaction, "The arena is on: /imagine compare:true works, and arena.rate applies.")
        else:
            await _answer(interaction, "The arena is off: no blind comparisons are made in this server.")

    @mod.command(name="resume")
    async def resume(self, interaction: discord.Interaction[SygilBot]) -> None:
        """Resume the queue: queued jobs render in their order and new requests are accepted"""
        await self.moderation.resume(_guild(interaction), interaction.user.id)
        await _answer(interaction, "Resumed. Queued jobs render in their order.")

    @mod.command(name="cancel")
    @app_commands.describe(
        job="The job's number (shown under each result and in /queue)", reason="Told to its requester"
    )
    async def cancel(
        self,
        interaction: discord.Interaction[SygilBot],
        job: app_commands.Range[int, 1, 2**53],
        reason: _Reason | None = None,
    ) -> None:
        """Cancel a queued or rendering job; its requester is told"""
        cancelled = await self.bot.service.cancel(
            job_id=job, guild_id=interaction.guild_id, actor_id=interaction.user.id, moderator=True, reason=reason
        )
        await _answer(interaction, f"Cancelled job {job} of <@{cancelled.user_id}>; they have been told.")

    # Bans

    @mod.command(name="ban")
    @app_commands.describe(user="Who may no longer use the bot here", reason="Shown to them when they try")
    async def ban(
        self, interaction: discord.Interaction[SygilBot], user: discord.Member, reason: _Reason | None = None
    ) -> None:
        """Ban a member from using the bot in this server"""
        await self.moderation.ban(_guild(interaction), interaction.user.id, user.id, reason)
        await _answer(
            interaction, f"Banned {user.mention} from using the bot here; their requests and clicks are refused."
        )

    @mod.command(name="unban")
    @app_commands.describe(user="Who may use the bot again", reason="Why, for the audit log")
    async def unban(
        self, interaction: discord.Interaction[SygilBot], user: discord.Member, reason: _Reason | None = None
    ) -> None:
        """Let a banned member use the bot again"""
        await self.moderation.unban(_guild(interaction), interaction.user.id, user.id, reason)
        await _answer(interaction, f"{user.mention} may use the bot again.")

    # Audit

    @mod.command(name="audit")
    @app_commands.describe(count="How many of the latest changes (default 10)")
    async def audit(
        self, interaction: discord.Interaction[SygilBot], count: app_commands.Range[int, 1, 25] = 10
    ) -> None:
        """Show the latest changes moderators made: when, who, what, old → new, why"""
        entries = await self.moderation.audit_log(_guild(interaction), count)
        await _answer(interaction, _format.audit(entries))


async def setup(bot: SygilBot) -> None:
    await bot.add_cog(Moderation(bot))
