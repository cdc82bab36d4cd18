"""``sygil-bot run``: connect to Discord and serve /imagine, rendering here or through the cluster's broker.

Owns the bot's startup order (token, database, tokenizer, workers, scheduler, service, client), the one-line
errors of a refused token or an unreachable Discord, and stopping cleanly on a signal.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from bot.cli import Commands, add_config, on_signal
from bot.cli.devices import start_workers
from bot.config import Config
from bot.errors import BotError, ConfigError

if TYPE_CHECKING:
    from bot.engine.executor import Worker

log = logging.getLogger(__name__)


def add_parser(commands: Commands) -> None:
    """Add ``run`` to the command line."""
    run = commands.add_parser("run", help="connect to Discord and serve /imagine")
    add_config(run, "config.toml")
    run.add_argument("--verbose", action="store_true", help="log debug messages")
    run.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    config = Config.load(args.config)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(config))
    return 0


async def _serve(config: Config) -> None:
    from bot.client import SygilBot, check_token
    from bot.health import beating, heartbeat_file
    from bot.prompts import load_tokenizer
    from bot.scheduler import Scheduler
    from bot.service import open_service
    from bot.storage import Database

    main_task = asyncio.current_task()
    assert main_task is not None
    loop = asyncio.get_running_loop()
    # While loading, a signal cancels the load; once the bot runs, it closes the bot, which ends `bot.start`
    # cleanly (a cancellation can be swallowed inside a reconnect loop, and then the process would never stop).
    on_signal(main_task.cancel)

    queue = config.queue
    async with contextlib.AsyncExitStack() as stack:
        # What is quick to check goes first: a wrong token or database path is one line now, not after the model
        # loaded and warmed up.
        with _reaching_discord(config):
            await check_token(config)
        db = await stack.enter_async_context(await Database.open(config.storage.path))
        tokenizer = await asyncio.to_thread(load_tokenizer, config.model.id, revision=config.model.revision)
        if config.cluster.enabled:
            workers = await start_cluster(config, stack)
        else:  # one worker process per device and revision (the production one, and each candidate)
            workers = await start_workers(config, stack, candidates=True)
        scheduler = await stack.enter_async_context(
            Scheduler(
                workers=workers,
                max_batch=queue.max_batch,
                max_queue=queue.max_queue,
                server_share=queue.server_share,
            )
        )
        service = await open_service(config, db=db, scheduler=scheduler, model=config.model.id, tokenizer=tokenizer)
        async with (
            SygilBot(config=config, service=service) as bot,
            beating(heartbeat_file(config), bot.health),  # what `sygil-bot health` reads
        ):
            closing: set[asyncio.Task[None]] = set()  # keeps the closing task alive until it is done

            def close() -> None:
                if closing:
                    return  # already stopping; a second signal changes nothing
                task = loop.create_task(bot.shut_down(queue.shutdown_grace))
                closing.add(task)

            on_signal(close)
            with _reaching_discord(config):
                await bot.start(config.token)


@contextlib.contextmanager
def _reaching_discord(config: Config) -> Iterator[None]:
    """Turn a refused token or an unreachable Discord into one line."""
    import aiohttp
    import discord

    try:
        yield
    except discord.LoginFailure:
        raise ConfigError("Discord refused the token in DISCORD_TOKEN: check it in the developer portal") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise BotError(
            f"Cannot reach Discord at {config.discord.api_base_url}: {exc}. Check the network, or "
            "discord.api_base_url and discord.gateway_url in the config"
        ) from None


async def start_cluster(config: Config, stack: contextlib.AsyncExitStack) -> list[Worker]:
    """Hand batches to remote workers through the broker instead of loading the model here."""
    from bot.cluster.broker import redacted
    from bot.cluster.pool import ClusterPool

    cluster = config.cluster
    log.info("Cluster mode: broker %s, prefix %s; the workers load the model", redacted(cluster.broker), cluster.prefix)
    pool = ClusterPool(
        cluster,
        model=config.model.id,
        revision=config.model.revision,
        candidates=config.model.candidates,
        preview=config.preview,
    )
    await stack.enter_async_context(pool)
    return list(pool.lanes)  # the production revision's workers, and each candidate's
