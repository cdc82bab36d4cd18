"""The namespaced prompt language: parse, normalise, validate and suggest."""

from __future__ import annotations

from bot.prompts.checker import MAX_TOKENS, Problem, Tag, Verdict, check_prompt, nearest_namespace
from bot.prompts.namespaces import ALIASES, CONTENT, KNOWN, PROVENANCE

__all__ = [
    "ALIASES",
    "CONTENT",
    "KNOWN",
    "MAX_TOKENS",
    "PROVENANCE",
    "Problem",
    "Tag",
    "Verdict",
    "check_prompt",
    "nearest_namespace",
]
