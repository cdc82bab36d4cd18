"""The command line: run the bot, serve as a remote worker, render locally, build the tiny test model."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.config import SCHEDULERS, Config, ModelConfig, PromptsConfig
from bot.errors import BotError, ConfigError

if TYPE_CHECKING:
    from bot.engine.process import WorkerProcess
    from bot.feedback import Exported
    from bot.prompts import Rules
    from bot.scheduler import Worker

log = logging.getLogger("bot")

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_WRONG_REVISION = 3  # `sygil-bot worker`: the bot is pinned to another model revision


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sygil-bot`` command line and return its exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    # Read when transformers is first imported: some of its notices are printed at import time.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    try:
        return args.handler(args)
    except ConfigError as exc:
        print(f"sygil-bot: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BotError as exc:
        print(f"sygil-bot: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sygil-bot", description="A Discord bot for Sygil Diffusion.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="connect to Discord and serve /imagine")
    run.add_argument("--config", type=Path, default=Path("config.toml"), help="TOML settings (default: config.toml)")
    run.add_argument("--verbose", action="store_true", help="log debug messages")
    run.set_defaults(handler=_run)

    worker = commands.add_parser("worker", help="render for a bot on another host, through its Redis (cluster mode)")
    worker.add_argument("--config", type=Path, default=Path("worker.toml"), help="TOML settings (default: worker.toml)")
    worker.add_argument("--verbose", action="store_true", help="log debug messages")
    worker.set_defaults(handler=_worker)

    health = commands.add_parser(
        "health", help="exit 0 while `sygil-bot run` of this config serves, else 1 (for a container HEALTHCHECK)"
    )
    health.add_argument("--config", type=Path, default=Path("config.toml"), help="TOML settings (default: config.toml)")
    health.add_argument("--worker", action="store_true", help="check `sygil-bot worker` of this config instead")
    health.set_defaults(handler=_health)

    imagine = commands.add_parser("imagine", help="render one prompt to a PNG, without Discord")
    imagine.add_argument("prompt")
    imagine.add_argument("-o", "--output", type=Path, required=True, help="PNG file to write")
    imagine.add_argument("--negative", default="", help="negative prompt")
    imagine.add_argument("--seed", type=int, default=None, help="seed (random when left out)")
    imagine.add_argument("--steps", type=int, default=None)
    imagine.add_argument("--guidance", type=float, default=None)
    imagine.add_argument("--width", type=int, default=512)
    imagine.add_argument("--height", type=int, default=512)
    imagine.add_argument("--model", default=None, help="hub id or local folder (default: the config's model.id)")
    imagine.add_argument("--scheduler", default=None, help="dpm++, ddim or euler-a")
    imagine.add_argument("--device", default=None, help="auto, cpu, cuda")
    imagine.add_argument("--config", type=Path, default=None, help="take model and generation defaults from here")
    imagine.add_argument("--allow-rating", action="store_true", help="allow mature rating: tags")
    imagine.set_defaults(handler=_imagine)

    prompt = commands.add_parser("prompt", help="work with prompts").add_subparsers(required=True, metavar="ACTION")
    check = prompt.add_parser("check", help="check prompts against the tag language and the token budget")
    check.add_argument("prompt", nargs="?", help="the prompt (or use --file)")
    check.add_argument("--file", type=Path, help="check one prompt per line of this file")
    check.add_argument("--negative", default="", help="negative prompt checked with each prompt")
    check.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    check.add_argument(
        "--model", default=None, help="whose tokenizer counts (default: the config's model.id, else CLIP's)"
    )
    check.add_argument("--config", type=Path, default=None, help="take the model, blocklist and truncation from here")
    check.add_argument("--allow-rating", action="store_true", help="check as in an age-restricted channel")
    check.set_defaults(handler=_prompt_check)

    export = commands.add_parser("export-feedback", help="write one record per image with its votes, for training")
    export.add_argument("--out", type=Path, required=True, help="file to write (- for standard output)")
    export.add_argument(
        "--format", choices=["jsonl", "csv", "parquet"], default=None, help="default: from --out's suffix, else jsonl"
    )
    export.add_argument("--since", type=_date, default=None, help="images made on or after this date (YYYY-MM-DD)")
    export.add_argument("--until", type=_date, default=None, help="images made before this date (YYYY-MM-DD)")
    export.add_argument("--min-votes", type=int, default=0, help="only images with at least this many votes")
    export.add_argument("--revision", default=None, help="only images made by this model revision")
    export.add_argument(
        "--images", type=Path, default=None, metavar="DIR", help="also put each image's kept PNG in this folder"
    )
    export.add_argument("--config", type=Path, default=Path("config.toml"), help="where storage.path is set")
    export.add_argument("--database", type=Path, default=None, help="the SQLite file (default: the config's)")
    export.set_defaults(handler=_export_feedback)

    tiny = commands.add_parser("make-tiny-model", help="write a tiny random-weights Sygil-shaped model (for tests)")
    tiny.add_argument("directory", type=Path)
    tiny.set_defaults(handler=_make_tiny_model)
    return parser


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
    _on_signal(main_task.cancel)

    queue = config.queue
    async with contextlib.AsyncExitStack() as stack:
        # What is quick to check goes first: a wrong token or database path is one line now, not after the model
        # loaded and warmed up.
        with _reaching_discord(config):
            await check_token(config)
        db = await stack.enter_async_context(await Database.open(config.storage.path))
        tokenizer = await asyncio.to_thread(load_tokenizer, config.model.id, revision=config.model.revision)
        workers = await _start_cluster(config, stack) if config.cluster.enabled else await _start_workers(config, stack)
        scheduler = await stack.enter_async_context(
            Scheduler(workers=workers, max_batch=queue.max_batch, max_queue=queue.max_queue)
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

            _on_signal(close)
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


def _on_signal(stop: Callable[[], object]) -> None:
    """Call ``stop`` on SIGTERM and SIGINT, from now on, in place of what was called before."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop)


