"""Rate limits: which override decides each limit, what a request costs, and what each user used this hour."""

from __future__ import annotations

import collections
import enum
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

from bot.engine.types import Settings

WINDOW = 3600.0  # images_per_hour counts over any rolling hour
STANDARD_PIXELS = 512 * 512
STANDARD_STEPS = 25
FIELDS = ("images_per_hour", "max_queued", "max_count", "max_steps")
DESCRIPTIONS = {
    "images_per_hour": "images per hour",
    "max_queued": "jobs waiting or rendering at once",
    "max_count": "images per request",
    "max_steps": "steps per image",
}


@dataclass(frozen=True, slots=True)
class Limits:
    """Limit values; an override leaves the fields it does not set as None, and they fall through."""

    images_per_hour: int | None = None
    max_queued: int | None = None
    max_count: int | None = None
    max_steps: int | None = None

    def __post_init__(self) -> None:
        for name in FIELDS:
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative, got {value}")

    def items(self) -> list[tuple[str, int | None]]:
        return [(name, getattr(self, name)) for name in FIELDS]

    def updated(self, changes: Limits) -> Limits:
        """Return these limits with every field ``changes`` sets replaced."""
        return replace(self, **{name: value for name, value in changes.items() if value is not None})

    def changes(self, new: Limits) -> tuple[str, str]:
        """Describe the fields that differ in ``new``, before and after: ``images_per_hour=unset`` → ``=2``."""
        changed = [(name, old, value) for (name, old), (_, value) in zip(self.items(), new.items(), strict=True)]
        changed = [(name, old, value) for name, old, value in changed if old != value]

        def side(values: list[tuple[str, int | None]]) -> str:
            return ", ".join(f"{name}={'unset' if value is None else value}" for name, value in values)

        return side([(name, old) for name, old, _ in changed]), side([(name, value) for name, _, value in changed])

    def __bool__(self) -> bool:
        return any(value is not None for _, value in self.items())

    def __str__(self) -> str:
        """Describe the set fields for the audit log, as ``images_per_hour=2, max_queued=3`` (or ``none``)."""
        return ", ".join(f"{name}={value}" for name, value in self.items() if value is not None) or "none"


class Scope(enum.StrEnum):
    """Who an override is for: the whole server (its default), a role, or one user."""

    SERVER = "server"
    ROLE = "role"
    USER = "user"


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a limit in force comes from: a user's override, a role's, the server's default, or the config."""

    kind: Scope | None  # None: the config file
    role_id: int | None = None

    def describe(self, user_id: int | None = None) -> str:
        """Say where the limit comes from; mentions render as names (messages are sent with pings off)."""
        if self.kind is Scope.USER:
            return f"set for <@{user_id}>" if user_id is not None else "set for this user"
        if self.kind is Scope.ROLE:
            return f"role <@&{self.role_id}>"
        if self.kind is Scope.SERVER:
            return "server default"
        return "config default"


@dataclass(frozen=True, slots=True)
class Resolved:
    """The limits in force for one user, each with its origin."""

    images_per_hour: int
    max_queued: int
    max_count: int
    max_steps: int
    origins: Mapping[str, Origin]

    def value(self, name: str) -> int:
        return getattr(self, name)


def resolve(
    *,
    config: Limits,
    server: Limits = Limits(),
    roles: Mapping[int, Limits] | None = None,
    user: Limits = Limits(),
    ceilings: Limits = Limits(),
) -> Resolved:
    """Decide each limit: the user's override, else the most generous role override, else the server, else config.

    ``config`` must set every field. ``ceilings`` caps fields it sets (the config's generation bounds), whatever
    an override says.
    """
    values: dict[str, int] = {}
    origins: dict[str, Origin] = {}
    for name in FIELDS:
        value: int | None = getattr(user, name)
        origin = Origin(Scope.USER)
        if value is None:
            for role_id, limits in sorted((roles or {}).items()):
                candidate: int | None = getattr(limits, name)
                if candidate is not None and (value is None or candidate > value):
                    value, origin = candidate, Origin(Scope.ROLE, role_id)
        if value is None:
            value, origin = getattr(server, name), Origin(Scope.SERVER)
        if value is None:
            value, origin = getattr(config, name), Origin(None)
        if value is None:
            raise ValueError(f"the config's limits must set {name}")
        ceiling: int | None = getattr(ceilings, name)
        values[name] = value if ceiling is None else min(value, ceiling)
        origins[name] = origin
    return Resolved(**values, origins=origins)


