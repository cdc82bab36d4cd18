"""Drive diffusers: load one Stable Diffusion pipeline and render a batch of ImageSpecs into PNG bytes."""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib.util
import io
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import diffusers.utils.deprecation_utils
import diffusers.utils.logging
import huggingface_hub.utils
import numpy as np
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
from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo
from transformers import CLIPTokenizer

from bot.engine import hub
from bot.engine.revision import folder_revision, snapshot_revision
from bot.engine.types import EngineOptions, ImageSpec, Mode, RenderedImage, Settings
from bot.errors import HubUnreachable, ModelError, OutOfMemory
from bot.prompts.tokens import count_tokens

log = logging.getLogger(__name__)

SCHEDULERS = ("dpm++", "ddim", "euler-a")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# diffusers 0.42 renamed from_pretrained's torch_dtype to dtype and warns on the old name; releases before the
# rename reject dtype. Where the probe fails, torch_dtype still works there.
_DTYPE_KWARG = "dtype" if hasattr(diffusers.utils.deprecation_utils, "_resolve_dtype") else "torch_dtype"
DEFAULT_OPTIONS = EngineOptions()
_MAKE_TINY_HINT = "build a tiny test model with `sygil-bot make-tiny-model DIR`, or check `model.id`"


def quiet_libraries() -> None:
    """Keep the libraries' progress bars (carriage returns and escape codes) and notices out of the logs."""
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    huggingface_hub.utils.disable_progress_bars()


def _make_scheduler(name: str, config: Any) -> Any:
    """Return a new scheduler of the named kind built from the model's own scheduler config."""
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "euler-a":
        return EulerAncestralDiscreteScheduler.from_config(config)
    raise ValueError(f"unknown scheduler {name!r}; valid names: {', '.join(SCHEDULERS)}")


def _first_line(error: BaseException) -> str:
    """Return the first line of an exception's message, for one-line user-facing errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _root_line(error: BaseException) -> str:
    """Return the first line of an error, or of its cause where it only points at a traceback nobody sees."""
    line = _first_line(error)
    cause = error.__cause__ or error.__context__
    if cause is not None and "stacktrace above" in line:
        return _root_line(cause)
    return line


def _looks_like_path(model_id: str) -> bool:
    """Tell a local folder from a hub id ("owner/name") when nothing exists at that path."""
    path = Path(model_id)
    return path.is_absolute() or model_id.startswith((".", "~")) or "\\" in model_id or len(path.parts) > 2


def _load_pipeline(
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


def _parameters_text(spec: ImageSpec, scheduler: str, model_id: str, revision: str | None) -> str:
    """Return the AUTOMATIC1111-style `parameters` text that image tools already understand."""
    settings = spec.settings
    lines = [spec.prompt]
    # A1111 omits the negative prompt line when there is none, and its readers expect that.
    if spec.negative_prompt:
        lines.append(f"Negative prompt: {spec.negative_prompt}")
    fields = [
        f"Steps: {settings.steps}",
        f"Sampler: {scheduler}",
        f"CFG scale: {settings.guidance}",
        f"Seed: {spec.seed}",
        f"Size: {settings.width}x{settings.height}",
        f"Model: {model_id}",
        *([f"Model revision: {revision}"] if revision else []),
    ]
    if settings.mode is Mode.IMG2IMG:
        fields.append(f"Denoising strength: {settings.strength}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def _sygil_json(spec: ImageSpec, scheduler: str, model_id: str, revision: str | None) -> str:
    """Return the `sygil` metadata chunk: everything needed to render the same image again."""
    settings = spec.settings
    data: dict[str, object] = {
        "prompt": spec.prompt,
        "negative_prompt": spec.negative_prompt,
        "seed": spec.seed,
        "steps": settings.steps,
        "guidance": settings.guidance,
        "width": settings.width,
        "height": settings.height,
        "mode": settings.mode.value,
    }
    if settings.mode is Mode.IMG2IMG:
        data["strength"] = settings.strength
    data["scheduler"] = scheduler
    data["model"] = model_id
    data["revision"] = revision
    return json.dumps(data)


def _init_image(spec: ImageSpec, index: int) -> Image.Image:
    """Decode an img2img init image, as RGB at the requested size."""
    assert spec.init_image is not None  # ImageSpec guarantees it for img2img
    try:
        image = Image.open(io.BytesIO(spec.init_image))
        image.load()
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"specs[{index}].init_image is not a readable image: {_first_line(error)}") from error
    size = (spec.settings.width, spec.settings.height)
    return image.convert("RGB").resize(size, Image.Resampling.LANCZOS)


def _check_batch(specs: Sequence[ImageSpec]) -> Settings:
    """Return the batch's shared settings, or raise ValueError naming the first spec that differs."""
    if not specs:
        raise ValueError("specs must hold at least one ImageSpec")
    settings = specs[0].settings
    for index, spec in enumerate(specs):
        if spec.settings != settings:
            raise ValueError(
                f"all specs in one batch must share settings: specs[{index}] has {spec.settings}, "
                f"specs[0] has {settings}"
            )
    # diffusers runs int(steps * strength) denoising steps for img2img, and zero of them is an error deep inside.
    if settings.mode is Mode.IMG2IMG and int(settings.steps * settings.strength) < 1:
        raise ValueError(
            f"img2img with {settings.steps} steps at strength {settings.strength} would run no "
            f"denoising step; raise steps or strength"
        )
    return settings