def _health(args: argparse.Namespace) -> int:
    from bot.health import check, heartbeat_file

    try:
        config = Config.load(args.config, require_token=False)
    except ConfigError as exc:
        # A HEALTHCHECK reads 1 as unhealthy; Docker reserves 2.
        print(f"unhealthy: {exc}")
        return EXIT_REFUSED
    command = "sygil-bot worker" if args.worker else "sygil-bot run"
    health = check(heartbeat_file(config, worker=args.worker), command=command)
    print(health.line())
    return 0 if health.ok else EXIT_REFUSED


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
    _on_signal(main_task.cancel)
    async with contextlib.AsyncExitStack() as stack:
        # The broker first, password included: a wrong one is one line now, not after minutes of loading.
        broker = await stack.enter_async_context(connect(config.cluster.broker))
        await check(broker, config.cluster.broker)
        log.info("The broker at %s answers", redacted(config.cluster.broker))
        workers = await _start_workers(config, stack)
        host = WorkerHost(
            broker,
            config.cluster,
            model=config.model.id,
            executors=[process_executor(worker) for worker in workers],
            grace=config.queue.shutdown_grace,
        )
        # Once serving, a signal stops taking batches and finishes those in hand; a second gives them back at once.
        _on_signal(host.stop)

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


async def _start_cluster(config: Config, stack: contextlib.AsyncExitStack) -> list[Worker]:
    """Hand batches to remote workers through the broker instead of loading the model here."""
    from bot.cluster.broker import redacted
    from bot.cluster.pool import ClusterPool

    cluster = config.cluster
    log.info("Cluster mode: broker %s, prefix %s; the workers load the model", redacted(cluster.broker), cluster.prefix)
    pool = ClusterPool(cluster, model=config.model.id, revision=config.model.revision)
    await stack.enter_async_context(pool)
    return [pool]


