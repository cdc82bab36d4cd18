"""The arena's vote buttons: Left, Right, Tie and Both bad, each a DynamicItem whose state is its custom_id."""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any, Self

import discord

from bot.arena import Choice, Reveal
from bot.client import answer_error, requester
from bot.errors import BotError

if TYPE_CHECKING:
    from bot.client import SygilBot

log = logging.getLogger(__name__)

_NO_PINGS = discord.AllowedMentions.none()
_LABELS = {
    Choice.LEFT: ("Left", "⬅️"),
    Choice.RIGHT: ("Right", "➡️"),
    Choice.TIE: ("Tie", "🤝"),
    Choice.BOTH_BAD: ("Both bad", "👎"),
}


class ArenaVoteButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=r"arena:vote:(?P<pair_id>[1-9][0-9]{0,17}):(?P<choice>left|right|tie|both_bad)",
):
    """Vote on a blind pair; the answer, private, reveals which revision made which image."""

    def __init__(self, pair_id: int, choice: Choice) -> None:
        label, emoji = _LABELS[choice]
        super().__init__(
            discord.ui.Button(
                label=label,
                emoji=emoji,
                style=discord.ButtonStyle.secondary,
                custom_id=f"arena:vote:{pair_id}:{choice.value}",
            )
        )
        self.pair_id = pair_id
        self.choice = choice

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[SygilBot], item: discord.ui.Button[Any], match: re.Match[str], /
    ) -> Self:
        return cls(int(match["pair_id"]), Choice(match["choice"]))

    async def callback(self, interaction: discord.Interaction[SygilBot]) -> None:  # type: ignore[override]
        # Errors raised in a DynamicItem never reach the tree's handler: answer them here.
        try:
            await vote(interaction, self.pair_id, self.choice)
        except BotError as exc:
            await answer_error(interaction, str(exc))
        except Exception:
            log.exception("Arena vote on pair %d failed", self.pair_id)
            await answer_error(interaction, "Something went wrong; it has been logged.")


DYNAMIC_ITEMS = (ArenaVoteButton,)


def pair_view(pair_id: int) -> discord.ui.View:
    """Return the four vote buttons under a pair."""
    # timeout=None and only dynamic items: a finite timeout would unregister the dynamic class (discord.py 2.7.1).
    view = discord.ui.View(timeout=None)
    for choice in Choice:
        view.add_item(ArenaVoteButton(pair_id, choice))
    return view


async def vote(interaction: discord.Interaction[SygilBot], pair_id: int, choice: Choice) -> None:
    """Record the member's vote (replacing theirs) and reveal the pair to them alone."""
    bot = interaction.client
    message_id = interaction.message.id if interaction.message is not None else None
    reveal = await bot.service.arena_vote(
        requester(interaction),
        pair_id=pair_id,
        message_id=message_id,
        choice=choice,
        max_votes_per_day=bot.config.arena.max_votes_per_day,
    )
    await interaction.response.send_message(reveal_text(reveal), ephemeral=True, allowed_mentions=_NO_PINGS)


def reveal_text(reveal: Reveal) -> str:
    """Say which revision made each image, and the pair's votes so far."""

    def side(name: str, revision: str) -> str:
        role = "production" if reveal.production_side == name else "candidate"
        shown = revision.replace("`", "'")
        return f"**{name.capitalize()}**: {role} `{shown}`"

    tally = reveal.tally
    lines = [
        f"You voted **{_LABELS[reveal.choice][0]}**.",
        side("left", reveal.left_revision),
        side("right", reveal.right_revision),
        f"Votes so far: ⬅️ {tally.left} · ➡️ {tally.right} · 🤝 {tally.tie} · 👎 {tally.both_bad}",
    ]
    if not reveal.counted:
        lines.append("-# You reached today's arena votes: this one is stored but not counted.")
    return "\n".join(lines)
