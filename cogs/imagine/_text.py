"""The buttons on a result and the text around it; every button is a DynamicItem whose state is its custom_id."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Self

import discord

from bot.client import answer_error
from bot.engine.types import Mode, RenderedImage
from bot.errors import BotError
from bot.limits import describe_wait
from bot.storage import ImageRecord, Job, JobKind, VoteTally

if TYPE_CHECKING:
    from bot.client import SygilBot
    from cogs.imagine import Imagine

log = logging.getLogger(__name__)

_ID = r"(?P<job_id>[1-9][0-9]{0,17}):(?P<index>[0-9])"
_ECHO_LIMIT = 600
_VOTES = {"up": (1, "👍"), "down": (-1, "👎")}
_REMIXES = {JobKind.REROLL: ("Reroll", "🔁"), JobKind.VARIATION: ("Variation", "🎨")}


def _row(index: int) -> int | None:
    # A forged custom_id may carry any digit; only real buttons (at most 4 images) are laid out by row.
    return index if index < 5 else None


def filename(job_id: int, index: int) -> str:
    return f"sygil_{job_id}_{index}.png"


async def _guarded(interaction: discord.Interaction[SygilBot], action: Callable[[], Awaitable[None]]) -> None:
    # Errors raised in a DynamicItem never reach the tree's handler: answer them here.
    try:
        await action()
    except BotError as exc:
        await answer_error(interaction, str(exc))
    except Exception:
        log.exception("Button %s failed", interaction.data and interaction.data.get("custom_id"))
        await answer_error(interaction, "Something went wrong; it has been logged.")


def _cog(interaction: discord.Interaction[SygilBot]) -> Imagine:
    cog = interaction.client.get_cog("Imagine")
    if cog is None:
        raise BotError("Image generation is switched off right now.")
    return cog  # type: ignore[return-value]


class RemixButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]], template=rf"imagine:(?P<action>reroll|variation):{_ID}"
):
    """Make a new image from one image: a reroll (new seed) or a variation (img2img with a new seed)."""

    def __init__(self, job_id: int, index: int, kind: JobKind, *, count: int = 1) -> None:
        if kind not in _REMIXES:
            raise ValueError(f"a remix button is a reroll or a variation, not {kind}")
        label, emoji = _REMIXES[kind]
        super().__init__(
            discord.ui.Button(
                label=f"{label} {index + 1}" if count > 1 else label,
                emoji=emoji,
                style=discord.ButtonStyle.secondary,
                custom_id=f"imagine:{kind.value}:{job_id}:{index}",
                row=_row(index),
            )
        )
        self.job_id = job_id
        self.index = index
        self.kind = kind

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[SygilBot], item: discord.ui.Button[Any], match: re.Match[str], /
    ) -> Self:
        return cls(int(match["job_id"]), int(match["index"]), JobKind(match["action"]))

    async def callback(self, interaction: discord.Interaction[SygilBot]) -> None:  # type: ignore[override]
        await _guarded(interaction, lambda: _cog(interaction).remix(interaction, self.job_id, self.index, self.kind))


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
        await _guarded(interaction, lambda: _cog(interaction).cancel(interaction, self.job_id))


class VoteButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=rf"imagine:vote:{_ID}:(?P<vote>up|down)"):
    """Vote an image up or down; the same vote again withdraws it."""

    def __init__(self, job_id: int, index: int, vote: str, *, tally: VoteTally | None = None) -> None:
        count = 0 if tally is None else (tally.up if vote == "up" else tally.down)
        super().__init__(
            discord.ui.Button(
                label=str(count) if count else None,
                emoji=_VOTES[vote][1],
                style=discord.ButtonStyle.secondary,
                custom_id=f"imagine:vote:{job_id}:{index}:{vote}",
                row=_row(index),
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
        await _guarded(interaction, lambda: _cog(interaction).vote(interaction, self.job_id, self.index, self.vote))


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
        cog = _cog(interaction)
        action = cog.info if self.action == "info" else cog.delete
        await _guarded(interaction, lambda: action(interaction, self.job_id))


DYNAMIC_ITEMS = (RemixButton, VoteButton, CancelButton, JobButton)


def vote_value(vote: str) -> int:
    return _VOTES[vote][0]


def result_view(job_id: int, count: int, tallies: Sequence[VoteTally] | None = None) -> discord.ui.View:
    """Return the buttons for a result: one row per image."""
    # timeout=None and only dynamic items: a finite timeout would unregister the dynamic classes (discord.py 2.7.1).
    view = discord.ui.View(timeout=None)
    for index in range(count):
        tally = tallies[index] if tallies else None
        view.add_item(RemixButton(job_id, index, JobKind.REROLL, count=count))
        view.add_item(RemixButton(job_id, index, JobKind.VARIATION, count=count))
        view.add_item(VoteButton(job_id, index, "up", tally=tally))
        view.add_item(VoteButton(job_id, index, "down", tally=tally))
    # Below the images' rows (at most four): what is done to the whole message.
    row = min(count, 4)
    view.add_item(JobButton(job_id, "info", row=row))
    view.add_item(JobButton(job_id, "delete", row=row))
    return view


def cancel_view(job_id: int) -> discord.ui.View:
    """Return the Cancel button shown while a job waits or renders."""
    view = discord.ui.View(timeout=None)  # only dynamic items, no timeout: see result_view
    view.add_item(CancelButton(job_id))
    return view


def _echo(text: str) -> str:
    text = discord.utils.escape_markdown(text)
    return text if len(text) <= _ECHO_LIMIT else text[: _ECHO_LIMIT - 1] + "…"


def result_text(job: Job, images: Sequence[RenderedImage], notes: Sequence[str] = ()) -> str:
    """Describe a finished job: the prompt echoed (it never pings: messages go out with no allowed mentions)."""
    settings = job.settings
    lines = [f"**{_echo(job.prompt)}**"]
    if job.negative_prompt:
        lines.append(f"Negative: {_echo(job.negative_prompt)}")
    if job.kind is JobKind.REROLL and job.parent_index is not None:
        lines.append(f"Reroll of image {job.parent_index + 1} from job {job.parent_job_id}")
    elif job.kind is JobKind.VARIATION and job.parent_index is not None:
        lines.append(f"Variation of image {job.parent_index + 1} from job {job.parent_job_id}")
    seeds = ", ".join(str(image.seed) for image in images)
    details = [
        f"<@{job.user_id}>",
        f"seed{'s' if len(images) > 1 else ''} {seeds}",
        f"{settings.steps} steps",
        f"guidance {settings.guidance:g}",
        f"{settings.width}×{settings.height}",
        job.scheduler,
    ]
    if settings.mode is Mode.IMG2IMG:
        details.append(f"strength {settings.strength:g}")
    details.append(f"job {job.id}")
    lines.append("-# " + " · ".join(details))
    withheld = [str(index + 1) for index, image in enumerate(images) if image.nsfw]
    if withheld:
        lines.append(f"⚠️ The safety checker withheld image {', '.join(withheld)}.")
    lines.extend(f"ℹ️ {note}" for note in notes)
    return "\n".join(lines)[:2000]


def _place(position: int) -> str:
    """Say a place in line; far back only roughly, so a long queue's messages are not edited at every move."""
    if position <= 20:
        return f"position {position}"
    step = 10 if position <= 100 else 50
    return f"about position {max(step, round(position / step) * step)}"


