"""What each server's moderators set, live: limit overrides, bans, channel rules, blocked terms and pauses.

Reads are synchronous (admission never awaits); every change is written to SQLite with its audit row in one
transaction, then applied here, so it takes effect on the very next request.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

from bot.errors import BotError
from bot.limits import Limits, Resolved, Scope, resolve
from bot.prompts import Blocklist
from bot.prompts.blocklist import skeleton
from bot.scheduler import Scheduler
from bot.storage import AuditEntry, Database, GuildRules

log = logging.getLogger(__name__)

MAX_TERM = 100
# The config key that caps each limit (the ceilings given to Moderation).
CAPS = {
    "images_per_hour": "moderation.max_images_per_hour",
    "max_queued": "moderation.max_queued",
    "max_count": "generation.max_count",
    "max_steps": "generation.max_steps",
}


class ModerationError(BotError):
    """A moderator's change cannot be made as asked; the message says why."""


@dataclass(frozen=True, slots=True)
class Target:
    """What a limits command is about: the server default, a role or a user."""

    scope: Scope
    id: int

    def describe(self) -> str:
        """Write the target for Discord: mentions render as names (messages are sent with pings off)."""
        if self.scope is Scope.USER:
            return f"<@{self.id}>"
        if self.scope is Scope.ROLE:
            return f"<@&{self.id}>"
        return "the server default"


P = ParamSpec("P")
R = TypeVar("R")


