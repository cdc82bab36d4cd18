"""SQLite storage: one Database object holds every SQL statement."""

from __future__ import annotations

from bot.storage.database import (
    AuditEntry,
    Database,
    GuildRules,
    ImageCounts,
    ImageRecord,
    Job,
    JobKind,
    JobStatus,
    Provenance,
    Reply,
    TagCounts,
    VoteTally,
)

__all__ = [
    "AuditEntry",
    "Database",
    "GuildRules",
    "ImageCounts",
    "ImageRecord",
    "Job",
    "JobKind",
    "JobStatus",
    "Provenance",
    "Reply",
    "TagCounts",
    "VoteTally",
]
