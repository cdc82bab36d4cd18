"""What the cogs that post results share: how a stopping bot winds down the tasks that wait to post them."""

from __future__ import annotations

import asyncio
from collections.abc import Collection

POSTING_TIMEOUT = 3.0  # seconds a stopping bot waits for results being posted


async def wind_down(tasks: Collection[asyncio.Task[None]], posting: Collection[asyncio.Task[None]]) -> None:
    """Cancel the ``tasks`` still waiting for their images (their jobs stay queued in the database), and give those
    ``posting`` up to ``POSTING_TIMEOUT`` to finish and record it: stopped between the two, a result would be posted
    again after the restart."""
    waiting = [task for task in tasks if task not in posting]
    for task in waiting:
        task.cancel()
    busy = list(posting)
    if busy:
        _, late = await asyncio.wait(busy, timeout=POSTING_TIMEOUT)
        for task in late:
            task.cancel()
    await asyncio.gather(*waiting, *busy, return_exceptions=True)
