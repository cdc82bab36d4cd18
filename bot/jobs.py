"""What a job is: its kind, its status, the interaction it answers and the stored request that can render again."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from bot.engine.types import Settings


class JobKind(enum.StrEnum):
    IMAGINE = "imagine"
    REROLL = "reroll"
    VARIATION = "variation"  # img2img from one image at a Vary strength (subtle or strong), new seed
    UPSCALE = "upscale"  # img2img from one image at twice its width and height, same seed (hires fix)


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class Reply:
    """The interaction a job answers: its token lives 15 minutes from ``at``; ``message_id`` shows the job.

    The job is stored before the interaction is acknowledged, so the message's id comes a moment later (and is
    None if the bot died in between: the job is then posted to its channel).
    """

    token: str
    message_id: int | None
    at: float


@dataclass(frozen=True, slots=True)
class Job:
    """A stored request and everything needed to render it again."""

    id: int
    kind: JobKind
    user_id: int
    guild_id: int | None
    channel_id: int
    prompt: str
    negative_prompt: str
    seed: int
    count: int
    settings: Settings
    model: str
    scheduler: str
    status: JobStatus
    parent_job_id: int | None
    parent_index: int | None
    message_id: int | None
    error: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    reply: Reply | None = None
    revision: str | None = None  # the candidate revision it asked for (model.candidates); None: the production one
