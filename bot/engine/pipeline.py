"""Drive diffusers: load one Stable Diffusion pipeline and render a batch of ImageSpecs into PNG bytes."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import io
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import diffusers.utils.deprecation_utils
import torch

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
from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo
from transformers import CLIPTokenizer

from bot.engine.types import ImageSpec, Mode, RenderedImage, Settings
from bot.errors import ModelError
from bot.prompts.tokens import count_tokens

log = logging.getLogger(__name__)

SCHEDULERS = ("dpm++", "ddim", "euler-a")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# diffusers 0.42 renamed from_pretrained's torch_dtype to dtype and warns on the old name; releases before the
# rename reject dtype. Where the probe fails, torch_dtype still works there.
_DTYPE_KWARG = "dtype" if hasattr(diffusers.utils.deprecation_utils, "_resolve_dtype") else "torch_dtype"
_MAKE_TINY_HINT = "build a tiny test model with `sygil-bot make-tiny-model DIR`, or check `model.id`"


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


def _looks_like_path(model_id: str) -> bool:
    """Tell a local folder from a hub id ("owner/name") when nothing exists at that path."""
    path = Path(model_id)
    return path.is_absolute() or model_id.startswith((".", "~")) or "\\" in model_id or len(path.parts) > 2


def _hub_offline() -> bool:
    """Return whether the environment forbids reaching the Hugging Face hub."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _load_pipeline(model_id: str, torch_dtype: torch.dtype, safety_checker: bool) -> StableDiffusionPipeline:
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
    if not safety_checker:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(source, **kwargs)
    # Any failure inside from_pretrained (missing files, corrupt weights, no network) means this model id is
    # unusable as configured; the user gets one line and the log keeps the chained cause.
    except Exception as error:
        if source == model_id and _hub_offline():
            raise ModelError(
                f"Model {model_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: download it "
                f"once with network access, or set `model.id` to a local folder "
                f"(a tiny test model: `sygil-bot make-tiny-model DIR`)."
            ) from error
        raise ModelError(f"Could not load model {model_id!r}: {_first_line(error)}; {_MAKE_TINY_HINT}.") from error
    if not isinstance(pipe, StableDiffusionPipeline):
        raise ModelError(f"Model {model_id!r} is a {type(pipe).__name__}, not a Stable Diffusion pipeline.")
    return pipe


