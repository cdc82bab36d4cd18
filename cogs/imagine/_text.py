"""The text of a result, of a job's status and of its details, and the names of its image files."""

from __future__ import annotations

from collections.abc import Sequence

import discord

from bot.config import VariationConfig
from bot.engine.types import Mode, RenderedImage
from bot.jobs import Job, JobKind
from bot.limits import describe_wait
from bot.storage import ImageRecord

_ECHO_LIMIT = 600


PREVIEW_FILENAME = "preview.jpg"  # the frame of the image forming in a status message


def filename(job_id: int, index: int) -> str:
    return f"sygil_{job_id}_{index}.png"


def _echo(text: str) -> str:
    text = discord.utils.escape_markdown(text)
    return text if len(text) <= _ECHO_LIMIT else text[: _ECHO_LIMIT - 1] + "…"


def result_text(
    job: Job, images: Sequence[RenderedImage], notes: Sequence[str] = (), variation: VariationConfig | None = None
) -> str:
    """Describe a finished job: the prompt echoed (it never pings: messages go out with no allowed mentions).

    ``variation`` names a variation's strength subtle or strong (the config's Vary strengths)."""
    settings = job.settings
    lines = [f"**{_echo(job.prompt)}**"]
    if job.negative_prompt:
        lines.append(f"Negative: {_echo(job.negative_prompt)}")
    if job.parent_index is not None:
        lines.append(f"{remix_name(job, variation)} of image {job.parent_index + 1} from job {job.parent_job_id}")
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


def remix_name(job: Job, variation: VariationConfig | None = None) -> str:
    """Name what a job made from its parent image: an upscale, a reroll, or a subtle or strong variation."""
    if job.kind is JobKind.UPSCALE:
        return "Upscale ×2"
    if job.kind is JobKind.VARIATION:
        strength = job.settings.strength
        variation = variation or VariationConfig()
        which = "Subtle variation" if strength == variation.subtle else "Strong variation"
        if strength not in (variation.subtle, variation.strong):
            which = "Variation"  # made under other strengths than today's config
        return f"{which} (strength {strength:g})"
    return "Reroll"


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
