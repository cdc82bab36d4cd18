"""Load a Stable Diffusion pipeline and make it ready to render.

Owns reading one (a hub id at a revision, or a local folder, in a dtype) with every failure a one-line error;
configuring it on its device (scheduler, attention kernels, fused projections, channels-last, torch.compile and
its cache, the img2img twin sharing its weights); and keeping the libraries' progress bars out of the logs.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers.utils.deprecation_utils
import diffusers.utils.logging
import huggingface_hub.utils
import torch
import torch._dynamo.config
import torch._inductor.config
import torch._inductor.utils
import transformers.utils.logging

# diffusers exports its public names through a lazy module that pyright reads as private imports.
# pyright: reportPrivateImportUsage=false
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)

from bot.engine import hub
from bot.engine.types import EngineOptions
from bot.errors import HubUnreachable, ModelError

log = logging.getLogger(__name__)

SCHEDULERS = ("dpm++", "ddim", "euler-a")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# diffusers 0.42 renamed from_pretrained's torch_dtype to dtype and warns on the old name; releases before the
# rename reject dtype. Where the probe fails, torch_dtype still works there.
_DTYPE_KWARG = "dtype" if hasattr(diffusers.utils.deprecation_utils, "_resolve_dtype") else "torch_dtype"
_MAKE_TINY_HINT = "build a tiny test model with `sygil-bot make-tiny-model DIR`, or check `model.id`"


def quiet_libraries() -> None:
    """Keep the libraries' progress bars (carriage returns and escape codes) and notices out of the logs."""
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    huggingface_hub.utils.disable_progress_bars()


def make_scheduler(name: str, config: Any) -> Any:
    """Return a new scheduler of the named kind built from the model's own scheduler config."""
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "euler-a":
        return EulerAncestralDiscreteScheduler.from_config(config)
    raise ValueError(f"unknown scheduler {name!r}; valid names: {', '.join(SCHEDULERS)}")


def first_line(error: BaseException) -> str:
    """Return the first line of an exception's message, for one-line user-facing errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _root_line(error: BaseException) -> str:
    """Return the first line of an error, or of its cause where it only points at a traceback nobody sees."""
    line = first_line(error)
    cause = error.__cause__ or error.__context__
    if cause is not None and "stacktrace above" in line:
        return _root_line(cause)
    return line


def _looks_like_path(model_id: str) -> bool:
    """Tell a local folder from a hub id ("owner/name") when nothing exists at that path."""
    path = Path(model_id)
    return path.is_absolute() or model_id.startswith((".", "~")) or "\\" in model_id or len(path.parts) > 2


def load_pipeline(
    model_id: str, torch_dtype: torch.dtype, safety_checker: bool, revision: str
) -> StableDiffusionPipeline:
    """Load the txt2img pipeline, turning every way it can fail into a one-line ModelError."""
    local = Path(model_id).expanduser()
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise ModelError(
                f"Model {model_id!r} is not a diffusers model folder (no model_index.json); {_MAKE_TINY_HINT}."
            )
        source = str(local)
    elif _looks_like_path(model_id):
        raise ModelError(f"Model folder {model_id!r} does not exist; {_MAKE_TINY_HINT}.")
    else:
        source = model_id

    kwargs: dict[str, Any] = {_DTYPE_KWARG: torch_dtype}
    if source == model_id:  # a hub id: the branch, tag or commit to load
        kwargs["revision"] = revision
    if not safety_checker:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(source, **kwargs)
    # Any failure inside from_pretrained (missing files, corrupt weights, no network) means this model id is
    # unusable as configured; the user gets one line and the log keeps the chained cause.
    except Exception as error:
        if source == model_id and hub.unreachable(error) and not hub.cached(model_id, "model_index.json", revision):
            raise HubUnreachable(
                f"Model {model_id!r}: {hub.not_cached_text()}. {hub.download_hint()} "
                "(a tiny test model: `sygil-bot make-tiny-model DIR`)."
            ) from error
        raise ModelError(f"Could not load model {model_id!r}: {_root_line(error)}; {_MAKE_TINY_HINT}.") from error
    if not isinstance(pipe, StableDiffusionPipeline):
        raise ModelError(f"Model {model_id!r} is a {type(pipe).__name__}, not a Stable Diffusion pipeline.")
    return pipe


def use_compile_cache(folder: str) -> Path:
    """Keep inductor's kernels and FX graphs in folder, so a restarted worker loads them instead of compiling."""
    path = Path(folder).expanduser().resolve()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)  # beside the database, and as private as it
    # torch 2.13 reads TORCHINDUCTOR_CACHE_DIR each time it needs the folder (cache_dir_utils.cache_dir), so
    # setting it after importing torch works; clear_caches drops the few paths memoised by an earlier compile.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    torch._inductor.config.fx_graph_cache = True
    torch._inductor.utils.clear_caches()
    return path


