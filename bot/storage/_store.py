"""The one aiosqlite connection every table family shares: its transactions, its statements, its clock, and the
audit row that moderators' changes write inside them."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any

import aiosqlite


def clock() -> float:
    """Return the time written on rows: the database's one clock."""
    return time.time()


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One change a moderator made: what, to whom, old → new, and why; ``id`` and ``at`` are set when stored."""

    guild_id: int
    moderator_id: int
    action: str
    target: str
    old: str | None = None
    new: str | None = None
    reason: str | None = None
    id: int = 0
    at: float = 0.0


class Store:
    """The connection and the statement helpers that each table family's methods are written with."""

    def __init__(self, connection: aiosqlite.Connection) -> None:
        self._db = connection
        # One connection serves every coroutine; explicit transactions must not interleave.
        self._transaction_lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncGenerator[None]:
        async with self._transaction_lock:
            await self._execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                await self._execute("ROLLBACK")
                raise
            await self._execute("COMMIT")

    async def _execute(self, sql: str, parameters: tuple[object, ...] = ()) -> tuple[int, int | None]:
        """Run one statement and return its row count and last row id.

        Every cursor is closed here, on the connection's thread: a cursor left to the garbage collector is
        finalised on the event loop's thread, which can reset a statement while the connection's thread runs
        another (seen as "bad parameter or other API misuse" under load).
        """
        async with self._db.execute(sql, parameters) as cursor:
            return cursor.rowcount, cursor.lastrowid

    async def _execute_many(self, sql: str, rows: list[tuple[object, ...]]) -> None:
        async with self._db.executemany(sql, rows):
            pass

    async def _rows(self, sql: str, parameters: tuple[object, ...] | Mapping[str, object] = ()) -> list[Any]:
        async with self._db.execute(sql, parameters) as cursor:
            return list(await cursor.fetchall())

    async def _audit(self, audit: AuditEntry) -> None:
        """Write a moderator's change to the audit log, inside the transaction that makes the change."""
        await self._execute(
            """
            INSERT INTO audit_log (guild_id, at, moderator_id, action, target, old, new, reason)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?)
            """,
            (
                audit.guild_id,
                clock(),
                audit.moderator_id,
                audit.action,
                audit.target,
                audit.old,
                audit.new,
                audit.reason,
            ),
        )
