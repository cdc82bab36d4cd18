"""The buttons on a result and what each does: every button is a DynamicItem whose state is its custom_id.

A click goes through the service (``bot.service``); a reroll, a variation or an upscale is a new job, which the delivery
(``bot.deliveries``) accepts and posts. Errors are answered here: those of a DynamicItem never reach the tree.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Self

import discord

from bot.client import answer_error, requester
from bot.errors import BotError, Refused
from bot.jobs import JobKind
from bot.service import NOT_ITS_MESSAGE
from bot.storage import VoteTally
from cogs.imagine._text import filename, info_text

if TYPE_CHECKING:
    from bot.client import SygilBot
    from bot.service import ImageService

log = logging.getLogger(__name__)

_ID = r"(?P<job_id>[1-9][0-9]{0,17}):(?P<index>[0-9])"
_VOTES = {"up": (1, "👍"), "down": (-1, "👎")}
_NO_PINGS = discord.AllowedMentions.none()


class Remix(enum.StrEnum):
    """What a remix button makes from one image; its value is the custom_id's action."""

    REROLL = "reroll"
    SUBTLE = "subtle"
    STRONG = "strong"
    UPSCALE = "upscale"
    VARIATION = "variation"  # the one Variation of results posted before Vary split in two: a subtle one


# Label on a one-image result, label on image n of several (n added), emoji.
_REMIXES = {
    Remix.REROLL: ("Reroll", "Reroll", "🔁"),
    Remix.SUBTLE: ("Vary (subtle)", "V{n}", "🎨"),
    Remix.STRONG: ("Vary (strong)", "V{n} strong", "🌀"),
    Remix.UPSCALE: ("Upscale", "U{n}", "🔍"),
    Remix.VARIATION: ("Variation", "Variation {n}", "🎨"),
}


async def _guarded(interaction: discord.Interaction[SygilBot], action: Callable[[], Awaitable[None]]) -> None:
    # Errors raised in a DynamicItem never reach the tree's handler: answer them here.
    try:
        await action()
    except BotError as exc:
        await answer_error(interaction, str(exc))
    except Exception:
        log.exception("Button %s failed", interaction.data and interaction.data.get("custom_id"))
        await answer_error(interaction, "Something went wrong; it has been logged.")


class RemixButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=rf"imagine:(?P<action>reroll|subtle|strong|upscale|variation):{_ID}",
):
    """Make a new image from one image: a reroll (new seed), a subtle or strong variation (img2img with a new seed)
    or an upscale x2 (img2img at twice the size, same seed)."""

    def __init__(self, job_id: int, index: int, action: Remix, *, count: int = 1, row: int | None = None) -> None:
        single, several, emoji = _REMIXES[action]
        super().__init__(
            discord.ui.Button(
                label=single if count == 1 else several.format(n=index + 1),
                emoji=emoji,
                style=discord.ButtonStyle.secondary,
                custom_id=f"imagine:{action.value}:{job_id}:{index}",
                row=row,
            )
        )
        self.job_id = job_id
        self.index = index
        self.action = action

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[SygilBot], item: discord.ui.Button[Any], match: re.Match[str], /
    ) -> Self:
        return cls(int(match["job_id"]), int(match["index"]), Remix(match["action"]))

    async def callback(self, interaction: discord.Interaction[SygilBot]) -> None:  # type: ignore[override]
        await _guarded(
            interaction, lambda: remix(interaction.client.service, interaction, self.job_id, self.index, self.action)
        )


class CancelButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]], template=r"imagine:cancel:(?P<job_id>[1-9][0-9]{0,17})"
):
    """Withdraw a job that waits or renders: for its requester and moderators only."""

    def __init__(self, job_id: int) -> None:
        super().__init__(
            discord.ui.Button(
                label="Cancel", emoji="✖️", style=discord.ButtonStyle.secondary, custom_id=f"imagine:cancel:{job_id}"
            )
        )
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[SygilBot], item: discord.ui.Button[Any], match: re.Match[str], /
    ) -> Self:
        return cls(int(match["job_id"]))

    async def callback(self, interaction: discord.Interaction[SygilBot]) -> None:  # type: ignore[override]
        await _guarded(interaction, lambda: cancel(interaction.client.service, interaction, self.job_id))


class VoteButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=rf"imagine:vote:{_ID}:(?P<vote>up|down)"):
    """Vote an image up or down; the same vote again withdraws it."""

    def __init__(
        self, job_id: int, index: int, vote: str, *, tally: VoteTally | None = None, row: int | None = None
    ) -> None:
        count = 0 if tally is None else (tally.up if vote == "up" else tally.down)
        super().__init__(
            discord.ui.Button(
                label=str(count) if count else None,
                emoji=_VOTES[vote][1],
                style=discord.ButtonStyle.secondary,
                custom_id=f"imagine:vote:{job_id}:{index}:{vote}",
                row=row,
            )
        )
        self.job_id = job_id
        self.index = index
        self.vote = vote

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[SygilBot], item: discord.ui.Button[Any], match: re.Match[str], /
    ) -> Self:
        return cls(int(match["job_id"]), int(match["index"]), match["vote"])

    async def callback(self, interaction: discord.Interaction[SygilBot]) -> None:  # type: ignore[override]
        await _guarded(
            interaction, lambda: vote(interaction.client.service, interaction, self.job_id, self.index, self.vote)
        )


_JOB_ACTIONS = {"info": ("Info", "ℹ️"), "delete": ("Delete", "🗑️")}


class JobButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=r"imagine:(?P<action>info|delete):(?P<job_id>[1-9][0-9]{0,17})",
):
    """Act on a whole result: Info (privately, what made its images) or Delete (its requester or a moderator)."""

    def __init__(self, job_id: int, action: str, *, row: int | None = None) -> None:
        label, emoji = _JOB_ACTIONS[action]
        super().__init__(
            discord.ui.Button(
                label=label,
                emoji=emoji,
                style=discord.ButtonStyle.secondary,
                custom_id=f"imagine:{action}:{job_id}",
                row=row,
            )
        )
        self.job_id = job_id
        self.action = action

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[SygilBot], item: discord.ui.Button[Any], match: re.Match[str], /
    ) -> Self:
        return cls(int(match["job_id"]), match["action"])

    async def callback(self, interaction: discord.Interaction[SygilBot]) -> None:  # type: ignore[override]
        action = info if self.action == "info" else delete
        await _guarded(interaction, lambda: action(interaction.client.service, interaction, self.job_id))


DYNAMIC_ITEMS = (RemixButton, VoteButton, CancelButton, JobButton)


def result_view(
    job_id: int, count: int, tallies: Sequence[VoteTally] | None = None, *, upscalable: bool = True
) -> discord.ui.View:
    """Return the buttons for a result, within Discord's five rows of five.

    One image: Reroll, Vary (subtle), Vary (strong), Upscale; then 👍, 👎, Info, Delete. Several: a row per image
    (U n, V n, V n strong, 👍, 👎), then Reroll (the same prompt and settings, new seeds), Info and Delete. An
    upscale (``upscalable`` false) has no Upscale button.
    """
    # timeout=None and only dynamic items: a finite timeout would unregister the dynamic classes (discord.py 2.7.1).
    view = discord.ui.View(timeout=None)
    remixes = [Remix.SUBTLE, Remix.STRONG, *([Remix.UPSCALE] if upscalable else [])]
    if count == 1:
        tally = tallies[0] if tallies else None
        for action in (Remix.REROLL, *remixes):
            view.add_item(RemixButton(job_id, 0, action, row=0))
        view.add_item(VoteButton(job_id, 0, "up", tally=tally, row=1))
        view.add_item(VoteButton(job_id, 0, "down", tally=tally, row=1))
        view.add_item(JobButton(job_id, "info", row=1))
        view.add_item(JobButton(job_id, "delete", row=1))
        return view
    if upscalable:  # U before V, as on the one-image row's right end
        remixes = [Remix.UPSCALE, Remix.SUBTLE, Remix.STRONG]
    for index in range(count):
        tally = tallies[index] if tallies else None
        for action in remixes:
            view.add_item(RemixButton(job_id, index, action, count=count, row=index))
        view.add_item(VoteButton(job_id, index, "up", tally=tally, row=index))
        view.add_item(VoteButton(job_id, index, "down", tally=tally, row=index))
    # Below the images' rows (at most four): what is done to the whole message.
    row = min(count, 4)
    view.add_item(RemixButton(job_id, 0, Remix.REROLL, row=row))
    view.add_item(JobButton(job_id, "info", row=row))
    view.add_item(JobButton(job_id, "delete", row=row))
    return view


def cancel_view(job_id: int) -> discord.ui.View:
    """Return the Cancel button shown while a job waits or renders."""
    view = discord.ui.View(timeout=None)  # only dynamic items, no timeout: see result_view
    view.add_item(CancelButton(job_id))
    return view


# What each button does


