"""SQLite storage: one Database object holds every SQL statement."""

from __future__ import annotations

from bot.storage.database import Database, ImageRecord, Job, JobKind, JobStatus, VoteTally

__all__ = ["Database", "ImageRecord", "Job", "JobKind", "JobStatus", "VoteTally"]
