"""The heartbeat file: the bot and the remote worker rewrite it while they serve; ``sygil-bot health`` reads it.

A container's HEALTHCHECK (or any supervisor) runs ``sygil-bot health``: a file missing or older than
``STALE_AFTER`` seconds means the process is not running, or hangs; otherwise the file's one line says whether it
serves (``healthy: …``) or what is wrong (``unhealthy: …``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path

from bot.config import Config

log = logging.getLogger(__name__)

INTERVAL = 10.0  # seconds between two writes of the heartbeat file; a change of state is written at once
STALE_AFTER = 3 * INTERVAL
_POLL = 1.0  # seconds between two looks at the state


@dataclass(frozen=True, slots=True)
class Health:
    """Whether a process serves, and one line saying how (or what is wrong)."""

    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'healthy' if self.ok else 'unhealthy'}: {self.detail}"


def heartbeat_file(config: Config, *, worker: bool = False) -> Path:
    """Return where ``sygil-bot run`` (or ``sygil-bot worker``) of this config keeps its heartbeat."""
    return config.storage.path.parent / ("worker.health" if worker else "bot.health")


@contextlib.asynccontextmanager
async def beating(path: Path, state: Callable[[], Health], *, interval: float = INTERVAL) -> AsyncGenerator[None]:
    """Write ``state()`` to ``path`` while inside: when it changes, else every ``interval`` seconds; then remove it."""
    task = asyncio.get_running_loop().create_task(_beat(path, state, interval), name="heartbeat")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        _remove(path)


async def _beat(path: Path, state: Callable[[], Health], interval: float) -> None:
    written_line, written_at = "", -math.inf
    failing = False
    while True:
        try:
            line = state().line()
        except Exception as exc:  # a bug: said in the log and in the heartbeat, and the beat goes on
            log.exception("The health check failed")
            line = Health(False, f"the health check failed: {exc!r}").line()
        if line != written_line or time.monotonic() - written_at >= interval:
            try:
                await asyncio.to_thread(_write, path, line)
            except OSError as exc:
                if not failing:  # once per failing stretch, not every second
                    log.warning("Cannot write the heartbeat file %s (`sygil-bot health` reads it): %s", path, exc)
                failing = True
            else:
                written_line, written_at, failing = line, time.monotonic(), False
        await asyncio.sleep(_POLL)


def _write(path: Path, line: str) -> None:
    # Written beside and renamed: a reader never sees half a line.
    partial = path.with_name(path.name + ".part")
    partial.write_text(line + "\n", "utf-8")
    partial.replace(path)


def _remove(path: Path) -> None:
    for stale in (path, path.with_name(path.name + ".part")):
        with contextlib.suppress(OSError):
            stale.unlink(missing_ok=True)


def check(path: Path, *, command: str) -> Health:
    """Read the heartbeat of ``command`` (``sygil-bot run`` or ``sygil-bot worker``) in ``path``."""
    try:
        age = time.time() - path.stat().st_mtime
        text = path.read_text("utf-8").strip()
    except FileNotFoundError:
        return Health(False, f"no heartbeat file {path}: {command} is not running, or is still loading the model")
    except (OSError, UnicodeDecodeError) as exc:
        return Health(False, f"cannot read the heartbeat file {path}: {exc}")
    if age > STALE_AFTER:
        return Health(
            False,
            f"the heartbeat in {path} is {age:.0f} s old (it is rewritten every {INTERVAL:.0f} s): "
            f"{command} hangs, or was killed",
        )
    for ok, prefix in ((True, "healthy: "), (False, "unhealthy: ")):
        if text.startswith(prefix) and "\n" not in text:
            return Health(ok, text.removeprefix(prefix))
    return Health(False, f"the heartbeat file {path} holds {text[:80]!r}, not a heartbeat")