def _pad(specs: Sequence[ImageSpec], size: int) -> tuple[ImageSpec, ...]:
    """Return specs filled up to size with copies of the last one, whose images are dropped later."""
    return (*specs, *[specs[-1]] * (size - len(specs)))


def _images(count: int) -> str:
    return "1 image" if count == 1 else f"{count} images"


def _use_compile_cache(folder: str) -> Path:
    """Keep inductor's kernels and FX graphs in folder, so a restarted worker loads them instead of compiling."""
    path = Path(folder).expanduser().resolve()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)  # beside the database, and as private as it
    # torch 2.13 reads TORCHINDUCTOR_CACHE_DIR each time it needs the folder (cache_dir_utils.cache_dir), so
    # setting it after importing torch works; clear_caches drops the few paths memoised by an earlier compile.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    torch._inductor.config.fx_graph_cache = True
    torch._inductor.utils.clear_caches()
    return path


def _set_attention(pipe: StableDiffusionPipeline, attention: str, device: str) -> str:
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
            log.warning("xformers is installed but unusable, using PyTorch attention (sdpa): %s", _first_line(error))
            return "sdpa"
        return "xformers"
    return "sdpa"


@dataclass(frozen=True, slots=True)
class Prepared:
    """A batch ready for the UNet: text embeddings computed, init images decoded, one generator per image."""

    specs: tuple[ImageSpec, ...]  # the real specs, then padding copies of the last one
    real: int
    settings: Settings
    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None  # None without classifier-free guidance (guidance <= 1)
    init_images: tuple[Image.Image, ...]
    generators: tuple[torch.Generator, ...]  # consumed by denoise: a Prepared renders once
    compiled: bool


@dataclass(frozen=True, slots=True)
class Decoded:
    """A denoised, decoded batch as uint8 RGB pixels on the CPU, padding included."""

    specs: tuple[ImageSpec, ...]
    real: int
    pixels: NDArray[np.uint8]  # (images, height, width, 3)


@dataclass(frozen=True, slots=True)
class _Compiled:
    unet: Any
    decoder: Any


