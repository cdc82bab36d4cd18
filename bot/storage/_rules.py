"""The rules family: what each server's moderators set (limit overrides, blocked terms, channel rules, bans and
pauses), each change written with its audit row in one transaction, and the audit log read back."""

from __future__ import annotations

from dataclasses import dataclass, field

from bot.limits import Limits, Scope
from bot.storage._store import AuditEntry, Store


@dataclass(slots=True)
class GuildRules:
    """Everything a server's moderators set, as stored."""

    guild_id: int
    server: Limits = field(default_factory=Limits)
    roles: dict[int, Limits] = field(default_factory=dict[int, Limits])
    users: dict[int, Limits] = field(default_factory=dict[int, Limits])
    terms: set[str] = field(default_factory=set[str])
    allowed: set[int] = field(default_factory=set[int])
    denied: set[int] = field(default_factory=set[int])
    bans: dict[int, str | None] = field(default_factory=dict[int, str | None])
    paused: bool = False
    pause_reason: str | None = None
    arena_off: bool = False  # /mod arena off


class Rules(Store):
    """Store the moderators' rules; every change is written with its audit row in one transaction."""

    async def guild_rules(self) -> dict[int, GuildRules]:
        """Return what the moderators of every server set."""
        rules: dict[int, GuildRules] = {}

        def of(guild_id: int) -> GuildRules:
            return rules.setdefault(guild_id, GuildRules(guild_id))

        for row in await self._rows("SELECT * FROM limit_overrides"):
            limits = Limits(
                images_per_hour=row["images_per_hour"],
                max_queued=row["max_queued"],
                max_count=row["max_count"],
                max_steps=row["max_steps"],
            )
            guild = of(row["guild_id"])
            scope = Scope(row["scope"])
            if scope is Scope.SERVER:
                guild.server = limits
            elif scope is Scope.ROLE:
                guild.roles[row["target_id"]] = limits
            else:
                guild.users[row["target_id"]] = limits
        for row in await self._rows("SELECT guild_id, term FROM blocked_terms"):
            of(row["guild_id"]).terms.add(row["term"])
        for row in await self._rows("SELECT guild_id, channel_id, rule FROM channel_rules"):
            guild = of(row["guild_id"])
            (guild.allowed if row["rule"] == "allow" else guild.denied).add(row["channel_id"])
        for row in await self._rows("SELECT guild_id, user_id, reason FROM bans"):
            of(row["guild_id"]).bans[row["user_id"]] = row["reason"]
        for row in await self._rows("SELECT guild_id, reason FROM pauses"):
            guild = of(row["guild_id"])
            guild.paused, guild.pause_reason = True, row["reason"]
        for row in await self._rows("SELECT guild_id FROM arena_off"):
            of(row["guild_id"]).arena_off = True
        return rules

    async def set_limits(
        self, *, guild_id: int, scope: Scope, target_id: int, limits: Limits, audit: AuditEntry
    ) -> None:
        """Store an override's fields (an override with none set is removed)."""
        if not limits:
            await self._change(
                "DELETE FROM limit_overrides WHERE guild_id = ? AND scope = ? AND target_id = ?",
                (guild_id, scope.value, target_id),
                audit,
            )
            return
        await self._change(
            """
            INSERT INTO limit_overrides (guild_id, scope, target_id, images_per_hour, max_queued, max_count, max_steps)
            VALUES (?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT (guild_id, scope, target_id) DO UPDATE SET
                images_per_hour = excluded.images_per_hour, max_queued = excluded.max_queued,
                max_count = excluded.max_count, max_steps = excluded.max_steps
            """,
            (guild_id, scope.value, target_id, *(value for _, value in limits.items())),
            audit,
        )

    async def add_term(self, *, guild_id: int, term: str, audit: AuditEntry) -> None:
        await self._change("INSERT INTO blocked_terms (guild_id, term) VALUES (?, ?)", (guild_id, term), audit)

    async def remove_term(self, *, guild_id: int, term: str, audit: AuditEntry) -> None:
        await self._change("DELETE FROM blocked_terms WHERE guild_id = ? AND term = ?", (guild_id, term), audit)

    async def set_channel_rule(self, *, guild_id: int, channel_id: int, rule: str | None, audit: AuditEntry) -> None:
        """Allow or deny /imagine in a channel, or (``rule`` None) clear what was set for it."""
        if rule is None:
            await self._change(
                "DELETE FROM channel_rules WHERE guild_id = ? AND channel_id = ?", (guild_id, channel_id), audit
            )
            return
        if rule not in ("allow", "deny"):
            raise ValueError(f"a channel rule is allow or deny, not {rule!r}")
        await self._change(
            """
            INSERT INTO channel_rules (guild_id, channel_id, rule) VALUES (?, ?, ?)
            ON CONFLICT (guild_id, channel_id) DO UPDATE SET rule = excluded.rule
            """,
            (guild_id, channel_id, rule),
            audit,
        )

    async def ban(self, *, guild_id: int, user_id: int, reason: str | None, audit: AuditEntry) -> None:
        await self._change(
            """
            INSERT INTO bans (guild_id, user_id, reason) VALUES (?, ?, ?)
            ON CONFLICT (guild_id, user_id) DO UPDATE SET reason = excluded.reason
            """,
            (guild_id, user_id, reason),
            audit,
        )

    async def unban(self, *, guild_id: int, user_id: int, audit: AuditEntry) -> None:
        await self._change("DELETE FROM bans WHERE guild_id = ? AND user_id = ?", (guild_id, user_id), audit)

    async def pause(self, *, guild_id: int, reason: str | None, audit: AuditEntry) -> None:
        await self._change(
            """
            INSERT INTO pauses (guild_id, reason) VALUES (?, ?)
            ON CONFLICT (guild_id) DO UPDATE SET reason = excluded.reason
            """,
            (guild_id, reason),
            audit,
        )

    async def resume(self, *, guild_id: int, audit: AuditEntry) -> None:
        await self._change("DELETE FROM pauses WHERE guild_id = ?", (guild_id,), audit)

    async def set_arena(self, *, guild_id: int, on: bool, audit: AuditEntry) -> None:
        """Turn a server's arena on (the default) or off."""
        if on:
            await self._change("DELETE FROM arena_off WHERE guild_id = ?", (guild_id,), audit)
        else:
            await self._change("INSERT OR IGNORE INTO arena_off (guild_id) VALUES (?)", (guild_id,), audit)

    async def audit_log(self, *, guild_id: int, count: int) -> list[AuditEntry]:
        """Return a server's latest audit rows, newest first."""
        rows = await self._rows(
            "SELECT * FROM audit_log WHERE guild_id = ? ORDER BY id DESC LIMIT ?", (guild_id, count)
        )
        return [
            AuditEntry(
                guild_id=row["guild_id"],
                moderator_id=row["moderator_id"],
                action=row["action"],
                target=row["target"],
                old=row["old"],
                new=row["new"],
                reason=row["reason"],
                id=row["id"],
                at=row["at"],
            )
            for row in rows
        ]

    async def _change(self, sql: str, parameters: tuple[object, ...], audit: AuditEntry) -> None:
        async with self._transaction():
            await self._execute(sql, parameters)
            await self._audit(audit)
