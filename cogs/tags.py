"""/tags: the namespaces users steer the model with, and the tags of each."""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.prompts.guide import NamespaceGuide, complete_namespace, guide, guides
from bot.prompts.vocabulary import Vocabulary

if TYPE_CHECKING:
    from bot.client import SygilBot

MAX_MESSAGE = 2000  # Discord's limit on a message's content
_NO_PINGS = discord.AllowedMentions.none()
_OVERVIEW_TAGS = 5  # at most, per namespace; fewer when the overview would not fit in one message
_CHOICE_NAME = 100


class Tags(commands.Cog):
    """A guide to the tag language, from the autocomplete vocabulary."""

    def __init__(self, bot: SygilBot) -> None:
        self.bot = bot
        self.vocabulary = Vocabulary.load()

    @app_commands.command(name="tags")
    @app_commands.describe(namespace="A namespace, e.g. species: list its tags, most used first")
    async def tags(self, interaction: discord.Interaction[SygilBot], namespace: str | None = None) -> None:
        """List the namespaces prompts are written with, or the tags of one"""
        if namespace is None:
            content = overview(guides(self.vocabulary))
        else:
            content = listing(guide(self.vocabulary, namespace))
        await interaction.response.send_message(content, ephemeral=True, allowed_mentions=_NO_PINGS)

    @tags.autocomplete("namespace")
    async def complete_namespace(
        self, interaction: discord.Interaction[SygilBot], current: str
    ) -> list[app_commands.Choice[str]]:
        """Suggest the namespaces that start with what is typed."""
        choices = []
        for found in map(self._guide, complete_namespace(current)):
            name = f"{found.name}: {found.description}".replace("`", "")
            if len(name) > _CHOICE_NAME:
                name = name[: _CHOICE_NAME - 1] + "…"
            choices.append(app_commands.Choice(name=name, value=found.name))
        return choices

    def _guide(self, name: str) -> NamespaceGuide:
        return guide(self.vocabulary, name)


def overview(namespaces: list[NamespaceGuide]) -> str:
    """Describe every namespace with a few of its most used tags, as many as one message holds."""
    for count in range(_OVERVIEW_TAGS, 0, -1):
        content = _overview(namespaces, count)
        if len(content) <= MAX_MESSAGE:
            return content
    content = _overview(namespaces, 0)
    return content if len(content) <= MAX_MESSAGE else content[: MAX_MESSAGE - 1] + "…"


def _overview(namespaces: list[NamespaceGuide], count: int) -> str:
    lines = [
        "**Namespaces** steer Sygil Diffusion: write `namespace:tag`, items separated by commas, "
        "e.g. `a photo, species:seal, studio:dc`. Most used tags first:"
    ]
    for found in namespaces:
        line = f"• `{found.name}:` {found.description}"
        if count and found.tags:
            line += " — " + discord.utils.escape_markdown(", ".join(found.tags[:count]))
        lines.append(line)
    lines.append("`/tags namespace:species` lists a namespace's tags; `/imagine` autocompletes them as you type.")
    return "\n".join(lines)


def listing(found: NamespaceGuide) -> str:
    """List as many of a namespace's tags as one message holds, most used first, and say how many are left."""
    total = len(found.tags)
    head = f"**`{found.name}:`** {found.description}.\n"
    if not total:
        return head + "The autocomplete vocabulary has no tags of it yet; any tag you write is still read."
    head += f"{total} tag{'' if total == 1 else 's'} known to the autocomplete, most used first:\n"
    shown: list[str] = []
    length = len(head)
    for tag in found.tags:
        text = discord.utils.escape_markdown(tag)
        left = total - len(shown) - 1
        if length + len(", " if shown else "") + len(text) + len(_more(found.name, left)) > MAX_MESSAGE:
            break
        length += len(", " if shown else "") + len(text)
        shown.append(text)
    return head + ", ".join(shown) + _more(found.name, total - len(shown))


def _more(namespace: str, left: int) -> str:
    if not left:
        return ""
    return f"\n…and {left} more: type `{namespace}:` and a few letters in `/imagine` to find them."


async def setup(bot: SygilBot) -> None:
    await bot.add_cog(Tags(bot))
