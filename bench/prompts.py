"""Benchmark prompt checking (parse, normalise, namespaces, blocklist, exact CLIP token count); prints JSON.

Prompts are INE-style tag lists drawn from the packaged vocabulary plus free text, with a fixed seed. The
baseline is tokenizing alone with the same tokenizer in the same run, the floor any exact checker pays.

    python bench/prompts.py [--prompts N] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from collections.abc import Callable

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bot.prompts import CONTENT, Blocklist, Rules, check_prompt, load_tokenizer
from bot.prompts.vocabulary import Vocabulary

FREE_TEXT = [
    "a seal resting on a sunny beach",
    "una foca en la playa",
    "海辺のアザラシ",
    "portrait, dramatic lighting, 16:9",
    "(masterpiece:1.2), best quality",
    "cinematic shot at 12:30, https://example.com/ref",
]
BLOCKLIST = [f"blockedterm{i}" for i in range(50)] + ["two word term", "another phrase"]


def make_prompts(count: int, vocabulary: Vocabulary, seed: int = 7) -> list[str]:
    """Return ``count`` prompts of 3 to 14 items: tags from the vocabulary, sometimes free text."""
    rng = random.Random(seed)
    entries = [str(entry) for namespace in ("", *sorted(CONTENT)) for entry in vocabulary.tags(namespace)]
    prompts = []
    for _ in range(count):
        items = rng.sample(entries, rng.randint(3, 14))
        if rng.random() < 0.3:
            items.insert(rng.randrange(len(items) + 1), rng.choice(FREE_TEXT))
        prompts.append(", ".join(items))
    return prompts


def rate(work: Callable[[str], object], prompts: list[str], repeats: int = 3) -> float:
    """Return the best prompts-per-second over ``repeats`` passes."""
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        for prompt in prompts:
            work(prompt)
        best = max(best, len(prompts) / (time.perf_counter() - started))
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description="Benchmark prompt checking; prints JSON.")
    parser.add_argument("--prompts", type=int, default=5000)
    parser.add_argument("--model", default=None, help="take the tokenizer from this model (default: bundled CLIP)")
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.model)
    prompts = make_prompts(args.prompts, Vocabulary.load())
    rules = Rules(blocklist=Blocklist(BLOCKLIST))
    backend = tokenizer.backend_tokenizer  # type: ignore[attr-defined]

    accepted = sum(check_prompt(prompt, tokenizer=tokenizer, rules=rules).ok for prompt in prompts)  # warm-up
    checked = rate(lambda prompt: check_prompt(prompt, tokenizer=tokenizer, rules=rules), prompts)
    tokenized = rate(lambda prompt: backend.encode(prompt, add_special_tokens=False), prompts)
    print(
        json.dumps(
            {
                "benchmark": "prompts",
                "prompts": len(prompts),
                "accepted": accepted,
                "prompts_per_second": round(checked),
                "baseline_tokenize_only_per_second": round(tokenized),
                "ratio_to_baseline": round(checked / tokenized, 3),
                "tokenizer": args.model or "CLIP ViT-L/14 (bundled)",
                "python": platform.python_version(),
                "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
