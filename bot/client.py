"""SygilBot: the discord.py client, its command tree with the one error handler, and extension loading."""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import discord
import discord.gateway
import discord.http
import yarl
from discord import app_commands
from discord.ext import commands

from bot.admission import Admission, Requester
from bot.cluster.pool import ClusterPool
from bot.config import Config, DiscordConfig
from bot.engine.process import WorkerProcess
from bot.errors import BotError
from bot.health import Health
from bot.service import ImageService

log = logging.getLogger(__name__)

EXTENSIONS = ("cogs.arena", "cogs.imagine", "cogs.moderation", "cogs.stats", "cogs.tags")
_CLOSE_MARGIN = 5.0  # seconds of the shutdown grace kept for closing the connection, the queue and the database


def use_endpoints(config: DiscordConfig) -> None:
    """Point discord.py's REST and gateway clients at the configured server (Discord itself by default)."""
    # Both are process-wide in discord.py; the webhook adapter (interaction followups) builds on Route.BASE too.
    discord.http.Route.BASE = config.api_base_url.rstrip("/")
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(config.gateway_url)


async def check_token(config: Config) -> None:
    """Log in to Discord once (GET /users/@me, as ``Client.login`` does); raise discord.LoginFailure if refused."""
    use_endpoints(config.discord)
    # The HTTP client alone: a whole Client would log its voice and intent notices a second time.
    http = discord.http.HTTPClient(asyncio.get_running_loop())
    try:
        await http.static_login(config.token)
    except discord.HTTPException as exc:  # anything but 401, which is LoginFailure
        raise BotError(f"Discord did not let the bot log in: {exc}") from None
    finally:
        await http.close()


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
    """Tell the user what went wrong, privately, also after a public "thinking" deferral (which is removed)."""
    none = discord.AllowedMentions.none()
    if not interaction.response.is_done():
        await interaction.response.send_message(message, ephemeral=True, allowed_mentions=none)
        return
    if interaction.response.type is discord.InteractionResponseType.deferred_channel_message:
        # The first followup after a deferral would take the place of the public "thinking" message and be public
        # too: remove that message first, so the error is seen by its user alone.
        try:
            await interaction.delete_original_response()
        except discord.HTTPException as exc:
            log.warning("Could not remove the thinking message of a failed interaction: %s", exc)
    await interaction.followup.send(message, ephemeral=True, allowed_mentions=none)


def requester(interaction: discord.Interaction[SygilBot]) -> Requester:
    """Read who asks, and where, off an interaction."""
    if interaction.channel_id is None:
        raise BotError("This works only in a channel.")
    channel = interaction.channel
    user = interaction.user
    roles = tuple(role.id for role in user.roles) if isinstance(user, discord.Member) else ()
    return Requester(
        user_id=user.id,
        guild_id=interaction.guild_id,
        channel_id=interaction.channel_id,
        parent_channel_id=getattr(channel, "parent_id", None),
        role_ids=roles,
        age_restricted=bool(channel is not None and getattr(channel, "nsfw", False)),
    )


class Delivery(Protocol):
    """What the bot and the buttons ask of the delivery of results (``Deliveries`` in cogs/imagine/delivery.py)."""

    async def accept(
        self,
        interaction: discord.Interaction[SygilBot],
        admission: Admission,
        *,
        attachment: discord.Attachment | None = None,
        private: bool = False,
    ) -> None:
        """Store an admitted job, answer its interaction, and deliver its images when they are ready."""
        ...

    async def settle(self) -> None:
        """Wait for the deliveries whose images are ready (the bot is stopping and wants them posted first)."""
        ...


class SygilBot(commands.Bot):
    """The bot: holds the config and the core services, loads the cogs, syncs the commands."""

    def __init__(self, *, config: Config, service: ImageService) -> None:
        use_endpoints(config.discord)
        # The bot never joins a voice channel: discord.py's warnings that voice's libraries (PyNaCl, davey) are
        # missing would only be noise in its log.
        discord.VoiceClient.warn_nacl = False
        discord.VoiceClient.warn_dave = False
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
        self.deliveries: Delivery | None = None  # set by the Imagine extension while it is loaded

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

    def is_moderator(self, interaction: discord.Interaction[SygilBot]) -> bool:
        """Return whether the member may moderate: Manage Server, or a role listed in ``moderation.roles``."""
        if interaction.guild_id is None or not isinstance(interaction.user, discord.Member):
            return False
        if interaction.permissions.manage_guild:
            return True
        wanted = self.config.moderation.roles
        ids = {role for role in wanted if isinstance(role, int)}
        names = {role.casefold() for role in wanted if isinstance(role, str)}
        return any(role.id in ids or role.name.casefold() in names for role in interaction.user.roles)

    async def shut_down(self, grace: float) -> None:
        """Stop accepting, let the batch on the GPU finish and its images be posted, then close, within ``grace``.

        A batch that would take longer is stopped; its jobs, like every waiting one, stay queued in the database
        and run after the next start.
        """
        log.info("Shutting down: no new jobs; finishing the batch on the GPU (up to %.0f s)", grace)
        self.service.accepting = False
        scheduler = self.service.scheduler
        scheduler.drain()
        try:
            async with asyncio.timeout(max(grace - _CLOSE_MARGIN, grace / 2)):
                await scheduler.wait_idle()
                if self.deliveries is not None:
                    await self.deliveries.settle()
        except TimeoutError:
            log.warning("The batch on the GPU did not finish in time; it stays queued for the next start")
            scheduler.stop_rendering()
        log.info("Closing; unfinished jobs stay queued for the next start")
        await self.close()

    async def close(self) -> None:
        # discord.py 2.7.1 leaves running the task that waits guild_ready_timeout before dispatching READY; closed
        # within that wait (a SIGTERM just after login), the client later dispatches on a closed loop and logs a
        # traceback. Nothing needs READY once closing.
        ready = self._connection._ready_task  # pyright: ignore[reportPrivateUsage]
        if ready is not None:
            ready.cancel()
        await super().close()

    def health(self) -> Health:
        """Say whether the bot serves: connected to the Discord gateway, its GPU workers (or the broker) up."""
        if self.is_closed() or not self.is_ready() or self.ws is None or not self.ws.open:
            return Health(False, "not connected to the Discord gateway")
        workers = self.service.scheduler.workers
        processes = [worker for worker in workers if isinstance(worker, WorkerProcess)]
        down = [process.name for process in processes if not process.alive]
        if down:
            return Health(False, f"connected to Discord, but worker {', '.join(down)} is down (restarting)")
        notes = ["connected to Discord"]
        if processes:
            notes.append(f"workers up: {', '.join(process.name for process in processes)}")
        for pool in (worker for worker in workers if isinstance(worker, ClusterPool)):
            if not pool.up:
                return Health(False, "connected to Discord, but the cluster's broker (Redis) does not answer")
            notes.append(f"the broker answers; {pool.parallel} remote workers serve")
        return Health(True, "; ".join(notes))

    async def on_ready(self) -> None:
        assert self.user is not None
        log.info("Logged in as %s (%d) in %d guilds", self.user, self.user.id, len(self.guilds))