async def remix(
    service: ImageService, interaction: discord.Interaction[SygilBot], job_id: int, index: int, action: Remix
) -> None:
    """Queue a reroll, a variation or an upscale of one image; its result is posted as a reply to the image's
    message."""
    deliveries = interaction.client.deliveries
    if deliveries is None:
        raise BotError("Image generation is switched off right now.")
    asker = requester(interaction)
    service.check_access(asker)
    parent = await service.source(job_id=job_id, index=index, guild_id=interaction.guild_id)
    attachment = None if action is Remix.REROLL else _attachment(interaction.message, filename(job_id, index))
    if action is Remix.REROLL:
        admission = service.admit_remix(asker, kind=JobKind.REROLL, parent=parent, index=index)
    elif action is Remix.UPSCALE:
        admission = service.admit_upscale(asker, parent=parent, index=index)
    else:
        strength = service.variation.strong if action is Remix.STRONG else service.variation.subtle
        admission = service.admit_remix(asker, kind=JobKind.VARIATION, parent=parent, index=index, strength=strength)
    await deliveries.accept(interaction, admission, attachment=attachment, private=True)


async def vote(
    service: ImageService, interaction: discord.Interaction[SygilBot], job_id: int, index: int, choice: str
) -> None:
    """Record a vote (``up`` or ``down``) on an image, show the new counts on the buttons, tell the voter."""
    tallies = await service.vote(requester(interaction), job_id=job_id, index=index, vote=_VOTES[choice][0])
    mine = tallies[index].mine
    if mine:
        note = f"Your {'👍' if mine > 0 else '👎'} on image {index + 1} is recorded."
    else:
        note = f"Your vote on image {index + 1} is withdrawn."
    if not _shows(interaction.message, job_id):
        # A forged custom_id names another job: its buttons must not replace this message's.
        await interaction.response.send_message(note, ephemeral=True)
        return
    job = await service.job(job_id=job_id)
    upscalable = job is None or job.kind is not JobKind.UPSCALE
    await interaction.response.edit_message(view=result_view(job_id, len(tallies), tallies, upscalable=upscalable))
    await interaction.followup.send(note, ephemeral=True)


async def cancel(service: ImageService, interaction: discord.Interaction[SygilBot], job_id: int) -> None:
    """Withdraw a job from its Cancel button: its requester's or a moderator's click."""
    asker = requester(interaction)
    banned, _ = service.moderation.ban_reason(asker.guild_id, asker.user_id)
    if banned:
        service.check_access(asker)  # raises the ban's message
    await service.cancel(
        job_id=job_id,
        guild_id=interaction.guild_id,
        actor_id=interaction.user.id,
        moderator=interaction.client.is_moderator(interaction),
    )
    await interaction.response.send_message(f"Job {job_id} is cancelled.", ephemeral=True)


async def info(service: ImageService, interaction: discord.Interaction[SygilBot], job_id: int) -> None:
    """Show privately everything that made a result's images."""
    job, images, tags = await service.details(job_id=job_id, guild_id=interaction.guild_id)
    await interaction.response.send_message(info_text(job, images, tags), ephemeral=True, allowed_mentions=_NO_PINGS)


async def delete(service: ImageService, interaction: discord.Interaction[SygilBot], job_id: int) -> None:
    """Delete a result's message for its requester or a moderator: only the job's own message, whatever job the
    custom_id names."""
    message = interaction.message
    # The service compares the message with the one recorded for the job; until that is recorded (just after the
    # post), the message's own images say whose it is.
    if message is None or not _shows(message, job_id):
        raise Refused(NOT_ITS_MESSAGE)
    job = await service.delete(
        job_id=job_id,
        guild_id=interaction.guild_id,
        actor_id=interaction.user.id,
        moderator=interaction.client.is_moderator(interaction),
        message_id=message.id,
    )
    await interaction.response.send_message(f"The images of job {job.id} are deleted.", ephemeral=True)
    try:
        await message.delete()
    except discord.HTTPException as exc:
        log.warning("Could not delete the message of job %d: %s", job.id, exc)


def _shows(message: discord.Message | None, job_id: int) -> bool:
    """Return whether a message shows a job's images (their file names hold the job's id)."""
    return message is not None and any(attachment.filename == filename(job_id, 0) for attachment in message.attachments)


def _attachment(message: discord.Message | None, name: str) -> discord.Attachment:
    for attachment in message.attachments if message else ():
        if attachment.filename == name:
            return attachment
    raise BotError("That image is no longer attached to the message, so I cannot start from it.")