async def _start_workers(config: Config, stack: contextlib.AsyncExitStack) -> list[WorkerProcess]:
    """Start one worker process per configured device, each loading the model; raise if any cannot."""
    from bot.engine.process import WorkerProcess
    from bot.engine.protocol import WorkerSettings

    devices = _resolve_devices(config.model)
    cpu_workers = sum(device == "cpu" for device, _ in devices)
    # CPU workers share the cores rather than each spawning a thread per core.
    threads = max(1, (os.cpu_count() or 1) // cpu_workers) if cpu_workers else None
    workers = [
        WorkerProcess(
            WorkerSettings(
                model_id=config.model.id,
                revision=config.model.revision,
                device=device,
                dtype=dtype,
                scheduler=config.model.scheduler,
                safety_checker=config.model.safety_checker,
                # Compiled kernels are kept beside the database, on the volume that outlives a container.
                options=config.engine_options(compile_cache=config.storage.path.parent / "compile-cache"),
                threads=threads if device == "cpu" else None,
                verbose=log.isEnabledFor(logging.DEBUG),
            ),
            name=f"{index}:{device}" if len(devices) > 1 else device,
            announce=not config.cluster.enabled,  # `sygil-bot worker` announces each device as a cluster worker
        )
        for index, (device, dtype) in enumerate(devices)
    ]
    for worker in workers:
        stack.push_async_callback(worker.close)
    log.info("Loading %s on %s", config.model.id, ", ".join(f"{device} ({dtype})" for device, dtype in devices))
    results = await asyncio.gather(*(worker.start() for worker in workers), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return workers


def _resolve_devices(model: ModelConfig) -> list[tuple[str, str]]:
    """Return (device, dtype) for each worker: "auto" means every CUDA GPU, else the CPU."""
    import torch

    if model.devices == ("auto",) and torch.cuda.is_available():
        devices = [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    else:
        devices = list(model.devices)
    return [_resolve_device(model, device) for device in devices]


def _resolve_device(model: ModelConfig, device: str) -> tuple[str, str]:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f'model.devices names {device}, but this machine has no CUDA GPU (set model.devices = ["cpu"])'
        )
    dtype = model.dtype
    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    return device, dtype


def _imagine(args: argparse.Namespace) -> int:
    from bot.admission import MAX_SEED, random_seed
    from bot.engine.types import ImageSpec, Settings
    from bot.prompts import check_prompt

    config = Config.load(args.config, require_token=False) if args.config else None
    model = config.model if config else ModelConfig()
    generation = config.generation if config else None
    steps = args.steps if args.steps is not None else (generation.default_steps if generation else 25)
    guidance = args.guidance if args.guidance is not None else (generation.default_guidance if generation else 7.0)
    try:
        settings = Settings(steps=steps, guidance=guidance, width=args.width, height=args.height)
    except ValueError as exc:
        print(f"sygil-bot: {exc}", file=sys.stderr)
        return EXIT_USAGE
    seed = random_seed() if args.seed is None else args.seed
    if not 0 <= seed <= MAX_SEED:
        print(f"sygil-bot: --seed must be between 0 and {MAX_SEED}, got {seed}", file=sys.stderr)
        return EXIT_USAGE
    if not args.output.parent.is_dir():
        print(f"sygil-bot: cannot write {args.output}: no folder {args.output.parent}", file=sys.stderr)
        return EXIT_USAGE
    scheduler = args.scheduler or model.scheduler
    if scheduler not in SCHEDULERS:
        print(f"sygil-bot: --scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}", file=sys.stderr)
        return EXIT_USAGE

    from bot.engine import Engine, EngineOptions

    # One image, and no warm-up: compiling would take longer than rendering it uncompiled.
    options = config.engine_options() if config else EngineOptions()
    device, dtype = _resolve_device(model, args.device or model.devices[0])
    engine = Engine.load(
        args.model or model.id,
        device=device,
        dtype=dtype,
        scheduler=scheduler,
        safety_checker=model.safety_checker,
        options=replace(options, compile=False),
        revision=model.revision,
    )
    rules = _rules(config, allow_rating=args.allow_rating)
    verdicts = [
        check_prompt(args.prompt, tokenizer=engine.tokenizer, rules=rules),
        check_prompt(
            args.negative, field_name="negative prompt", tokenizer=engine.tokenizer, rules=rules, allow_empty=True
        ),
    ]
    for verdict in verdicts:
        for warning in verdict.warnings:
            print(f"note: {warning}", file=sys.stderr)
        verdict.raise_for_errors()
    spec = ImageSpec(prompt=verdicts[0].prompt, negative_prompt=verdicts[1].prompt, seed=seed, settings=settings)
    (image,) = engine.render([spec])
    args.output.write_bytes(image.png)
    print(f"wrote {args.output} ({settings.width}x{settings.height}, seed {seed})")
    return 0


def _rules(config: Config | None, *, allow_rating: bool) -> Rules:
    from bot.prompts import Blocklist, Rules

    prompts = config.prompts if config else PromptsConfig()
    return Rules(
        allow_truncation=prompts.allow_truncation, allow_rating=allow_rating, blocklist=Blocklist(prompts.blocklist)
    )


def _prompt_check(args: argparse.Namespace) -> int:
    from bot.prompts import check_prompt, load_tokenizer

    if (args.prompt is None) == (args.file is None):
        print("sygil-bot: give either a PROMPT or --file FILE", file=sys.stderr)
        return EXIT_USAGE
    if args.file is not None:
        try:
            lines = args.file.read_text("utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            print(f"sygil-bot: cannot read {args.file}: {exc}", file=sys.stderr)
            return EXIT_USAGE
        prompts = [line for line in lines if line.strip()]  # blank lines separate prompts; they are none
        if not prompts:
            print(f"sygil-bot: {args.file} holds no prompt (one prompt per line)", file=sys.stderr)
            return EXIT_USAGE
    else:
        prompts = [args.prompt]
    config = Config.load(args.config, require_token=False) if args.config else None
    model = args.model or (config.model.id if config else None)
    tokenizer = load_tokenizer(model, revision=config.model.revision if config else "main")
    rules = _rules(config, allow_rating=args.allow_rating)
    negative = check_prompt(
        args.negative, field_name="negative prompt", tokenizer=tokenizer, rules=rules, allow_empty=True
    )
    refused = False
    for text in prompts:
        verdict = check_prompt(text, tokenizer=tokenizer, rules=rules)
        report = verdict.as_dict()
        report["errors"] += negative.as_dict()["errors"]  # type: ignore[operator]
        report["warnings"] += list(negative.warnings)  # type: ignore[operator]
        report["ok"] = verdict.ok and negative.ok
        refused = refused or not report["ok"]
        print(json.dumps(report, ensure_ascii=False) if args.json else _describe(report))
    return EXIT_REFUSED if refused else 0


def _describe(report: dict[str, Any]) -> str:
    """Render a verdict for people: the verdict line, then tags, errors and notes."""
    lines = [
        f"{'ok' if report['ok'] else 'refused'}: {report['prompt']} ({report['tokens']}/{report['max_tokens']} tokens)"
    ]
    if report["tags"]:
        lines.append("  tags: " + ", ".join(f"{tag['namespace']}:{tag['tag']}" for tag in report["tags"]))
    for error in report["errors"]:
        hint = f" (try {error['suggestion']})" if error["suggestion"] else ""
        lines.append(f"  error [{error['code']}]: {error['message']}{hint}")
    lines.extend(f"  note: {warning}" for warning in report["warnings"])
    return "\n".join(lines)


def _date(text: str) -> float:
    """Read a YYYY-MM-DD date (UTC) as Unix time, for argparse."""
    import datetime

    try:
        day = datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date like 2026-11-30: {text!r}") from None
    return datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.UTC).timestamp()


def _export_feedback(args: argparse.Namespace) -> int:
    import datetime

    from bot.feedback import FORMATS, PARQUET_INSTALL, Filters, ProgressBar, export
    from bot.storage import Database

    if args.min_votes < 0:
        print(f"sygil-bot: --min-votes must be 0 or more, got {args.min_votes}", file=sys.stderr)
        return EXIT_USAGE
    if args.since is not None and args.until is not None and args.since >= args.until:
        since, until = (datetime.datetime.fromtimestamp(day, datetime.UTC).date() for day in (args.since, args.until))
        print(
            f"sygil-bot: --since {since} must be before --until {until} (--since is included, --until is not)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    database = args.database or Config.load(args.config, require_token=False).storage.path
    if not database.exists():
        print(f"sygil-bot: no database at {database} (set --database, or storage.path in the config)", file=sys.stderr)
        return EXIT_USAGE
    to_stdout = str(args.out) == "-"
    if not to_stdout and args.out.is_dir():
        print(f"sygil-bot: --out {args.out} is a folder: name a file, like {args.out / 'votes.jsonl'}", file=sys.stderr)
        return EXIT_USAGE
    if not to_stdout and not args.out.parent.is_dir():
        print(f"sygil-bot: cannot write {args.out}: no folder {args.out.parent}", file=sys.stderr)
        return EXIT_USAGE
    suffix = args.out.suffix.lower().lstrip(".")
    fmt = args.format or (suffix if suffix in FORMATS else "jsonl")
    if fmt == "parquet":
        if to_stdout:
            print("sygil-bot: Parquet needs a file, not standard output: give --out FILE.parquet", file=sys.stderr)
            return EXIT_USAGE
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            print(f"sygil-bot: Parquet needs pyarrow: {PARQUET_INSTALL}", file=sys.stderr)
            return EXIT_USAGE
    filters = Filters(since=args.since, until=args.until, min_votes=args.min_votes, revision=args.revision)
    progress = ProgressBar(sys.stderr) if sys.stderr.isatty() else None

    async def run(out: Any) -> Exported:
        # Read while the bot runs: SQLite's WAL lets this reader see a consistent snapshot beside the writer. Read
        # only: the database may belong to another version of the bot, which alone may migrate it.
        setting = "--database" if args.database else "storage.path"
        async with await Database.open_readonly(database, setting=setting) as db:
            return await export(
                db, out, format=fmt, filters=filters, images=args.images, storage=database.parent, progress=progress
            )

    try:
        if to_stdout:
            exported = asyncio.run(run(sys.stdout))
        else:
            # Written beside and renamed when done: a failed or interrupted export leaves no half file behind.
            partial = args.out.with_name(args.out.name + ".part")
            try:
                opened = partial.open("wb") if fmt == "parquet" else partial.open("w", encoding="utf-8", newline="")
                with opened as out:
                    exported = asyncio.run(run(out))
                partial.replace(args.out)
            finally:
                partial.unlink(missing_ok=True)
    finally:
        if progress is not None:
            progress.close()
    summary = f"wrote {exported.images} images to {args.out} ({fmt})"
    if args.images is not None:
        summary += f"; copied {exported.copied} PNGs to {args.images}"
        if exported.not_kept:
            summary += f", {exported.not_kept} not kept (storage.keep_images was off, or the file is gone)"
        if exported.withheld:
            summary += f", {exported.withheld} left out: deleted by their requester"
    print(summary, file=sys.stderr)
    return 0


def _make_tiny_model(args: argparse.Namespace) -> int:
    from bot.engine import make_tiny_model
    from bot.engine.pipeline import quiet_libraries

    directory: Path = args.directory
    if directory.exists() and not directory.is_dir():
        print(f"sygil-bot: {directory} is a file: make-tiny-model writes a folder; name a new one", file=sys.stderr)
        return EXIT_USAGE
    if directory.is_dir() and any(directory.iterdir()):
        print(
            f"sygil-bot: {directory} is not empty: make-tiny-model writes only into a new or empty folder, so that "
            "it overwrites nothing",
            file=sys.stderr,
        )
        return EXIT_USAGE
    quiet_libraries()
    try:
        make_tiny_model(directory)
    except OSError as exc:
        print(f"sygil-bot: cannot write {directory}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote a tiny random-weights model to {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