def set_attention(pipe: StableDiffusionPipeline, attention: str, device: str) -> str:
    """Install the requested attention kernels and return the ones in effect."""
    if attention == "slicing":
        heads = pipe.unet.config["attention_head_dim"]
        # "auto" halves each attention's heads, which leaves zero of a single head (the tiny test model has one).
        single_head = min(heads if isinstance(heads, list | tuple) else [heads]) < 2
        pipe.enable_attention_slicing("max" if single_head else "auto")
        return "slicing"
    if attention == "xformers":
        if not device.startswith("cuda"):
            log.warning("attention = xformers needs a CUDA device, not %s; using PyTorch attention (sdpa)", device)
            return "sdpa"
        if importlib.util.find_spec("xformers") is None:
            log.warning("attention = xformers, but xformers is not installed; using PyTorch attention (sdpa)")
            return "sdpa"
        try:
            pipe.enable_xformers_memory_efficient_attention()
        # An xformers wheel built for another torch fails here; PyTorch's own attention still works.
        except Exception as error:
            log.warning("xformers is installed but unusable, using PyTorch attention (sdpa): %s", first_line(error))
            return "sdpa"
        return "xformers"
    return "sdpa"


@dataclass(frozen=True, slots=True)
class Modules:
    """A UNet and a VAE decoder: the pipeline's own, or their compiled versions swapped in for warmed shapes."""

    unet: Any
    decoder: Any


@dataclass(frozen=True, slots=True)
class Configured:
    """A pipeline on its device, ready to render: its img2img twin, compiled modules and the options in effect."""

    pipe: StableDiffusionPipeline
    img2img: StableDiffusionImg2ImgPipeline
    effective: dict[str, object]
    compiled: Modules | None


def configure(
    pipe: StableDiffusionPipeline, *, model_id: str, device: str, scheduler: str, options: EngineOptions
) -> Configured:
    """Put a loaded pipeline on the device with the named scheduler, attention and compile options."""
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    try:
        pipe = pipe.to(device)
    except (RuntimeError, AssertionError, ValueError) as error:
        raise ModelError(f"Cannot put model {model_id!r} on device {device!r}: {first_line(error)}") from error
    attention = set_attention(pipe, options.attention, device)
    # Fused projections live in diffusers' own SDPA processor; xformers and slicing install others over it.
    fused_qkv = options.fused_qkv and attention == "sdpa"
    if fused_qkv:
        pipe.fuse_qkv_projections()
    if options.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    pipe.set_progress_bar_config(disable=True)

    compiled: Modules | None = None
    cuda_graphs = options.compile and options.cuda_graphs and device.startswith("cuda")
    if options.compile:
        if options.compile_cache is not None:
            use_compile_cache(options.compile_cache)
        # Each warm (batch, size) is its own static graph, for txt2img and img2img (whose latents may come
        # out of the VAE encoder in another memory layout): allow that many before dynamo gives up.
        shapes = len(options.warmup_batches) * len(options.warmup_sizes) * 2
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, shapes + 8)
        mode = "reduce-overhead" if cuda_graphs else None
        # dynamic=False: a shape not warmed must never be compiled as a dynamic graph behind a request.
        compiled = Modules(
            unet=torch.compile(pipe.unet, mode=mode, fullgraph=True, dynamic=False),
            decoder=torch.compile(pipe.vae.decoder, mode=mode, fullgraph=True, dynamic=False),
        )

    # Built from the same components, so both pipelines share one copy of the weights.
    img2img = StableDiffusionImg2ImgPipeline(
        **pipe.components, requires_safety_checker=bool(pipe.config.get("requires_safety_checker", False))
    )
    img2img.set_progress_bar_config(disable=True)
    effective: dict[str, object] = {
        "compile": options.compile,
        "cuda_graphs": cuda_graphs,
        "channels_last": options.channels_last,
        "fused_qkv": fused_qkv,
        "attention": attention,
    }
    if attention != options.attention:
        effective["attention_requested"] = options.attention
    return Configured(pipe=pipe, img2img=img2img, effective=effective, compiled=compiled)
