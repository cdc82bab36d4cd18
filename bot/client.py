"""SygilBot: the discord.py client, its command tree with the one error handler, and extension loading."""

from __future__ import annotations

import logging

import discord
import discord.gateway
import discord.http
import yarl
from discord import app_commands
from discord.ext import commands

from bot.config import Config, DiscordConfig
from bot.errors import BotError
from bot.service import ImageService

log = logging.getLogger(__name__)

EXTENSIONS = ("cogs.imagine",)


def use_endpoints(config: DiscordConfig) -> None:
    """Point discord.py's REST and gateway clients at the configured server (Discord itself by default)."""
    # Both are process-wide in discord.py; the webhook adapter (interaction followups) builds on Route.BASE too.
    discord.http.Route.BASE = config.api_base_url.rstrip("/")
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(config.gateway_url)


class Tree(app_commands.CommandTree["SygilBot"]):
    """The command tree; its ``on_error`` is the one place command errors are answered."""

    async def on_error(self, interaction: discord.Interaction[SygilBot], error: app_commands.AppCommandError) -> None:
        original = getattr(error, "original", error)
        if isinstance(original, BotError) or isinstance(error, app_commands.CheckFailure):
            message = str(original)
        else:
            log.error(
                "Unhandled error in /%s", interaction.command and interaction.command.qualified_name, exc_info=original
            )
            message = "Something went wrong; it has been logged."
        await answer_error(interaction, message)


async def answer_error(interaction: discord.Interaction[SygilBot], message: str) -> None:
    """Tell the user what went wrong: privately if nothing was sent yet, else in place of the "thinking" message."""
    none = discord.AllowedMentions.none()
    if not interaction.response.is_done():
        await interaction.response.send_message(message, ephemeral=True, allowed_mentions=none)
    elif interaction.response.type is discord.InteractionResponseType.deferred_channel_message:
        # The first followup after a deferral would take the place of the public "thinking" message anyway.
        await interaction.edit_original_response(content=f"❌ {message}", allowed_mentions=none)
    else:
        await interaction.followup.send(message, ephemeral=True, allowed_mentions=none)


class SygilBot(commands.Bot):
    """The bot: holds the config and the core services, loads the cogs, syncs the commands."""

    def __init__(self, *, config: Config, service: ImageService) -> None:
        use_endpoints(config.discord)
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=discord.Intents(guilds=True),
            tree_cls=Tree,
            allowed_mentions=discord.AllowedMentions.none(),
            guild_ready_timeout=config.discord.guild_ready_timeout,
            help_command=None,
        )
        self.config = config
        self.service = service
        self.db = service.db

    async def setup_hook(self) -> None:
        for extension in EXTENSIONS:
            await self.load_extension(extension)
        await self.sync_commands()

    async def sync_commands(self) -> None:
        """Register the slash commands in the configured guilds (at once), or globally when none are set."""
        guild_ids = self.config.discord.guild_ids
        if not guild_ids:
            synced = await self.tree.sync()
            log.info("Synced %d global commands", len(synced))
            return
        for guild_id in guild_ids:
            guild = discord.Object(id=guild_id)
            self.tree.copy_global_to(guild=guild)
            synced = await self.tree.sync(guild=guild)
            log.info("Synced %d commands to guild %d", len(synced), guild_id)

    async def on_ready(self) -> None:
        assert self.user is not None
        log.info("Logged in as %s (%d) in %d guilds", self.user, self.user.id, len(self.guilds))
