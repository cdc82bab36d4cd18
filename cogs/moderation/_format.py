"""The text of moderators' answers: limits with their origins, blocklists, channel lists and the audit log."""

from __future__ import annotations

from collections.abc import Iterable

from bot.limits import DESCRIPTIONS, FIELDS, Limits, Resolved
from bot.markdown import inert
from bot.moderation import Target
from bot.storage import AuditEntry, GuildRules

_LIMIT = 2000


def limits_in_force(title: str, resolved: Resolved, *, user_id: int | None = None) -> str:
    lines = [f"**{title}**"]
    for name in FIELDS:
        source = resolved.origins[name].describe(user_id)
        lines.append(f"• {DESCRIPTIONS[name]} (`{name}`): **{resolved.value(name)}** ({source})")
    return "\n".join(lines)


def override(target: Target, limits: Limits) -> str:
    """Describe what an override itself sets."""
    if not limits:
        return f"{_capital(target.describe())} sets nothing of its own."
    return f"{_capital(target.describe())} sets: " + ", ".join(
        f"`{name}` **{value}**" for name, value in limits.items() if value is not None
    )


def change(target: Target, old: Limits, new: Limits) -> str:
    changed = [
        f"`{name}` {_value(before)} → **{_value(after)}**"
        for (name, before), (_, after) in zip(old.items(), new.items(), strict=True)
        if before != after
    ]
    if not changed:
        return f"{_capital(target.describe())} already had those limits; nothing changed."
    return f"Limits for {target.describe()}: " + ", ".join(changed) + ". They apply from the next request."


def _value(value: int | None) -> str:
    return "unset" if value is None else str(value)


def terms(config_terms: Iterable[str], server_terms: Iterable[str]) -> str:
    server = sorted(server_terms)
    config = sorted(config_terms)
    if not server and not config:
        return "No terms are blocked. Add one with `/mod blocklist add`."
    lines = [f"**Blocked terms** ({len(server)} set here, {len(config)} from the bot's config)"]
    if server:
        lines.append("Set here: " + ", ".join(spoiler(term) for term in server))
    if config:
        lines.append(
            "From the config (only whoever runs the bot can change these): "
            + ", ".join(spoiler(term) for term in config)
        )
    return _fit("\n".join(lines))


def channels(rules: GuildRules) -> str:
    allowed = " ".join(f"<#{channel}>" for channel in sorted(rules.allowed)) or "none"
    denied = " ".join(f"<#{channel}>" for channel in sorted(rules.denied)) or "none"
    if rules.allowed:
        summary = "The bot works only in the allowed channels (never in a denied one)."
    else:
        summary = "No channel is allowed, so the bot works in every channel except the denied ones."
    return _fit(f"**Allowed:** {allowed}\n**Denied:** {denied}\n{summary}")


def audit(entries: list[AuditEntry]) -> str:
    if not entries:
        return "No moderator has changed anything yet."
    lines: list[str] = []
    for entry in entries:
        line = f"<t:{int(entry.at)}:f> <@{entry.moderator_id}> **{entry.action}** {_audit_target(entry.target)}"
        if entry.old is not None or entry.new is not None:
            line += f": {entry.old or '—'} → {entry.new or '—'}"
        if entry.reason:
            line += f" (reason: {inert(entry.reason)})"
        lines.append(line)
    return _fit("\n".join(lines))


def spoiler(term: str) -> str:
    """Show a blocked term hidden behind a spoiler, which nothing in it can close."""
    return f"||{inert(term)}||"


def _audit_target(target: str) -> str:
    # The core writes every target from ids (mentions meant to render) except a blocked term, which it stores as
    # typed between spoiler bars.
    if len(target) > 4 and target.startswith("||") and target.endswith("||"):
        return spoiler(target[2:-2])
    return target


def _fit(text: str) -> str:
    return text if len(text) <= _LIMIT else text[: _LIMIT - 1] + "…"


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]
