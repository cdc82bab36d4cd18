"""SQLite storage: one Database object, every SQL statement in its table families (``_jobs``, ``_rules``,
``_votes``, ``_stats``, ``_feedback``, ``_arena``) over the one connection of ``_store``."""

from __future__ import annotations

from bot.storage._arena import ARENA_SCHEMA, ArenaCount, ArenaPair, PairTally, VoterCounts
from bot.storage._feedback import FEEDBACK_SCHEMA
from bot.storage._jobs import ChargedJob, ImageRecord, Provenance
from bot.storage._rules import GuildRules
from bot.storage._stats import ImageCounts, TagCounts
from bot.storage._store import AuditEntry
from bot.storage._votes import VoteTally
from bot.storage.database import Database

__all__ = [
    "ARENA_SCHEMA",
    "FEEDBACK_SCHEMA",
    "ArenaCount",
    "ArenaPair",
    "AuditEntry",
    "ChargedJob",
    "Database",
    "GuildRules",
    "ImageCounts",
    "ImageRecord",
    "PairTally",
    "Provenance",
    "TagCounts",
    "VoteTally",
    "VoterCounts",
]
