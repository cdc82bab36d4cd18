"""``sygil-bot worker``: load the model on this host's devices and render a bot's batches through its Redis.

Owns checking the broker before loading, the worker's heartbeat, and the exit status a pinned revision gives.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging

from bot.cli import EXIT_WRONG_REVISION, Commands, add_config, on_signal
from bot.cli.devices import start_workers
from bot.config import Config
from bot.errors import ConfigError

log = logging.getLogger(__name__)


def add_parser(commands: Commands) -> None:
    """Add ``worker`` to the command line."""
    worker = commands.add_parser("worker", help="render for a bot on another host, through its Redis (cluster mode)")
    add_config(worker, "worker.toml")
    worker.add_argument("--verbose", action="store_true", help="log debug messages")
    worker.set_defaults(handler=_worker)


def _worker(args: argparse.Namespace) -> int:
    config = Config.load(args.config, require_token=False)  # a worker never sees the Discord token
    if not config.cluster.enabled:
        raise ConfigError(
            f"{args.config}: sygil-bot worker needs cluster.broker (or SYGIL_BROKER): the URL of the bot's Redis, "
            "like redis://:password@queue-host:6379/0"
        )
    # A signal while the model loads cancels the load: that is a stop too.
    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        return asyncio.run(_work(config))
    return 0


async def _work(config: Config) -> int:
    """Load the model on every configured device and serve the bot's batches from Redis until stopped."""
    from bot.cluster.broker import check, connect, redacted
    from bot.cluster.remote import PinRefused, WorkerHost, process_executor
    from bot.health import Health, beating, heartbeat_file

    main_task = asyncio.current_task()
    assert main_task is not None
    on_signal(main_task.cancel)
    async with contextlib.AsyncExitStack() as stack:
        # The broker first, password included: a wrong one is one line now, not after minutes of loading.
        broker = await stack.enter_async_context(connect(config.cluster.broker))
        await check(broker, config.cluster.broker)
        log.info("The broker at %s answers", redacted(config.cluster.broker))
        workers = await start_workers(config, stack)
        host = WorkerHost(
            broker,
            config.cluster,
            model=config.model.id,
            executors=[process_executor(worker) for worker in workers],
            grace=config.queue.shutdown_grace,
        )
        # Once serving, a signal stops taking batches and finishes those in hand; a second gives them back at once.
        on_signal(host.stop)

        def health() -> Health:
            down = [worker.name for worker in workers if not worker.alive]
            if down:
                return Health(False, f"worker {', '.join(down)} is down (restarting)")
            if not host.broker_ok:
                return Health(False, "the broker (cluster.broker) does not answer")
            return Health(True, f"the broker answers; workers up: {', '.join(worker.name for worker in workers)}")

        await stack.enter_async_context(beating(heartbeat_file(config, worker=True), health))
        try:
            await host.run()
        except PinRefused as error:
            log.error("%s", error)
            return EXIT_WRONG_REVISION
    return 0
