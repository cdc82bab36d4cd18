"""Benchmark rendering throughput: one request per GPU call against the scheduler batching many users; prints JSON.

The model is SD 1.5-shaped (``bench/sd15-configs``, the shapes of Sygil Diffusion) with random weights, which
render exactly as fast as real ones. The baseline, one prompt per ``pipe()`` call as a one-request-at-a-time
bot does, runs in the same process as the batched runs, and the ratios compare them.

    python bench/engine.py --device cuda --dtype float16           # the real shapes, on a GPU
    python bench/engine.py --tiny --steps 2 --users 3               # the tiny test model, a smoke run on a CPU
    python bench/engine.py --device cuda --compile --cuda-graphs    # compiled (warm-up compiles every batch size)
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from bot.engine import Engine, EngineOptions, ImageSpec, Settings, make_tiny_model
from bot.scheduler import Batch, Scheduler

# pyright: reportPrivateImportUsage=false

CONFIGS = Path(__file__).parent / "sd15-configs"
PROMPTS = ["species:seal, beach", "studio:dc, city at night", "species:fox, forest, medium:watercolor"]


def sd15_engine(device: str, dtype: torch.dtype, scheduler: str, options: EngineOptions) -> Engine:
    """Build an SD 1.5-shaped pipeline with random weights on ``device``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from bot.engine._tokenizer import write_clip_tokenizer

    def config(name: str) -> dict[str, Any]:
        data = json.loads(
            (CONFIGS / name / ("config.json" if name != "scheduler" else "scheduler_config.json")).read_text()
        )
        return {key: value for key, value in data.items() if not key.startswith("_")}

    torch.manual_seed(0)
    with torch.device(device):
        unet = cast(UNet2DConditionModel, UNet2DConditionModel.from_config(config("unet")))
        vae = cast(AutoencoderKL, AutoencoderKL.from_config(config("vae")))
        text = {key: value for key, value in config("text_encoder").items() if key != "architectures"}
        text_encoder = CLIPTextModel(CLIPTextConfig(**text))
    with tempfile.TemporaryDirectory() as folder:
        write_clip_tokenizer(Path(folder))
        tokenizer = CLIPTokenizer.from_pretrained(folder)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler.from_config(config("scheduler")),  # pyright: ignore[reportArgumentType]
        safety_checker=None,  # pyright: ignore[reportArgumentType]
        feature_extractor=None,  # pyright: ignore[reportArgumentType]
        requires_safety_checker=False,
    ).to(dtype=dtype)
    return Engine.from_pipeline(pipe, model_id="sd15-random", device=device, scheduler=scheduler, options=options)


def specs(count: int, settings: Settings, seed: int = 0) -> list[ImageSpec]:
    return [
        ImageSpec(prompt=PROMPTS[i % len(PROMPTS)], negative_prompt="blurry", seed=seed + i, settings=settings)
        for i in range(count)
    ]


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def one_per_call(engine: Engine, images: Sequence[ImageSpec]) -> float:
    """Render each image in its own call, as a one-request-at-a-time bot does; return images per second."""
    synchronize()
    started = time.perf_counter()
    for spec in images:
        engine.render([spec])
    synchronize()
    return len(images) / (time.perf_counter() - started)


def one_call(engine: Engine, images: Sequence[ImageSpec]) -> float:
    """Render every image in one call; return images per second."""
    synchronize()
    started = time.perf_counter()
    engine.render(images)
    synchronize()
    return len(images) / (time.perf_counter() - started)


def in_thread(engine: Engine, images: Sequence[ImageSpec], *, progress: bool) -> float:
    """Render every image in one call on another thread, with or without a per-step callback; images/s."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(engine.render, images[:1]).result()  # this thread's first GPU call sets up its handles
        synchronize()
        started = time.perf_counter()
        pool.submit(engine.render, images, (lambda step, total: None) if progress else None).result()
        synchronize()
        return len(images) / (time.perf_counter() - started)


async def through_scheduler(engine: Engine, images: Sequence[ImageSpec], max_batch: int) -> tuple[float, list[int]]:
    """Submit one image per user, all at once, through the bot's scheduler; return images/s and batch sizes."""
    batches: list[Batch] = []
    async with Scheduler(engine.render, max_batch=max_batch, max_queue=len(images), on_batch=batches.append) as sched:
        started = time.perf_counter()
        tickets = [sched.submit(job_id=i, user_id=i, guild_id=None, specs=[spec]) for i, spec in enumerate(images)]
        await asyncio.gather(*(ticket.result for ticket in tickets))
        synchronize()
        seconds = time.perf_counter() - started
    return len(images) / seconds, [batch.images for batch in batches]


