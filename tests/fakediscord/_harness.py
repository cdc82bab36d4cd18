"""Helpers for in-process tests: point discord.py at the fake, fail on logged errors, run a bot."""

# The public API takes timeouts the way asyncio.wait_for does, by design.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from typing import TypeVar

import discord
import yarl
from discord.gateway import DiscordWebSocket
from discord.http import Route

from ._server import FakeDiscord

ClientT = TypeVar("ClientT", bound=discord.Client)


@contextlib.contextmanager
def point_discord_at(server: FakeDiscord) -> Iterator[None]:
    """Set discord.py's process-global REST base and gateway URL to the fake, restoring both on exit."""
    old_base, old_gateway = Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
    Route.BASE = server.api_base_url
    DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(server.gateway_url)
    try:
        yield
    finally:
        Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = old_base, old_gateway


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def capture_discord_errors(*, fail: bool = True) -> Iterator[list[logging.LogRecord]]:
    """Collect ERROR records of the ``discord`` logger; on a clean exit, fail if there were any."""
    logger = logging.getLogger("discord")
    collector = _Collector()
    old_level = logger.level
    if logger.getEffectiveLevel() > logging.ERROR:
        logger.setLevel(logging.ERROR)
    logger.addHandler(collector)
    try:
        yield collector.records
    finally:
        logger.removeHandler(collector)
        logger.setLevel(old_level)
    if fail and collector.records:
        formatter = logging.Formatter("%(name)s: %(message)s")
        details = "\n".join(formatter.format(record) for record in collector.records)
        raise AssertionError(f"discord.py logged {len(collector.records)} error(s):\n{details}")


@contextlib.asynccontextmanager
async def run_bot(
    bot: ClientT, server: FakeDiscord, *, timeout: float = 10, fail_on_errors: bool = True
) -> AsyncIterator[ClientT]:
    """Log the bot in to the fake, wait for on_ready, and close it on exit; discord errors fail the test."""
    with point_discord_at(server), capture_discord_errors(fail=fail_on_errors):
        task = asyncio.create_task(bot.start(server.token))
        try:
            connected = asyncio.create_task(server.wait_until_connected(timeout))
            await asyncio.wait({task, connected}, return_when=asyncio.FIRST_COMPLETED)
            if not connected.done():
                connected.cancel()
                task.result()
                raise RuntimeError("the bot stopped before connecting")
            connected.result()
            await asyncio.wait_for(bot.wait_until_ready(), timeout)
            yield bot
        finally:
            await bot.close()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@contextlib.contextmanager
def serve_in_thread() -> Iterator[FakeDiscord]:
    """Serve a ``FakeDiscord`` from its own thread and event loop, for a command run in this process with its own
    ``asyncio.run`` (``bot.__main__.main([...])``); stop it on exit."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-discord", daemon=True)
    thread.start()

    async def start() -> FakeDiscord:
        return await FakeDiscord().__aenter__()

    try:
        server = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
        try:
            yield server
        finally:
            asyncio.run_coroutine_threadsafe(server.__aexit__(None, None, None), loop).result(10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
