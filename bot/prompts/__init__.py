"""The namespaced prompt language: parse, normalise, validate, suggest and count tokens."""

from __future__ import annotations

from bot.prompts.blocklist import Blocklist
from bot.prompts.checker import Problem, Rules, Tag, Verdict, check_prompt, nearest_namespace, normalise
from bot.prompts.namespaces import ALIASES, CONTENT, KNOWN, PROVENANCE, SAFE_RATINGS
from bot.prompts.tokens import MAX_TOKENS, Tokenizer, load_tokenizer

__all__ = [
    "ALIASES",
    "CONTENT",
    "KNOWN",
    "MAX_TOKENS",
    "PROVENANCE",
    "SAFE_RATINGS",
    "Blocklist",
    "Problem",
    "Rules",
    "Tag",
    "Tokenizer",
    "Verdict",
    "check_prompt",
    "load_tokenizer",
    "nearest_namespace",
    "normalise",
]