def status_interval(position: int | None) -> float:
    """Return the seconds until a job's status message is refreshed: often near the front, rarely far back."""
    if position is None or position <= 10:
        return 2.0
    return 10.0 if position <= 100 else 30.0


def status_text(
    position: int | None,
    step: int,
    total_steps: int,
    notes: Sequence[str] = (),
    *,
    eta: float | None = None,
    paused: str | None = None,
) -> str:
    """Describe where a job is: waiting (place in line, estimate, pause) or rendering (with its step)."""
    if position is None or position == 0:
        text = f"🎨 Rendering… step {step}/{total_steps}" if total_steps else "🎨 Rendering…"
    else:
        text = "⏳ Queued: you are next in line." if position == 1 else f"⏳ Queued: {_place(position)} in line."
        if paused is not None:
            text += f"\n⏸️ {paused} Your job keeps its place."
        elif eta is not None:
            text += f" Ready in about {describe_wait(eta)}."
    return "\n".join([text, *(f"ℹ️ {note}" for note in notes)])[:2000]


def info_text(job: Job, images: Sequence[ImageRecord], tags: Sequence[tuple[str, str]]) -> str:
    """Describe privately everything that made a result: prompt, tags, settings, model revision, batch, timings."""
    settings = job.settings
    lines = [f"**Prompt:** {_echo(job.prompt)}"]
    lines.append(f"**Negative prompt:** {_echo(job.negative_prompt) if job.negative_prompt else '(none)'}")
    lines.append(f"**Tags:** {', '.join(f'{namespace}:{tag}' for namespace, tag in tags) if tags else '(none)'}")
    size = f"{settings.width}×{settings.height}"
    line = f"**Settings:** {settings.steps} steps, guidance {settings.guidance:g}, {size}, {job.scheduler}"
    if settings.mode is Mode.IMG2IMG:
        line += f", img2img strength {settings.strength:g}"
    lines.append(line)
    made = next((image.provenance for image in images if image.provenance is not None), None)
    revision = made.model_revision if made and made.model_revision else "not recorded"
    lines.append(f"**Model:** {_echo(job.model)} · revision `{revision}`")
    if made is not None:
        engine = f"{made.dtype or 'unknown dtype'}, {'compiled' if made.compiled else 'eager'}"
        lines.append(f"**Engine:** {engine}")
    if job.parent_job_id is not None and job.parent_index is not None:
        lines.append(f"**Parent:** image {job.parent_index + 1} of job {job.parent_job_id} ({job.kind.value})")
    for image in images:
        how = image.provenance
        text = f"Image {image.index + 1}: seed `{image.seed}`"
        if how is not None:
            text += (
                f" · batch {how.batch_id} of {how.batch_size} · waited {how.waited_s:.1f} s · "
                f"rendered {how.rendered_s:.1f} s"
            )
        if image.nsfw:
            text += " · withheld by the safety checker"
        lines.append(text)
    lines.append(f"-# job {job.id}")
    return "\n".join(lines)[:2000]
