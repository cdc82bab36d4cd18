"""Wait for a condition, not for a time: how the tests wait for anything another process or task does."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

POLL = 0.02


async def until(check: Callable[[], T | Awaitable[T]], within: float = 60, what: str = "") -> T:
    """Poll ``check`` until it returns something true; return that, or fail the test after ``within`` seconds."""
    try:
        async with asyncio.timeout(within):
            while True:
                value = check()
                if inspect.isawaitable(value):
                    value = await value
                if value:
                    return value  # pyright: ignore[reportReturnType]
                await asyncio.sleep(POLL)
    except TimeoutError:
        raise AssertionError(f"not within {within} s: {what or check}") from None
