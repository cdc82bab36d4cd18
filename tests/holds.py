"""Hold a batch mid-render in a worker process until the test lets it go (``bot.engine.worker``'s test hook).

A prompt holding the word ``hold-NAME`` stops its batch after the first step; the worker process writes a line to
``NAME.held`` and waits for ``NAME.release``. So a test catches a batch rendering, kills or stops it there, or lets it
finish, whatever the machine's speed or load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.waiting import until


@dataclass(frozen=True, slots=True)
class Held:
    """One batch a worker process holds: the process, its parent (the bot or `sygil-bot worker`), the batch."""

    pid: int
    parent: int
    batch_id: int


class Holds:
    """The folder the worker processes read; set ``environ`` in the environment of the process that starts them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def environ(self) -> dict[str, str]:
        return {"SYGIL_TEST_HOLD_DIR": str(self.folder)}

    @staticmethod
    def word(name: str) -> str:
        """The word that, in a prompt, holds its batch under ``name``."""
        return f"hold-{name}"

    def held(self, name: str) -> list[Held]:
        """Return the batches held under ``name`` so far, in the order they were held."""
        path = self.folder / f"{name}.held"
        if not path.exists():
            return []
        lines = [line.split() for line in path.read_text("utf-8").splitlines() if line.strip()]
        return [Held(int(pid), int(parent), int(batch)) for pid, parent, batch in lines]

    async def wait(self, name: str, count: int = 1, within: float = 120) -> list[Held]:
        """Wait until ``count`` batches have been held under ``name``; return them."""
        await until(lambda: len(self.held(name)) >= count, within, f"{count} batches held under {name}")
        return self.held(name)

    def release(self, name: str) -> None:
        """Let every batch held under ``name`` go on, and hold none under it from now on."""
        (self.folder / f"{name}.release").touch()