def _parameters_text(spec: ImageSpec, scheduler: str, model_id: str) -> str:
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
    ]
    if settings.mode is Mode.IMG2IMG:
        fields.append(f"Denoising strength: {settings.strength}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def _sygil_json(spec: ImageSpec, scheduler: str, model_id: str) -> str:
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


class Engine:
    """One loaded Stable Diffusion model that renders batches of ImageSpecs on the calling thread."""

    def __init__(
        self,
        pipe: StableDiffusionPipeline,
        img2img: StableDiffusionImg2ImgPipeline,
        *,
        model_id: str,
        scheduler_name: str,
    ) -> None:
        self._pipe = pipe
        self._img2img = img2img
        self.model_id = model_id
        self.scheduler_name = scheduler_name
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
        attention_slicing: bool = False,
    ) -> Engine:
        """Load a model from a hub id or local folder, with the named scheduler, on the given device."""
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; valid names: {', '.join(SCHEDULERS)}")
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; valid names: {', '.join(DTYPES)}")

        pipe = _load_pipeline(model_id, DTYPES[dtype], safety_checker)
        engine = cls.from_pipeline(
            pipe, model_id=model_id, device=device, scheduler=scheduler, attention_slicing=attention_slicing
        )
        log.info("loaded %s on %s as %s with %s", model_id, device, dtype, scheduler)
        return engine

    @classmethod
    def from_pipeline(
        cls,
        pipe: StableDiffusionPipeline,
        *,
        model_id: str,
        device: str = "cpu",
        scheduler: str = "dpm++",
        attention_slicing: bool = False,
    ) -> Engine:
        """Serve a pipeline already in memory (``load`` reads one; benchmarks build one with random weights)."""
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; valid names: {', '.join(SCHEDULERS)}")
        pipe.scheduler = _make_scheduler(scheduler, pipe.scheduler.config)
        try:
            pipe = pipe.to(device)
        except (RuntimeError, AssertionError, ValueError) as error:
            raise ModelError(f"Cannot put model {model_id!r} on device {device!r}: {_first_line(error)}") from error
        if device.startswith("cuda") and importlib.util.find_spec("xformers") is not None:
            try:
                pipe.enable_xformers_memory_efficient_attention()
            # An xformers wheel built for another torch fails here; PyTorch's own attention still works.
            except Exception as error:
                log.warning("xformers is installed but unusable, using PyTorch attention: %s", _first_line(error))
        if attention_slicing:
            pipe.enable_attention_slicing()
        pipe.set_progress_bar_config(disable=True)

        # Built from the same components, so both pipelines share one copy of the weights.
        img2img = StableDiffusionImg2ImgPipeline(
            **pipe.components, requires_safety_checker=bool(pipe.config.get("requires_safety_checker", False))
        )
        img2img.set_progress_bar_config(disable=True)
        return cls(pipe, img2img, model_id=model_id, scheduler_name=scheduler)

    @property
    def tokenizer(self) -> CLIPTokenizer:
        """Return the loaded pipeline's own tokenizer."""
        return self._pipe.tokenizer

    def count_tokens(self, text: str) -> int:
        """Return how many content tokens (without start and end) the model's tokenizer makes of text."""
        return count_tokens(self.tokenizer, text).tokens

    def render(
        self,
        specs: Sequence[ImageSpec],
        progress: Callable[[int, int], None] | None = None,
    ) -> list[RenderedImage]:
        """Render every spec in one pipeline call and return the images in the same order."""
        settings = _check_batch(specs)
        init_images = [_init_image(spec, index) for index, spec in enumerate(specs) if spec.init_image is not None]
        # One CPU generator per image: each image's starting noise is what a batch of one with its seed gets,
        # on any device, so a stored seed reproduces the image.
        generators = [torch.Generator("cpu").manual_seed(spec.seed) for spec in specs]

        def on_step_end(pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            if progress is not None:
                progress(step + 1, pipe.num_timesteps)
            return callback_kwargs

        common: dict[str, Any] = {
            "prompt": [spec.prompt for spec in specs],
            "negative_prompt": [spec.negative_prompt for spec in specs],
            "num_inference_steps": settings.steps,
            "guidance_scale": settings.guidance,
            "generator": generators,
            "output_type": "pil",
            "callback_on_step_end": on_step_end if progress is not None else None,
        }
        with torch.inference_mode():
            if settings.mode is Mode.IMG2IMG:
                output = self._img2img(image=init_images, strength=settings.strength, **common)
            else:
                output = self._pipe(height=settings.height, width=settings.width, **common)
        if not isinstance(output, StableDiffusionPipelineOutput):
            raise TypeError(f"diffusers returned {type(output).__name__}, expected StableDiffusionPipelineOutput")

        flags = output.nsfw_content_detected or [False] * len(specs)
        pngs = self._encoders.map(self._encode, specs, output.images)
        return [
            RenderedImage(png=png, seed=spec.seed, nsfw=bool(nsfw))
            for spec, png, nsfw in zip(specs, pngs, flags, strict=True)
        ]

    def _encode(self, spec: ImageSpec, image: Image.Image) -> bytes:
        """Return the image as PNG bytes whose text chunks hold its prompt, seed and settings."""
        info = PngInfo()
        info.add_text("parameters", _parameters_text(spec, self.scheduler_name, self.model_id))
        info.add_text("sygil", _sygil_json(spec, self.scheduler_name, self.model_id))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", pnginfo=info)
        return buffer.getvalue()
