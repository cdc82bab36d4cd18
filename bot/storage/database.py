"""The database the bot opens: one aiosqlite connection, its numbered migrations, and the table families
(jobs, rules, votes, statistics, feedback, arena) whose methods it gathers, so callers hold one object."""

from __future__ import annotations

import logging
import re
import sqlite3
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Self

import aiosqlite

from bot.errors import DatabaseVersionError, StorageError
from bot.storage._arena import Arena
from bot.storage._feedback import Feedback
from bot.storage._jobs import Jobs
from bot.storage._rules import Rules
from bot.storage._stats import Stats
from bot.storage._votes import Votes
from bot.storage.files import create_private, private_folder

log = logging.getLogger(__name__)

# Fails the migration's transaction (a CHECK constraint) if it left any foreign key dangling.
_FOREIGN_KEY_CHECK = (
    "CREATE TEMP TABLE migration_check (foreign_key_violations INTEGER CHECK (foreign_key_violations = 0)); "
    "INSERT INTO migration_check SELECT COUNT(*) FROM pragma_foreign_key_check; DROP TABLE temp.migration_check;"
)
_MIGRATION_NAME = re.compile(r"(?P<number>\d{4})_[a-z0-9_]+\.sql")


def _refuse_folder(path: Path | str, setting: str) -> None:
    path = Path(path)
    if path.is_dir():
        raise StorageError(f"{setting}: {path} is a folder: name the database file, like {path / 'sygil.db'}")


def _readonly_uri(path: Path) -> str:
    return f"{path.absolute().as_uri()}?mode=ro"


def _unusable(error: sqlite3.Error, path: Path | str, setting: str) -> StorageError:
    """Say in one line why SQLite cannot use the file at ``path``."""
    if error.sqlite_errorname == "SQLITE_NOTADB":
        return StorageError(f"{setting}: {path} is not an SQLite database: name the bot's database file")
    return StorageError(
        f"{setting}: cannot use the database {path}: {error}. Check that the file and its folder exist and this user "
        "can read and write them"
    )


def migrations() -> list[tuple[int, str]]:
    """Return the numbered migration scripts shipped with the package, in order."""
    found: list[tuple[int, str]] = []
    for entry in resources.files("bot.storage").joinpath("migrations").iterdir():
        match = _MIGRATION_NAME.fullmatch(entry.name)
        if match:
            found.append((int(match["number"]), entry.read_text("utf-8")))
    found.sort()
    numbers = [number for number, _ in found]
    if numbers != list(range(1, len(numbers) + 1)):
        raise RuntimeError(f"migrations must be numbered 1..n without gaps, found {numbers}")
    return found


class Database(Jobs, Rules, Votes, Stats, Feedback, Arena):
    """SQLite storage for jobs, images, votes and moderation; use ``async with Database.open(path)``."""

    @classmethod
    async def open(cls, path: Path | str, *, setting: str = "storage.path") -> Self:
        """Open (creating if needed) and migrate the database at ``path``, which ``setting`` names.

        A new file is made readable by this user only, in folders made the same way: it holds live interaction
        tokens (SQLite gives its -wal and -shm files the database's mode). Raise StorageError when the file cannot be
        used, DatabaseVersionError when a newer bot made it.
        """
        if str(path) != ":memory:":
            path = Path(path)
            _refuse_folder(path, setting)
            try:
                private_folder(path.parent)
                create_private(path)
            except OSError as error:
                raise StorageError(
                    f"{setting}: cannot create the database {path}: {error.filename}: {error.strerror}. Name a file "
                    "in a folder this user can write to"
                ) from None
        pragmas = ("journal_mode = WAL", "foreign_keys = ON", "busy_timeout = 5000")
        return await cls._open(str(path), path=path, setting=setting, pragmas=pragmas, migrate=True)

    @classmethod
    async def open_readonly(cls, path: Path, *, setting: str = "storage.path") -> Self:
        """Open the database at ``path`` for reading only: nothing is created, migrated or written.

        Beside the running bot it reads a consistent snapshot (WAL). Raise StorageError when the file cannot be read,
        DatabaseVersionError when a newer bot made it.
        """
        _refuse_folder(path, setting)
        return await cls._open(
            _readonly_uri(path), uri=True, path=path, setting=setting, pragmas=("busy_timeout = 5000",)
        )

    @classmethod
    async def _open(
        cls,
        target: str,
        *,
        path: Path | str,
        setting: str,
        pragmas: Sequence[str],
        migrate: bool = False,
        uri: bool = False,
    ) -> Self:
        """Connect, refuse a database newer than this bot's migrations, then set ``pragmas`` and migrate if asked."""
        try:
            connection = await aiosqlite.connect(target, isolation_level=None, uri=uri)
        except sqlite3.Error as error:
            raise _unusable(error, path, setting) from None
        connection.row_factory = aiosqlite.Row
        database = cls(connection)
        try:
            version, known = await database.schema_version(), len(migrations())
            if version > known:
                raise DatabaseVersionError(
                    f"{path} was made by a newer sygil-bot (database version {version}; this one knows up to "
                    f"{known}): upgrade sygil-bot to use it, or set {setting} to another file"
                )
            for pragma in pragmas:
                await database._execute(f"PRAGMA {pragma}")
            if migrate:
                await database.migrate()
        except sqlite3.Error as error:
            await connection.close()
            raise _unusable(error, path, setting) from None
        except BaseException:
            await connection.close()
            raise
        return database

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._db.close()

    async def schema_version(self) -> int:
        async with self._db.execute("PRAGMA user_version") as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def migrate(self) -> int:
        """Apply every migration numbered above ``PRAGMA user_version``, each in one transaction.

        Foreign keys are off meanwhile, as SQLite's procedure for rebuilding a table asks (dropping the old jobs
        table must not cascade to its images), and each migration checks them before it commits: one that would
        leave a dangling reference fails and changes nothing.
        """
        current = await self.schema_version()
        pending = [(number, sql) for number, sql in migrations() if number > current]
        if not pending:
            return current
        async with self._db.execute("PRAGMA foreign_keys") as cursor:
            row = await cursor.fetchone()
        enforced = bool(row and row[0])
        await self._execute("PRAGMA foreign_keys = OFF")  # a no-op inside a transaction: set before BEGIN
        try:
            for number, sql in pending:
                log.info("Applying database migration %04d", number)
                script = f"BEGIN; {sql}; {_FOREIGN_KEY_CHECK} PRAGMA user_version = {number}; COMMIT;"
                try:
                    async with self._db.executescript(script):
                        pass
                except sqlite3.Error as error:
                    if self._db.in_transaction:
                        await self._execute("ROLLBACK")
                    if "foreign_key_violations" in str(error):
                        raise StorageError(
                            f"database migration {number:04d} stopped, nothing changed: rows of the database refer to "
                            "rows that do not exist (`PRAGMA foreign_key_check` in the sqlite3 shell lists them)"
                        ) from None
                    raise
                current = number
        finally:
            if enforced:
                await self._execute("PRAGMA foreign_keys = ON")
        return current
