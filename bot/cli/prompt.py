"""``sygil-bot prompt check``: check prompts against the tag language and the token budget, as /imagine would.

Also owns the prompt rules a local command checks with (``prompt_rules``), which ``sygil-bot imagine`` shares.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.cli import EXIT_REFUSED, Commands, usage
from bot.config import Config, PromptsConfig

if TYPE_CHECKING:
    from bot.prompts import Rules


def add_parser(commands: Commands) -> None:
    """Add ``prompt check`` to the command line."""
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
    check.set_defaults(handler=_check)


def prompt_rules(config: Config | None, *, allow_rating: bool) -> Rules:
    """Return the prompt rules of the config (the defaults without one), as in a channel that allows rating or not."""
    from bot.prompts import Blocklist, Rules

    prompts = config.prompts if config else PromptsConfig()
    return Rules(
        allow_truncation=prompts.allow_truncation, allow_rating=allow_rating, blocklist=Blocklist(prompts.blocklist)
    )


def _check(args: argparse.Namespace) -> int:
    from bot.prompts import check_prompt, load_tokenizer

    if (args.prompt is None) == (args.file is None):
        return usage("give either a PROMPT or --file FILE")
    if args.file is not None:
        try:
            lines = args.file.read_text("utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            return usage(f"cannot read {args.file}: {exc}")
        prompts = [line for line in lines if line.strip()]  # blank lines separate prompts; they are none
        if not prompts:
            return usage(f"{args.file} holds no prompt (one prompt per line)")
    else:
        prompts = [args.prompt]
    config = Config.load(args.config, require_token=False) if args.config else None
    model = args.model or (config.model.id if config else None)
    tokenizer = load_tokenizer(model, revision=config.model.revision if config else "main")
    rules = prompt_rules(config, allow_rating=args.allow_rating)
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