def standard_images(settings: Settings, count: int = 1) -> float:
    """Return what ``count`` images cost: one per image, more in proportion to pixels times steps past 512² at 25."""
    per_image = settings.width * settings.height * settings.steps / (STANDARD_PIXELS * STANDARD_STEPS)
    return count * max(1.0, per_image)


@dataclass(eq=False, slots=True)
class Charge:
    """Images counted against a user from the moment a job is accepted; refunded if it never renders."""

    guild_id: int | None
    user_id: int
    cost: float
    at: float
    job_id: int | None = None


class Usage:
    """Each user's charges over the last hour, per server, in memory so admission never waits on the database."""

    def __init__(self, *, window: float = WINDOW, clock: Callable[[], float] = time.time) -> None:
        self.window = window
        self.clock = clock
        self._charges: dict[tuple[int | None, int], collections.deque[Charge]] = {}
        self._by_job: dict[int, Charge] = {}

    def load(self, charges: Iterable[Charge]) -> None:
        """Add charges read back from the database (jobs accepted in the last hour that did not give theirs back)."""
        for charge in sorted(charges, key=lambda charge: charge.at):
            self._add(charge)

    def charge(self, *, guild_id: int | None, user_id: int, cost: float) -> Charge:
        """Count ``cost`` images against a user now."""
        charge = Charge(guild_id=guild_id, user_id=user_id, cost=cost, at=self.clock())
        self._add(charge)
        return charge

    def attach(self, charge: Charge, job_id: int) -> None:
        """Tie a charge to the job it paid for, so cancelling the job can refund it."""
        charge.job_id = job_id
        self._by_job[job_id] = charge

    def refund(self, charge: Charge) -> None:
        charges = self._charges.get((charge.guild_id, charge.user_id))
        if charges is not None and charge in charges:
            charges.remove(charge)
        if charge.job_id is not None:
            self._by_job.pop(charge.job_id, None)

    def refund_job(self, job_id: int) -> bool:
        """Give a job's charge back; return whether there was one within the window."""
        charge = self._by_job.get(job_id)
        if charge is None:
            return False
        self.refund(charge)
        return True

    def used(self, *, guild_id: int | None, user_id: int) -> float:
        return sum(charge.cost for charge in self._live(guild_id, user_id))

    def frees_at(self, *, guild_id: int | None, user_id: int, need: float, limit: float) -> float | None:
        """Return when ``need`` more images fit under ``limit`` (now, if they fit now); None if they never will."""
        if need > limit + 1e-9:
            return None
        charges = list(self._live(guild_id, user_id))
        total = sum(charge.cost for charge in charges)
        now = self.clock()
        if total + need <= limit + 1e-9:
            return now
        for charge in charges:
            total -= charge.cost
            if total + need <= limit + 1e-9:
                return charge.at + self.window
        return now + self.window  # not reached: after the oldest charge expires, all of them have

    def _add(self, charge: Charge) -> None:
        self._charges.setdefault((charge.guild_id, charge.user_id), collections.deque()).append(charge)
        if charge.job_id is not None:
            self._by_job[charge.job_id] = charge

    def _live(self, guild_id: int | None, user_id: int) -> collections.deque[Charge]:
        charges = self._charges.get((guild_id, user_id))
        if charges is None:
            return collections.deque()
        horizon = self.clock() - self.window
        while charges and charges[0].at <= horizon:
            expired = charges.popleft()
            if expired.job_id is not None:
                self._by_job.pop(expired.job_id, None)
        if not charges:
            del self._charges[(guild_id, user_id)]
        return charges


def describe_wait(seconds: float) -> str:
    """Say how long to wait the way people do: ``45 s``, ``14 min``, ``1 h 5 min``."""
    if seconds < 60:
        return f"{max(1, math.ceil(seconds))} s"
    minutes = math.ceil(seconds / 60)
    if minutes <= 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def describe_images(amount: float) -> str:
    """Write an amount of standard images without noise: ``2``, ``1.5``, ``0.38``."""
    return f"{round(amount, 2):g}"