class Engine:
    """One loaded Stable Diffusion model that renders batches of ImageSpecs on the calling thread."""

    def __init__(
        self,
        pipe: StableDiffusionPipeline,
        img2img: StableDiffusionImg2ImgPipeline,
        *,
        model_id: str,
        scheduler_name: str,
        device: str = "cpu",
        options: EngineOptions = DEFAULT_OPTIONS,
        effective: dict[str, object] | None = None,
        compiled: _Compiled | None = None,
    ) -> None:
        self._pipe = pipe
        self._img2img = img2img
        self.model_id = model_id
        self.revision: str | None = None  # the exact weights: a hub commit, or a hash of a folder's weights
        self.scheduler_name = scheduler_name
        self.device = device
        self.options = options
        self._effective = dict(effective or {})
        self._compiled = compiled
        self._eager = _Compiled(unet=pipe.unet, decoder=pipe.vae.decoder)
        self._warm: set[tuple[int, int, int]] = set()  # (batch, width, height) the compiled modules have seen
        self._warm_up_seconds: float | None = None
        # Side streams let the text encoder (prepare) and the safety checker (finish) run beside the UNet.
        cuda = device.startswith("cuda")
        self._prepare_stream = torch.cuda.Stream(device) if cuda else None
        self._finish_stream = torch.cuda.Stream(device) if cuda else None
        # PNG encoding is zlib work that releases the GIL: a batch's images are encoded side by side, so the GPU
        # waits for one image's encoding, not eight in a row (about 50 ms each at 512 px).
        self._encoders = concurrent.futures.ThreadPoolExecutor(
            max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="png"
        )

    @classmethod
    def load(
        cls,
        model_id: str,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        scheduler: str = "dpm++",
        safety_checker: bool = True,
        options: EngineOptions = DEFAULT_OPTIONS,
        revision: str = "main",
    ) -> Engine:
        """Load a model from a hub id (at ``revision``) or local folder, with the named scheduler, on the device."""
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; valid names: {', '.join(SCHEDULERS)}")
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; valid names: {', '.join(DTYPES)}")

        quiet_libraries()  # in a worker process too, whose output goes to the bot's log
        pipe = _load_pipeline(model_id, DTYPES[dtype], safety_checker, revision)
        engine = cls.from_pipeline(pipe, model_id=model_id, device=device, scheduler=scheduler, options=options)
        local = Path(model_id).expanduser()
        if local.is_dir():
            engine.revision = folder_revision(local)
        else:
            # A hub download loads from its cache's snapshot folder, named by the commit the revision resolved to.
            engine.revision = snapshot_revision(str(pipe.config.get("_name_or_path", ""))) or revision
        log.info("loaded %s (revision %s) on %s as %s with %s", model_id, engine.revision, device, dtype, scheduler)
        return engine

    @classmethod
    def from_pipeline(
        cls,
        pipe: StableDiffusionPipeline,
        *,
        model_id: str,
        device: str = "cpu",
        scheduler: str = "dpm++",
        options: EngineOptions = DEFAULT_OPTIONS,
    ) -> Engine:
        """Serve a pipeline already in memory (``load`` reads one; benchmarks build one with random weights)."""
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; valid names: {', '.join(SCHEDULERS)}")
        pipe.scheduler = _make_scheduler(scheduler, pipe.scheduler.config)
        try:
            pipe = pipe.to(device)
        except (RuntimeError, AssertionError, ValueError) as error:
            raise ModelError(f"Cannot put model {model_id!r} on device {device!r}: {_first_line(error)}") from error
        attention = _set_attention(pipe, options.attention, device)
        # Fused projections live in diffusers' own SDPA processor; xformers and slicing install others over it.
        fused_qkv = options.fused_qkv and attention == "sdpa"
        if fused_qkv:
            pipe.fuse_qkv_projections()
        if options.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        pipe.set_progress_bar_config(disable=True)

        compiled: _Compiled | None = None
        cuda_graphs = options.compile and options.cuda_graphs and device.startswith("cuda")
        if options.compile:
            if options.compile_cache is not None:
                _use_compile_cache(options.compile_cache)
            # Each warm (batch, size) is its own static graph, for txt2img and img2img (whose latents may come
            # out of the VAE encoder in another memory layout): allow that many before dynamo gives up.
            shapes = len(options.warmup_batches) * len(options.warmup_sizes) * 2
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, shapes + 8)
            mode = "reduce-overhead" if cuda_graphs else None
            # dynamic=False: a shape not warmed must never be compiled as a dynamic graph behind a request.
            compiled = _Compiled(
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
        return cls(
            pipe,
            img2img,
            model_id=model_id,
            scheduler_name=scheduler,
            device=device,
            options=options,
            effective=effective,
            compiled=compiled,
        )

    @property
    def tokenizer(self) -> CLIPTokenizer:
        """Return the loaded pipeline's own tokenizer."""
        return self._pipe.tokenizer

    def count_tokens(self, text: str) -> int:
        """Return how many content tokens (without start and end) the model's tokenizer makes of text."""
        return count_tokens(self.tokenizer, text).tokens

    def describe(self) -> dict[str, object]:
        """Return what runs and how: device, dtype, scheduler, each option's effective state, warmed shapes."""
        return {
            "model": self.model_id,
            "revision": self.revision,
            "device": self.device,
            "dtype": str(self._pipe.unet.dtype).removeprefix("torch."),
            "scheduler": self.scheduler_name,
            **self._effective,
            "warmed": [list(shape) for shape in sorted(self._warm)],
            "warm_up_seconds": self._warm_up_seconds,
        }

    def peak_memory(self) -> int | None:
        """Return the most GPU memory allocated so far in bytes, or None off CUDA."""
        if not self.device.startswith("cuda"):
            return None
        return torch.cuda.max_memory_allocated(torch.device(self.device))

    def warm_up(self) -> float:
        """Render each warm-up batch size at each warm-up size once (compiling them if on); return the seconds."""
        options = self.options
        started = time.perf_counter()
        compiled = self._compiled is not None
        source: bytes | None = None
        for width, height in options.warmup_sizes:
            settings = Settings(steps=options.warmup_steps, width=width, height=height)
            for batch in options.warmup_batches:
                specs = [
                    ImageSpec(prompt="warm-up", negative_prompt="", seed=index, settings=settings)
                    for index in range(batch)
                ]
                [image, *_] = self._finish(self._denoise(self._prepare(specs, settings, batch if compiled else None)))
                source = image.png
                if compiled:
                    # img2img latents can reach the UNet in another memory layout: a guard of its own to compile.
                    img2img = replace(settings, mode=Mode.IMG2IMG, strength=1.0)
                    specs = [replace(spec, settings=img2img, init_image=source) for spec in specs]
                    self._finish(self._denoise(self._prepare(specs, img2img, batch)))
                self._warm.add((batch, width, height))
        self._warm_up_seconds = time.perf_counter() - started
        log.info(
            "warmed up in %.1f s: batches %s at sizes %s; %s",
            self._warm_up_seconds,
            ", ".join(map(str, options.warmup_batches)),
            ", ".join(f"{width}x{height}" for width, height in options.warmup_sizes),
            ", ".join(f"{key}={value}" for key, value in self._effective.items()),
        )
        return self._warm_up_seconds

    def render(
        self,
        specs: Sequence[ImageSpec],
        progress: Callable[[int, int], None] | None = None,
    ) -> list[RenderedImage]:
        """Render every spec in one pipeline call and return the images in the same order."""
        return self.finish(self.denoise(self.prepare(specs), progress))

    def prepare(self, specs: Sequence[ImageSpec]) -> Prepared:
        """Check a batch, decode its init images and encode its prompts; safe beside another batch's denoise."""
        settings = _check_batch(specs)
        return self._prepare(specs, settings, self._compiled_batch(len(specs), settings))

    def denoise(self, prepared: Prepared, progress: Callable[[int, int], None] | None = None) -> Decoded:
        """Run the UNet over a prepared batch and decode it to CPU pixels; progress may raise to stop the batch."""
        return self._denoise(prepared, progress)

    def finish(self, decoded: Decoded) -> list[RenderedImage]:
        """Run the safety checker and encode PNGs with their metadata, dropping padding images."""
        return self._finish(decoded)

    def _compiled_batch(self, count: int, settings: Settings) -> int | None:
        """Return the warmed batch size to pad count up to for the compiled modules, or None to run eager."""
        # Without guidance the UNet sees half the batch it was warmed with: a shape that would compile now.
        if self._compiled is None or settings.guidance <= 1:
            return None
        sizes = [
            batch
            for batch, width, height in self._warm
            if (width, height) == (settings.width, settings.height) and batch >= count
        ]
        return min(sizes, default=None)

    def _prepare(self, specs: Sequence[ImageSpec], settings: Settings, compiled_batch: int | None) -> Prepared:
        init_images = tuple(_init_image(spec, index) for index, spec in enumerate(specs) if spec.init_image is not None)
        padded = _pad(specs, compiled_batch or len(specs))
        if init_images:
            init_images = (*init_images, *[init_images[-1]] * (len(padded) - len(specs)))
        # One CPU generator per image: each image's starting noise is what a batch of one with its seed gets,
        # on any device, so a stored seed reproduces the image.
        generators = tuple(torch.Generator("cpu").manual_seed(spec.seed) for spec in padded)
        guided = settings.guidance > 1
        with self._out_of_memory(len(specs), settings), torch.inference_mode(), self._on(self._prepare_stream):
            positive, negative = self._pipe.encode_prompt(
                prompt=[spec.prompt for spec in padded],
                device=torch.device(self.device),
                num_images_per_prompt=1,
                do_classifier_free_guidance=guided,
                negative_prompt=[spec.negative_prompt for spec in padded],
            )
        return Prepared(
            specs=padded,
            real=len(specs),
            settings=settings,
            prompt_embeds=positive,
            negative_prompt_embeds=negative if guided else None,
            init_images=init_images,
            generators=generators,
            compiled=compiled_batch is not None,
        )

    def _denoise(self, prepared: Prepared, progress: Callable[[int, int], None] | None = None) -> Decoded:
        settings = prepared.settings

        def on_step_end(pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            if progress is not None:
                progress(step + 1, pipe.num_timesteps)
            return callback_kwargs

        common: dict[str, Any] = {
            "prompt_embeds": prepared.prompt_embeds,
            "negative_prompt_embeds": prepared.negative_prompt_embeds,
            "num_inference_steps": settings.steps,
            "guidance_scale": settings.guidance,
            "generator": list(prepared.generators),
            "output_type": "latent",
            "callback_on_step_end": on_step_end if progress is not None else None,
        }
        img2img = settings.mode is Mode.IMG2IMG
        pipe = self._img2img if img2img else self._pipe
        with (
            self._out_of_memory(prepared.real, settings),
            torch.inference_mode(),
            self._modules(pipe, self._compiled if prepared.compiled else self._eager),
        ):
            if self._prepare_stream is not None:
                # Made on the prepare stream: keep the allocator from reusing them before this stream is done.
                for tensor in (prepared.prompt_embeds, prepared.negative_prompt_embeds):
                    if tensor is not None:
                        tensor.record_stream(torch.cuda.current_stream(self.device))
            if img2img:
                output = pipe(image=list(prepared.init_images), strength=settings.strength, **common)
            else:
                output = pipe(height=settings.height, width=settings.width, **common)
            if not isinstance(output, StableDiffusionPipelineOutput):
                raise TypeError(f"diffusers returned {type(output).__name__}, expected StableDiffusionPipelineOutput")
            latents = output.images
            assert isinstance(latents, torch.Tensor)  # output_type="latent"
            vae = self._pipe.vae
            decoded = vae.decode(latents / vae.config["scaling_factor"], return_dict=False)[0]
            assert isinstance(decoded, torch.Tensor)
            # The same arithmetic as diffusers' postprocess (denormalise in the model's dtype, then float32 * 255,
            # round half to even), on the device: a quarter of the bytes cross to the CPU, and this is the sync.
            pixels = ((decoded * 0.5 + 0.5).clamp(0, 1).float() * 255).round().to(torch.uint8)
            array = pixels.permute(0, 2, 3, 1).cpu().numpy()
        return Decoded(specs=prepared.specs, real=prepared.real, pixels=array)

    def _finish(self, decoded: Decoded) -> list[RenderedImage]:
        specs = decoded.specs[: decoded.real]
        pixels = decoded.pixels[: decoded.real]
        flags: list[bool] = [False] * len(specs)
        checker = self._pipe.safety_checker
        extractor = self._pipe.feature_extractor
        if checker is not None and extractor is not None:
            features = extractor([Image.fromarray(image) for image in pixels], return_tensors="pt")
            with torch.inference_mode(), self._on(self._finish_stream):
                clip_input = features.pixel_values.to(device=self.device, dtype=checker.dtype)
                # The checker blacks out what it flags, in place, as in diffusers' pipeline: hand it a copy.
                pixels, verdicts = checker(images=pixels.copy(), clip_input=clip_input)
            flags = [bool(flag) for flag in verdicts]
        pngs = self._encoders.map(self._encode, specs, pixels)
        return [
            RenderedImage(png=png, seed=spec.seed, nsfw=nsfw)
            for spec, png, nsfw in zip(specs, pngs, flags, strict=True)
        ]

    @contextlib.contextmanager
    def _modules(self, pipe: StableDiffusionPipeline | StableDiffusionImg2ImgPipeline, modules: Any) -> Iterator[None]:
        """Run the pipeline with the given UNet and VAE decoder (compiled or eager), then put the eager ones back."""
        if modules is self._eager:
            yield
            return
        pipe.unet = modules.unet
        self._pipe.vae.decoder = modules.decoder
        try:
            yield
        finally:
            pipe.unet = self._eager.unet
            self._pipe.vae.decoder = self._eager.decoder

    @contextlib.contextmanager
    def _on(self, stream: torch.cuda.Stream | None) -> Iterator[None]:
        """Run the block on a side CUDA stream and wait for it, so its results are ready; plain off CUDA."""
        if stream is None:
            yield
            return
        with torch.cuda.stream(stream):
            yield
        stream.synchronize()

    @contextlib.contextmanager
    def _out_of_memory(self, count: int, settings: Settings) -> Iterator[None]:
        """Turn torch's out-of-memory error into OutOfMemory, after freeing the cached blocks it left."""
        failed = False
        try:
            yield
        except torch.OutOfMemoryError:
            # Raised outside the handler: the traceback's frames hold the batch's tensors until it is gone.
            failed = True
        if failed:
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
            raise OutOfMemory(
                f"The GPU ran out of memory rendering {_images(count)} at {settings.width}x{settings.height}."
            )

    def _encode(self, spec: ImageSpec, pixels: NDArray[np.uint8]) -> bytes:
        """Return the image as PNG bytes whose text chunks hold its prompt, seed and settings."""
        info = PngInfo()
        info.add_text("parameters", _parameters_text(spec, self.scheduler_name, self.model_id, self.revision))
        info.add_text("sygil", _sygil_json(spec, self.scheduler_name, self.model_id, self.revision))
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", pnginfo=info)
        return buffer.getvalue()
