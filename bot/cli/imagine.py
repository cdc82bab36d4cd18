"""``sygil-bot imagine``: render one prompt to a PNG file in this process, without Discord."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from bot.cli import Commands, usage
from bot.cli.devices import resolve_device
from bot.cli.prompt import prompt_rules
from bot.config import SCHEDULERS, Config, ModelConfig


def add_parser(commands: Commands) -> None:
    """Add ``imagine`` to the command line."""
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
        return usage(str(exc))
    seed = random_seed() if args.seed is None else args.seed
    if not 0 <= seed <= MAX_SEED:
        return usage(f"--seed must be between 0 and {MAX_SEED}, got {seed}")
    if not args.output.parent.is_dir():
        return usage(f"cannot write {args.output}: no folder {args.output.parent}")
    scheduler = args.scheduler or model.scheduler
    if scheduler not in SCHEDULERS:
        return usage(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")

    from bot.engine import Engine, EngineOptions

    # One image, and no warm-up: compiling would take longer than rendering it uncompiled.
    options = config.engine_options() if config else EngineOptions()
    device, dtype = resolve_device(model, args.device or model.devices[0])
    engine = Engine.load(
        args.model or model.id,
        device=device,
        dtype=dtype,
        scheduler=scheduler,
        safety_checker=model.safety_checker,
        options=replace(options, compile=False),
        revision=model.revision,
    )
    rules = prompt_rules(config, allow_rating=args.allow_rating)
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