def png_milliseconds(size: int, repeats: int = 8) -> float:
    """Return how long encoding one noisy size x size PNG takes (the engine does it after every batch)."""
    import io

    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    started = time.perf_counter()
    for _ in range(repeats):
        image.save(io.BytesIO(), format="PNG")
    return (time.perf_counter() - started) / repeats * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description="Benchmark rendering throughput; prints JSON.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--scheduler", default="dpm++")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--users", type=int, default=8, help="requests submitted at once, one image each")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="use the tiny test model at 64 px (a CPU smoke run)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet and VAE decoder")
    parser.add_argument("--cuda-graphs", action="store_true", help="with --compile: CUDA graphs (reduce-overhead)")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--no-fused-qkv", action="store_true")
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "xformers", "slicing"])
    parser.add_argument("--compile-cache", default=None, help="folder for compiled kernels, warm across runs")
    args = parser.parse_args()

    size = 64 if args.tiny else args.size
    # Every batch size the scheduler may form: the one-per-call baseline, the scheduler's partial batches, max_batch.
    batches = tuple(range(1, args.max_batch + 1))
    options = EngineOptions(
        compile=args.compile,
        cuda_graphs=args.cuda_graphs,
        channels_last=not args.no_channels_last,
        fused_qkv=not args.no_fused_qkv,
        attention=args.attention,
        warmup_batches=batches,
        warmup_sizes=((size, size),),
        compile_cache=args.compile_cache,
    )
    if args.tiny:
        folder = tempfile.mkdtemp(prefix="sygil-tiny-")
        make_tiny_model(Path(folder))
        engine = Engine.load(folder, device=args.device, dtype="float32", scheduler=args.scheduler, options=options)
        dtype = "float32"
    else:
        engine = sd15_engine(args.device, getattr(torch, args.dtype), args.scheduler, options)
        dtype = args.dtype
    warm_up_seconds = engine.warm_up()
    settings = Settings(steps=args.steps, width=size, height=size)
    images = specs(args.users, settings)

    one_call(engine, images[: min(len(images), args.max_batch)])  # warm-up: kernels, allocator, caches
    # The scheduler renders on its own thread, whose first GPU call sets up per-thread handles: warm that too.
    asyncio.run(through_scheduler(engine, images[:1], args.max_batch))
    baseline = one_per_call(engine, images)
    batched = one_call(engine, images[: args.max_batch])
    scheduled, batch_sizes = asyncio.run(through_scheduler(engine, images, args.max_batch))
    png_ms = png_milliseconds(size)
    # Where the scheduler's cost against one call comes from: another thread, or the per-step progress callback.
    threaded = in_thread(engine, images[: args.max_batch], progress=False)
    threaded_progress = in_thread(engine, images[: args.max_batch], progress=True)
    report = {
        "benchmark": "engine",
        "model": "tiny" if args.tiny else "sd15-shaped, random weights",
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "dtype": dtype,
        "scheduler": args.scheduler,
        "steps": args.steps,
        "size": f"{size}x{size}",
        "users": args.users,
        "max_batch": args.max_batch,
        "baseline_one_per_call_images_per_second": round(baseline, 3),
        "one_call_images_per_second": round(batched, 3),
        "scheduler_images_per_second": round(scheduled, 3),
        "scheduler_batches": batch_sizes,
        "ratio_scheduler_to_baseline": round(scheduled / baseline, 2),
        "ratio_scheduler_to_one_call": round(scheduled / batched, 3),
        "png_encode_ms_per_image": round(png_ms, 1),
        "other_thread_images_per_second": round(threaded, 3),
        "other_thread_with_progress_images_per_second": round(threaded_progress, 3),
        "warm_up_seconds": round(warm_up_seconds, 2),
        "engine": engine.describe(),
        "peak_memory_bytes": engine.peak_memory(),
        "torch": torch.__version__,
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
