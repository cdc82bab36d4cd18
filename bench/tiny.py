"""How fast the tiny test model renders one image on this machine, the figure the README quotes; prints JSON.

The model is built on the spot (``sygil-bot make-tiny-model``); each size renders once to warm up, then ``--runs``
times with the model loaded, one image of 25 steps (dpm++) per call, as ``sygil-bot imagine`` renders it.

    python bench/tiny.py [--runs N] [--sizes 64,512]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bot.engine.pipeline import Engine, quiet_libraries
from bot.engine.tiny import make_tiny_model
from bot.engine.types import ImageSpec, Settings


def main() -> None:
    parser = argparse.ArgumentParser(description="How fast the tiny test model renders one image here.")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sizes", default="64,512", help="square sizes, comma-separated")
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()

    quiet_libraries()
    with tempfile.TemporaryDirectory() as folder:
        make_tiny_model(Path(folder) / "tiny")
        engine = Engine.load(str(Path(folder) / "tiny"))
        sizes = []
        for size in (int(text) for text in args.sizes.split(",")):
            spec = ImageSpec("species:seal", "", 1, Settings(steps=args.steps, width=size, height=size))
            engine.render([spec])
            seconds = []
            for _ in range(args.runs):
                start = time.perf_counter()
                engine.render([spec])
                seconds.append(time.perf_counter() - start)
            sizes.append({
                "size": size, "steps": args.steps, "runs": args.runs,
                "median_s": round(statistics.median(seconds), 3),
                "min_s": round(min(seconds), 3), "max_s": round(max(seconds), 3),
            })  # fmt: skip
    json.dump(
        {"benchmark": "tiny", "cpus": os.cpu_count(), "machine": platform.machine(), "renders": sizes}, sys.stdout
    )
    print()


if __name__ == "__main__":
    main()
