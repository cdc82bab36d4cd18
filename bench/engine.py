"""Benchmark rendering: one request per GPU call against the bot's scheduler and GPU worker process; prints JSON.

The model is SD 1.5-shaped (``bench/sd15-configs``, the shapes of Sygil Diffusion) with random weights, which
render exactly as fast as real ones; it is written to a folder once and every worker loads it from there, as the
bot loads a real model. In one run, for the same model:

(a) the baseline: one ``pipe()`` call per request, one request after another, in this process, with no speed
    setting on (what a one-request-at-a-time bot does);
(b) the bot: the scheduler and a GPU worker process serving ``--users`` users who submit one image each at once;
(c) a lone request's latency, from submit to PNG bytes, through the same scheduler and worker.

(b) and (c) run for each engine setting in ``--configs`` (each starts a fresh worker, warmed up as the bot warms
it): images/s and the ratio to (a), p50/p95 latency of the users' requests, the batch sizes the scheduler formed,
warm-up time, peak GPU memory, and the fraction of the FLOP limit reached (one CFG image-step at 512x512 costs
1.61 TFLOP in the SD 1.5 UNet; ``--peak-tflops`` is the card's dense fp16 rate, ~790 measured on H100/H200).

(d) live previews: (b) again with the first of ``--configs``, previews off and then with each decoder in
``--previews`` (a frame every ``--preview-every`` steps of every job's image, as the scheduler asks for them, at
most one per ``--preview-interval`` seconds: 0, the default, is the worst case), in ``--preview-rounds`` rounds of
all of them one after another in this run; each setting's best round, and its ratio to the best with previews off.
The TAESD is the tiny model's with ``--tiny``, else one with TAESD's real shapes and random weights (it decodes
exactly as fast as the real one).

    python bench/engine.py --device cuda --dtype float16 --users 16         # every setting, on a GPU
    python bench/engine.py --device cuda --configs eager,tuned,compiled     # a subset
    python bench/engine.py --tiny --steps 2 --users 3 --configs eager,tuned # the tiny test model, a CPU smoke run

``--profile tuned`` adds one batch of ``--max-batch`` images profiled in this process: each stage's time, and the
denoising's kernels (the busy fraction of the GPU, the ops that cost most).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from bot.engine import Engine, EngineOptions, ImageSpec, Settings, make_tiny_model
from bot.engine.process import WorkerProcess
from bot.engine.protocol import PreviewOptions, WorkerSettings
from bot.scheduler import Scheduler
from bot.scheduler.batches import Batch

# pyright: reportPrivateImportUsage=false

CONFIGS = Path(__file__).parent / "sd15-configs"
PROMPTS = ["species:seal, beach", "studio:dc, city at night", "species:fox, forest, medium:watercolor"]
TFLOP_PER_CFG_STEP_512 = 1.61  # SD 1.5 UNet, one image, both halves of classifier-free guidance
PEAK_TFLOPS = {"H100": 790.0, "H200": 790.0}  # dense fp16/bf16 matrix rate measured on these cards

# Engine settings measured on and off. "eager" has every speed setting off; the others add to it.
ENGINE_CONFIGS: dict[str, dict[str, Any]] = {
    "eager": {"channels_last": False, "fused_qkv": False},
    "channels_last": {"channels_last": True, "fused_qkv": False},
    "fused_qkv": {"channels_last": False, "fused_qkv": True},
    "tuned": {"channels_last": True, "fused_qkv": True},  # the bot's defaults
    "compiled": {"channels_last": True, "fused_qkv": True, "compile": True},
    "compiled_cuda_graphs": {"channels_last": True, "fused_qkv": True, "compile": True, "cuda_graphs": True},
}


@dataclass(frozen=True, slots=True)
class Run:
    """One engine setting served through the scheduler and a worker process."""

    name: str
    engine: dict[str, Any]  # what the worker reported: each setting's effective state, the warmed shapes
    warm_up_seconds: float
    images_per_second: float
    latency_p50_s: float
    latency_p95_s: float
    lone_latency_p50_s: float
    lone_latency_p95_s: float
    batches: list[int]
    peak_memory_gib: float | None


def write_sd15_model(folder: Path, dtype: torch.dtype) -> None:
    """Write an SD 1.5-shaped pipeline with random weights to ``folder``, as a model on disk is laid out."""
    from diffusers import AutoencoderKL, AutoencoderTiny, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from bot.engine._tokenizer import write_clip_tokenizer

    def config(name: str) -> dict[str, Any]:
        data = json.loads(
            (CONFIGS / name / ("config.json" if name != "scheduler" else "scheduler_config.json")).read_text()
        )
        return {key: value for key, value in data.items() if not key.startswith("_")}

    torch.manual_seed(0)
    taesd = AutoencoderTiny()  # TAESD's shapes are the class's defaults
    torch.nn.Module.to(taesd, dtype=dtype)  # diffusers wraps ModelMixin.to in a way pyright misreads
    taesd.save_pretrained(folder / "taesd")
    unet = cast(UNet2DConditionModel, UNet2DConditionModel.from_config(config("unet")))
    vae = cast(AutoencoderKL, AutoencoderKL.from_config(config("vae")))
    text = {key: value for key, value in config("text_encoder").items() if key != "architectures"}
    text_encoder = CLIPTextModel(CLIPTextConfig(**text))
    with tempfile.TemporaryDirectory() as vocabulary:
        write_clip_tokenizer(Path(vocabulary))
        tokenizer = CLIPTokenizer.from_pretrained(vocabulary)
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
    pipe.save_pretrained(folder)


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
    engine.render(images[:1])  # warm-up: kernels, allocator, caches
    synchronize()
    started = time.perf_counter()
    for spec in images:
        engine.render([spec])
    synchronize()
    return len(images) / (time.perf_counter() - started)


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def serve(name: str, settings: WorkerSettings, images: Sequence[ImageSpec], max_batch: int, lone: int) -> Run:
    """Serve the users through the scheduler and one worker process with these engine settings."""
    batches: list[Batch] = []
    async with (
        WorkerProcess(settings, name=name) as worker,
        Scheduler(
            workers=[worker], max_batch=max_batch, max_queue=len(images) + lone, on_batch=batches.append
        ) as scheduler,
    ):
        assert worker.hello is not None
        hello = worker.hello
        # One burst first, so the allocator and every batch size the scheduler forms are warm.
        warm = [
            scheduler.submit(job_id=-1 - i, user_id=-1 - i, guild_id=None, specs=[spec])
            for i, spec in enumerate(images)
        ]
        await asyncio.gather(*(ticket.result for ticket in warm))
        batches.clear()

        async def one(job_id: int, spec: ImageSpec) -> float:
            submitted = time.perf_counter()
            await scheduler.submit(job_id=job_id, user_id=job_id, guild_id=None, specs=[spec]).result
            return time.perf_counter() - submitted

        started = time.perf_counter()
        latencies = await asyncio.gather(*(one(i, spec) for i, spec in enumerate(images)))
        seconds = time.perf_counter() - started
        burst = [batch.images for batch in batches]
        lone_latencies = [await one(len(images) + i, images[i % len(images)]) for i in range(lone)]
        peak = worker.peak_memory
    return Run(
        name=name,
        engine=dict(hello.engine),
        warm_up_seconds=round(hello.warmup_seconds, 2),
        images_per_second=round(len(images) / seconds, 3),
        latency_p50_s=round(statistics.median(latencies), 3),
        latency_p95_s=round(percentile(latencies, 0.95), 3),
        lone_latency_p50_s=round(statistics.median(lone_latencies), 3),
        lone_latency_p95_s=round(percentile(lone_latencies, 0.95), 3),
        batches=burst,
        peak_memory_gib=round(peak / 2**30, 2) if peak is not None else None,
    )


def profile(engine: Engine, images: Sequence[ImageSpec]) -> dict[str, Any]:
    """Time one batch's stages and profile its denoising: where the time between the figure and the limit goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    engine.render(images)  # warm
    stages: dict[str, float] = {}
    synchronize()
    started = time.perf_counter()
    prepared = engine.prepare(images)
    synchronize()
    stages["prepare_s"] = time.perf_counter() - started
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profiler(activities=activities) as trace:
        started = time.perf_counter()
        decoded = engine.denoise(prepared)
        synchronize()
        stages["denoise_s"] = time.perf_counter() - started
    started = time.perf_counter()
    engine.finish(decoded)
    stages["finish_s"] = time.perf_counter() - started
    events = trace.key_averages()
    on_gpu = torch.cuda.is_available()

    def spent(event: Any) -> float:
        return (event.self_device_time_total if on_gpu else event.self_cpu_time_total) / 1e6

    busy = sum(spent(event) for event in events)
    top = sorted(events, key=spent, reverse=True)[:10]
    return {
        "images": len(images),
        **{key: round(value, 4) for key, value in stages.items()},
        "kernel_seconds_in_denoise": round(busy, 4),
        # On a GPU: the share of denoising time the GPU spent in kernels; the rest is launch gaps and syncs.
        "busy_fraction_of_denoise": round(busy / stages["denoise_s"], 3) if on_gpu else None,
        "top_ops": [{"op": event.key, "seconds": round(spent(event), 4), "calls": event.count} for event in top],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description="Benchmark rendering throughput; prints JSON.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--scheduler", default="dpm++")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--users", type=int, default=16, help="requests submitted at once, one image each")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--lone", type=int, default=10, help="lone requests timed one after another")
    parser.add_argument(
        "--configs",
        default=None,
        help=f"engine settings to measure, of {', '.join(ENGINE_CONFIGS)} (default: all on a GPU; on a CPU all but "
        "the compiled ones, whose inductor compile takes many minutes there)",
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense fp16 TFLOP/s")
    parser.add_argument("--tiny", action="store_true", help="use the tiny test model at 64 px (a CPU smoke run)")
    parser.add_argument("--profile", default=None, help="also profile one batch of max_batch with this setting")
    parser.add_argument(
        "--previews", default="latent2rgb,taesd", help="preview decoders to measure against previews off; empty: none"
    )
    parser.add_argument("--preview-every", type=int, default=5, help="steps between preview frames")
    parser.add_argument("--preview-interval", type=float, default=0.0, help="seconds between frames, at least")
    parser.add_argument("--preview-rounds", type=int, default=3, help="rounds of every preview setting; best counts")
    args = parser.parse_args()
    if args.configs is None:
        on_gpu = args.device.startswith("cuda")
        args.configs = ",".join(name for name in ENGINE_CONFIGS if on_gpu or not name.startswith("compiled"))
    names = [name.strip() for name in args.configs.split(",") if name.strip()]
    unknown = [name for name in [*names, args.profile or "eager"] if name not in ENGINE_CONFIGS]
    if unknown:
        parser.error(f"unknown --configs {', '.join(unknown)}; valid: {', '.join(ENGINE_CONFIGS)}")

    folder = Path(tempfile.mkdtemp(prefix="sygil-bench-model-"))
    try:
        if args.tiny:
            make_tiny_model(folder)
            size, dtype = 64, "float32"
        else:
            write_sd15_model(folder, getattr(torch, args.dtype))
            size, dtype = args.size, args.dtype
        settings = Settings(steps=args.steps, width=size, height=size)
        images = specs(args.users, settings)
        device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"

        plain = EngineOptions(channels_last=False, fused_qkv=False, warmup_batches=(1,), warmup_sizes=((size, size),))
        engine = Engine.load(str(folder), device=args.device, dtype=dtype, scheduler=args.scheduler, options=plain)
        baseline = one_per_call(engine, images)
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

        # The sizes this run forms: a lone request and full batches (a partial batch would run uncompiled). Each
        # compiled shape costs a minute or so of warm-up on a GPU, which a lent GPU's minutes cannot spare.
        batch_sizes = tuple(sorted({1, args.max_batch}))

        def worker_settings(name: str, preview: PreviewOptions | None = None) -> WorkerSettings:
            options = EngineOptions(
                **ENGINE_CONFIGS[name],
                warmup_batches=batch_sizes,
                warmup_sizes=((size, size),),
                compile_cache=str(folder / "compile-cache"),
            )
            return WorkerSettings(
                model_id=str(folder),
                device=args.device,
                dtype=dtype,
                scheduler=args.scheduler,
                safety_checker=False,
                options=options,
                preview=preview,
            )

        runs: list[Run] = []
        for name in names:
            runs.append(asyncio.run(serve(name, worker_settings(name), images, args.max_batch, args.lone)))
        previews = None
        decoders = [name.strip() for name in args.previews.split(",") if name.strip()]
        if decoders:
            name = names[0]
            # Rounds of off, then each decoder, one after another: whatever else the machine does then (a shared
            # CPU) falls on every setting alike, and each setting's best round is its figure.
            rounds: dict[str, list[Run]] = {decoder: [] for decoder in ["off", *decoders]}
            for _ in range(args.preview_rounds):
                for decoder, runs_of in rounds.items():
                    preview = None
                    if decoder != "off":
                        preview = PreviewOptions(
                            decoder=decoder,
                            taesd=str(folder / "taesd"),
                            every=args.preview_every,
                            min_interval=args.preview_interval,
                        )
                    worker = worker_settings(name, preview)
                    runs_of.append(asyncio.run(serve(f"{name}+{decoder}", worker, images, args.max_batch, args.lone)))
            off = max(run.images_per_second for run in rounds["off"])
            measured: list[dict[str, Any]] = []
            for decoder, runs_of in rounds.items():
                best_round = max(runs_of, key=lambda run: run.images_per_second)
                measured.append(
                    {
                        "decoder": decoder,
                        "images_per_second": best_round.images_per_second,
                        "ratio_to_off": round(best_round.images_per_second / off, 3),
                        "rounds_images_per_second": [run.images_per_second for run in runs_of],
                        "latency_p50_s": best_round.latency_p50_s,
                        "lone_latency_p50_s": best_round.lone_latency_p50_s,
                        "batches": best_round.batches,
                    }
                )
            previews = {
                "config": name,
                "every": args.preview_every,
                "min_interval": args.preview_interval,
                "rounds": args.preview_rounds,
                "runs": measured,
            }
        profiled = None
        if args.profile:
            options = EngineOptions(
                **ENGINE_CONFIGS[args.profile], warmup_batches=(args.max_batch,), warmup_sizes=((size, size),)
            )
            engine = Engine.load(
                str(folder), device=args.device, dtype=dtype, scheduler=args.scheduler, options=options
            )
            engine.warm_up()
            profiled = {"config": args.profile, **profile(engine, images[: args.max_batch])}
            del engine
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)
    limit = None
    if peak is not None and not args.tiny:
        limit = peak / (TFLOP_PER_CFG_STEP_512 * (size * size) / (512 * 512) * args.steps)
    best = max(runs, key=lambda run: run.images_per_second)
    report = {
        "benchmark": "engine",
        "model": "tiny" if args.tiny else "sd15-shaped, random weights",
        "device": device_name,
        "dtype": dtype,
        "scheduler": args.scheduler,
        "steps": args.steps,
        "size": f"{size}x{size}",
        "users": args.users,
        "max_batch": args.max_batch,
        "baseline_one_per_call_images_per_second": round(baseline, 3),
        "flop_limit_images_per_second": round(limit, 2) if limit is not None else None,
        "configs": [
            {
                **asdict(run),
                "ratio_to_baseline": round(run.images_per_second / baseline, 2),
                "fraction_of_flop_limit": round(run.images_per_second / limit, 3) if limit else None,
            }
            for run in runs
        ],
        "best": best.name,
        "best_images_per_second": best.images_per_second,
        "best_ratio_to_baseline": round(best.images_per_second / baseline, 2),
        "previews": previews,
        "profile": profiled,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