def _one_at_a_time(
    change: Callable[Concatenate[Moderation, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[Moderation, P], Coroutine[Any, Any, R]]:
    """Run a change alone: it reads the state, writes it, then applies it, and two at once would lose one."""

    @functools.wraps(change)
    async def alone(self: Moderation, *args: P.args, **kwargs: P.kwargs) -> R:
        async with self._changing:
            return await change(self, *args, **kwargs)

    return alone


class Moderation:
    """Every server's moderation state, read without awaiting and changed through the database."""

    def __init__(
        self,
        db: Database,
        scheduler: Scheduler,
        *,
        defaults: Limits,
        ceilings: Limits,
        blocklist: Iterable[str] = (),
        rules: dict[int, GuildRules] | None = None,
    ) -> None:
        self.db = db
        self.scheduler = scheduler
        self.defaults = defaults
        self.ceilings = ceilings
        self.config_terms = tuple(blocklist)
        self._rules: dict[int, GuildRules] = rules or {}
        self._blocklists: dict[int | None, Blocklist] = {}
        self._changing = asyncio.Lock()
        scheduler.follow_pauses(self.is_paused)  # the pauses live here; the scheduler asks

    @classmethod
    async def load(
        cls, db: Database, scheduler: Scheduler, *, defaults: Limits, ceilings: Limits, blocklist: Iterable[str] = ()
    ) -> Moderation:
        """Read every server's rules from the database; paused servers stay paused."""
        rules = await db.guild_rules()
        paused = [guild_id for guild_id, guild in rules.items() if guild.paused]
        if paused:
            log.info("Servers paused by their moderators: %s", ", ".join(map(str, paused)))
        return cls(db, scheduler, defaults=defaults, ceilings=ceilings, blocklist=blocklist, rules=rules)

    def rules(self, guild_id: int) -> GuildRules:
        """Return a server's rules (empty ones for a server nobody moderated yet)."""
        return self._rules.get(guild_id) or GuildRules(guild_id)

    # Reads, for admission

    def ban_reason(self, guild_id: int | None, user_id: int) -> tuple[bool, str | None]:
        """Return whether the user is banned in the server, and why."""
        if guild_id is None or guild_id not in self._rules:
            return False, None
        bans = self._rules[guild_id].bans
        return user_id in bans, bans.get(user_id)

    def channel_allowed(self, guild_id: int | None, channel_ids: Iterable[int]) -> bool:
        """Return whether /imagine works in a channel (given with its parent, for a thread)."""
        if guild_id is None or guild_id not in self._rules:
            return True
        guild = self._rules[guild_id]
        channels = list(channel_ids)
        if any(channel in guild.denied for channel in channels):
            return False
        return not guild.allowed or any(channel in guild.allowed for channel in channels)

    def is_paused(self, guild_id: int) -> bool:
        """Return whether a server's moderators paused its queue."""
        guild = self._rules.get(guild_id)
        return guild is not None and guild.paused

    def pause_reason(self, guild_id: int | None) -> tuple[bool, str | None]:
        if guild_id is None or guild_id not in self._rules:
            return False, None
        guild = self._rules[guild_id]
        return guild.paused, guild.pause_reason

    def blocklist(self, guild_id: int | None) -> Blocklist:
        """Return the config's blocked terms merged with the server's."""
        blocklist = self._blocklists.get(guild_id)
        if blocklist is None:
            terms = self._rules[guild_id].terms if guild_id in self._rules else set[str]()
            blocklist = self._blocklists[guild_id] = Blocklist([*self.config_terms, *sorted(terms)])
        return blocklist

    def limits(self, guild_id: int | None, user_id: int, role_ids: Iterable[int] = ()) -> Resolved:
        """Return the limits in force for a user with these roles, each with where it comes from."""
        guild = self.rules(guild_id) if guild_id is not None else GuildRules(0)
        roles = {role_id: guild.roles[role_id] for role_id in role_ids if role_id in guild.roles}
        return resolve(
            config=self.defaults,
            server=guild.server,
            roles=roles,
            user=guild.users.get(user_id, Limits()),
            ceilings=self.ceilings,
        )

    def override(self, guild_id: int, target: Target) -> Limits:
        """Return what an override sets (for the server default: what the moderators set, not the config)."""
        guild = self.rules(guild_id)
        if target.scope is Scope.SERVER:
            return guild.server
        table = guild.roles if target.scope is Scope.ROLE else guild.users
        return table.get(target.id, Limits())

    # Changes: database and audit row first, then the state here

    @_one_at_a_time
    async def set_limits(
        self, guild_id: int, moderator_id: int, target: Target, changes: Limits
    ) -> tuple[Limits, Limits]:
        """Set the fields ``changes`` sets on an override; return it before and after."""
        if not changes:
            raise ModerationError(
                "Give at least one limit to set: images_per_hour, max_queued, max_count or max_steps."
            )
        for name, ceiling in self.ceilings.items():
            value = getattr(changes, name)
            if ceiling is not None and value is not None and value > ceiling:
                raise ModerationError(
                    f"{name} can be at most {ceiling} here (the bot's config caps it: {CAPS[name]}), not {value}. "
                    "Nothing changed."
                )
        old = self.override(guild_id, target)
        new = old.updated(changes)
        if new == old:
            raise ModerationError(f"{_capital(target.describe())} already has those limits; nothing changed.")
        await self._write_limits(guild_id, moderator_id, target, old, new, action="limits set")
        return old, new

    @_one_at_a_time
    async def reset_limits(self, guild_id: int, moderator_id: int, target: Target) -> Limits:
        """Remove an override (for the server default: go back to the config's values); return what it was."""
        old = self.override(guild_id, target)
        if not old:
            raise ModerationError(f"{_capital(target.describe())} has no limits set; nothing to reset.")
        await self._write_limits(guild_id, moderator_id, target, old, Limits(), action="limits reset")
        return old

    @_one_at_a_time
    async def add_term(self, guild_id: int, moderator_id: int, term: str) -> str:
        term = _clean_term(term)
        if _known(term, self.config_terms):
            raise ModerationError("That term is already blocked by the bot's config.")
        guild = self._rules.get(guild_id)
        if guild is not None and _known(term, guild.terms):
            raise ModerationError("That term is already on this server's blocklist.")
        await self.db.add_term(
            guild_id=guild_id, term=term, audit=_audit(guild_id, moderator_id, "blocklist add", f"||{term}||")
        )
        self._edit(guild_id).terms.add(term)
        self._blocklists.clear()
        return term

    @_one_at_a_time
    async def remove_term(self, guild_id: int, moderator_id: int, term: str) -> str:
        guild = self.rules(guild_id)
        stored = next((known for known in guild.terms if skeleton(known) == skeleton(term.strip())), None)
        if stored is None:
            if _known(term.strip(), self.config_terms):
                raise ModerationError(
                    "That term is blocked by the bot's config (prompts.blocklist); only whoever runs the bot can "
                    "remove it there."
                )
            raise ModerationError("That term is not on this server's blocklist (see /mod blocklist list).")
        await self.db.remove_term(
            guild_id=guild_id, term=stored, audit=_audit(guild_id, moderator_id, "blocklist remove", f"||{stored}||")
        )
        self._edit(guild_id).terms.discard(stored)
        self._blocklists.clear()
        return stored

    @_one_at_a_time
    async def set_channel(self, guild_id: int, moderator_id: int, channel_id: int, rule: str | None) -> str | None:
        """Allow or deny /imagine in a channel, or clear both; return the rule it had before."""
        guild = self.rules(guild_id)
        old = "allow" if channel_id in guild.allowed else "deny" if channel_id in guild.denied else None
        if old == rule:
            state = {"allow": "already allowed", "deny": "already denied", None: "neither allowed nor denied"}[rule]
            raise ModerationError(f"<#{channel_id}> is {state}.")
        action = f"channels {rule or 'clear'}"
        await self.db.set_channel_rule(
            guild_id=guild_id,
            channel_id=channel_id,
            rule=rule,
            audit=_audit(guild_id, moderator_id, action, f"<#{channel_id}>", old=old or "none", new=rule or "none"),
        )
        guild = self._edit(guild_id)
        guild.allowed.discard(channel_id)
        guild.denied.discard(channel_id)
        if rule == "allow":
            guild.allowed.add(channel_id)
        elif rule == "deny":
            guild.denied.add(channel_id)
        return old

    @_one_at_a_time
    async def ban(self, guild_id: int, moderator_id: int, user_id: int, reason: str | None) -> None:
        banned, old_reason = self.ban_reason(guild_id, user_id)
        if banned and old_reason == reason:
            raise ModerationError(f"<@{user_id}> is already banned.")
        await self.db.ban(
            guild_id=guild_id,
            user_id=user_id,
            reason=reason,
            audit=_audit(
                guild_id,
                moderator_id,
                "ban",
                f"<@{user_id}>",
                old="banned" if banned else "allowed",
                new="banned",
                reason=reason,
            ),
        )
        self._edit(guild_id).bans[user_id] = reason

    @_one_at_a_time
    async def unban(self, guild_id: int, moderator_id: int, user_id: int, reason: str | None) -> None:
        banned, _ = self.ban_reason(guild_id, user_id)
        if not banned:
            raise ModerationError(f"<@{user_id}> is not banned.")
        await self.db.unban(
            guild_id=guild_id,
            user_id=user_id,
            audit=_audit(guild_id, moderator_id, "unban", f"<@{user_id}>", old="banned", new="allowed", reason=reason),
        )
        self._edit(guild_id).bans.pop(user_id, None)

    @_one_at_a_time
    async def pause(self, guild_id: int, moderator_id: int, reason: str | None) -> None:
        paused, _ = self.pause_reason(guild_id)
        if paused:
            raise ModerationError("The queue is already paused; /mod resume starts it again.")
        await self.db.pause(
            guild_id=guild_id,
            reason=reason,
            audit=_audit(guild_id, moderator_id, "pause", "the queue", old="running", new="paused", reason=reason),
        )
        guild = self._edit(guild_id)
        guild.paused, guild.pause_reason = True, reason
        self.scheduler.pause_changed(guild_id)

    @_one_at_a_time
    async def resume(self, guild_id: int, moderator_id: int) -> None:
        paused, _ = self.pause_reason(guild_id)
        if not paused:
            raise ModerationError("The queue is not paused.")
        await self.db.resume(
            guild_id=guild_id, audit=_audit(guild_id, moderator_id, "resume", "the queue", old="paused", new="running")
        )
        guild = self._edit(guild_id)
        guild.paused, guild.pause_reason = False, None
        self.scheduler.pause_changed(guild_id)

    def arena_on(self, guild_id: int | None) -> bool:
        """Return whether a server shows arena pairs (its moderators can turn them off with /mod arena)."""
        guild = self._rules.get(guild_id) if guild_id is not None else None
        return guild is None or not guild.arena_off

    @_one_at_a_time
    async def set_arena(self, guild_id: int, moderator_id: int, on: bool) -> bool:
        """Turn a server's arena on or off; return whether that changed anything (a no-op is not audited)."""
        if self.arena_on(guild_id) == on:
            return False
        old, new = ("off", "on") if on else ("on", "off")
        await self.db.set_arena(
            guild_id=guild_id, on=on, audit=_audit(guild_id, moderator_id, "arena", "the arena", old=old, new=new)
        )
        self._edit(guild_id).arena_off = not on
        return True

    async def audit_log(self, guild_id: int, count: int = 10) -> list[AuditEntry]:
        return await self.db.audit_log(guild_id=guild_id, count=count)

    async def _write_limits(
        self, guild_id: int, moderator_id: int, target: Target, old: Limits, new: Limits, *, action: str
    ) -> None:
        before, after = old.changes(new)
        await self.db.set_limits(
            guild_id=guild_id,
            scope=target.scope,
            target_id=target.id,
            limits=new,
            audit=_audit(guild_id, moderator_id, action, target.describe(), old=before, new=after),
        )
        guild = self._edit(guild_id)
        if target.scope is Scope.SERVER:
            guild.server = new
            return
        table = guild.roles if target.scope is Scope.ROLE else guild.users
        if new:
            table[target.id] = new
        else:
            table.pop(target.id, None)

    def _edit(self, guild_id: int) -> GuildRules:
        return self._rules.setdefault(guild_id, GuildRules(guild_id))


def server_target(guild_id: int) -> Target:
    return Target(Scope.SERVER, guild_id)


def _audit(
    guild_id: int,
    moderator_id: int,
    action: str,
    target: str,
    *,
    old: str | None = None,
    new: str | None = None,
    reason: str | None = None,
) -> AuditEntry:
    return AuditEntry(
        guild_id=guild_id, moderator_id=moderator_id, action=action, target=target, old=old, new=new, reason=reason
    )


def _clean_term(term: str) -> str:
    term = " ".join(term.split())
    if not term:
        raise ModerationError("Give a word or phrase to block.")
    if len(term) > MAX_TERM:
        raise ModerationError(f"A blocked term can be at most {MAX_TERM} characters; that one has {len(term)}.")
    if not Blocklist([term]):
        raise ModerationError("A blocked term needs at least one letter or digit.")
    return term


def _known(term: str, terms: Iterable[str]) -> bool:
    folded = skeleton(term)
    return any(skeleton(known) == folded for known in terms)


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]
