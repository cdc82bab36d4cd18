"""/imagine: validate a request, take its place in the queue, and hand it to the delivery; tag autocomplete.

The rest of the extension: ``delivery.py`` (status, posting and restoring of jobs), ``buttons.py`` (the buttons
on a result and what each does), ``_text.py`` (what the messages say).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.admission import MAX_SEED
from bot.client import requester
from bot.config import GenerationConfig
from bot.errors import BotError
from bot.prompts import SAFE_RATINGS
from bot.prompts.vocabulary import Vocabulary
from cogs.imagine.buttons import DYNAMIC_ITEMS
from cogs.imagine.delivery import Deliveries

if TYPE_CHECKING:
    from bot.client import SygilBot
    from cogs.arena import Arena

log = logging.getLogger(__name__)


class Imagine(commands.Cog):
    """/imagine and its tag autocomplete; registers the result buttons and the delivery while loaded."""

    def __init__(self, bot: SygilBot) -> None:
        self.bot = bot
        self.service = bot.service
        self.deliveries = Deliveries(bot)
        self.vocabulary = Vocabulary.load()
        self._command = _imagine_command(self, bot.config.generation)

    async def cog_load(self) -> None:
        self.bot.add_dynamic_items(*DYNAMIC_ITEMS)
        self.bot.tree.add_command(self._command)
        self.bot.deliveries = self.deliveries
        await self.deliveries.restore()

    async def cog_unload(self) -> None:
        self.bot.remove_dynamic_items(*DYNAMIC_ITEMS)
        self.bot.tree.remove_command(self._command.name)
        self.bot.deliveries = None
        await self.deliveries.stop()

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
        compare: bool = False,
    ) -> None:
        # Every check that can refuse runs, and the place is taken, before the first await: refusals stay private.
        asker = requester(interaction)
        arena: Arena | None = self.bot.get_cog("Arena")  # pyright: ignore[reportAssignmentType]
        revision = None
        if compare:
            if arena is None:
                raise BotError("The arena is switched off right now, so there is nothing to compare.")
            revision = self.service.arena_candidate(asker.guild_id)
            count = 1  # a pair is one image from each model
        elif count == 1 and arena is not None and random.random() < self.bot.config.arena.rate:
            try:
                revision = self.service.arena_candidate(asker.guild_id)
            except BotError:
                revision = None  # no arena here: an ordinary request
        admission = self.service.admit(
            asker,
            prompt=prompt,
            negative=negative,
            seed=seed,
            steps=steps,
            guidance=guidance,
            size=size,
            count=count,
        )
        if arena is not None and revision is not None:
            try:
                candidate = self.service.admit_candidate(asker, admission)
            except BotError:
                if compare:
                    self.service.release(admission)
                    raise
            else:
                await arena.accept(interaction, admission, candidate, revision=revision)
                return
        await self.deliveries.accept(interaction, admission)

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


def _mature_rating(item: str) -> bool:
    namespace, _, tag = item.strip().lstrip("(").partition(":")
    return namespace == "rating" and tag not in SAFE_RATINGS


def _age_restricted(interaction: discord.Interaction[SygilBot]) -> bool:
    channel = interaction.channel
    return bool(channel is not None and getattr(channel, "nsfw", False))


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
        compare: bool = False,
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
            compare=compare,
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
        "compare": bool,
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
        compare="Render one image with the model in production and one with a candidate, shown blind, to vote on",
    )(callback)
    return app_commands.Command(name="imagine", description="Generate images with Sygil Diffusion", callback=callback)


async def setup(bot: SygilBot) -> None:
    await bot.add_cog(Imagine(bot))
