"""The Engine: one loaded Stable Diffusion model rendering batches of ImageSpecs in three stages.

prepare (check the batch, decode init images, encode prompts), denoise (UNet and VAE decoder, compiled for the
warmed shapes) and finish (safety checker, PNGs), so a worker can overlap one batch's prepare and finish with
another's denoise. Loading is in ``loading.py``, the PNG and its metadata in ``png.py``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

# diffusers exports its public names through a lazy module that pyright reads as private imports.
# pyright: reportPrivateImportUsage=false
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput
from numpy.typing import NDArray
from PIL import Image
from transformers import CLIPTokenizer

from bot.engine.images import BadImage, open_init_image
from bot.engine.loading import DTYPES, SCHEDULERS, Modules, configure, load_pipeline, quiet_libraries
from bot.engine.png import encode_png
from bot.engine.revision import folder_revision, snapshot_revision
from bot.engine.types import EngineOptions, ImageSpec, Mode, RenderedImage, Settings
from bot.errors import OutOfMemory
from bot.prompts.tokens import count_tokens

log = logging.getLogger(__name__)

DEFAULT_OPTIONS = EngineOptions()


def _init_image(spec: ImageSpec, index: int) -> Image.Image:
    """Decode an img2img init image, as RGB at the requested size."""
    assert spec.init_image is not None  # ImageSpec guarantees it for img2img
    try:
        image = open_init_image(spec.init_image)
    except BadImage as error:
        raise ValueError(f"specs[{index}].init_image is not a readable image: {error}") from error
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


LatentsHook = Callable[[int, int, torch.Tensor], None]  # (step, total, latents) after each step


def _denoised(scheduler: Any, latents: torch.Tensor) -> torch.Tensor:
    """Return the scheduler's estimate of the clean latents when it keeps one (DPM-Solver++ keeps its data
    predictions), which shows the image far earlier than the noisy latents do; else the latents."""
    outputs = getattr(scheduler, "model_outputs", None)
    if getattr(scheduler.config, "algorithm_type", None) == "dpmsolver++" and outputs:
        last = outputs[-1]
        if isinstance(last, torch.Tensor) and last.shape == latents.shape:
            return last
    return latents


def _images(count: int) -> str:
    return "1 image" if count == 1 else f"{count} images"


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
        compiled: Modules | None = None,
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
        self._eager = Modules(unet=pipe.unet, decoder=pipe.vae.decoder)
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
        pipe = load_pipeline(model_id, DTYPES[dtype], safety_checker, revision)
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
        configured = configure(pipe, model_id=model_id, device=device, scheduler=scheduler, options=options)
        return cls(
            configured.pipe,
            configured.img2img,
            model_id=model_id,
            scheduler_name=scheduler,
            device=device,
            options=options,
            effective=configured.effective,
            compiled=configured.compiled,
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

    def denoise(
        self,
        prepared: Prepared,
        progress: Callable[[int, int], None] | None = None,
        *,
        latents: LatentsHook | None = None,
    ) -> Decoded:
        """Run the UNet over a prepared batch and decode it to CPU pixels; progress may raise to stop the batch.

        ``latents`` sees each step's latents after ``progress`` (on this thread, for previews): the denoised estimate
        where the scheduler keeps one (DPM-Solver++), else the noisy latents.
        """
        return self._denoise(prepared, progress, latents)

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

    def _denoise(
        self,
        prepared: Prepared,
        progress: Callable[[int, int], None] | None = None,
        latents_hook: LatentsHook | None = None,
    ) -> Decoded:
        settings = prepared.settings

        def on_step_end(pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            if progress is not None:
                progress(step + 1, pipe.num_timesteps)
            if latents_hook is not None:
                latents_hook(step + 1, pipe.num_timesteps, _denoised(pipe.scheduler, callback_kwargs["latents"]))
            return callback_kwargs

        common: dict[str, Any] = {
            "prompt_embeds": prepared.prompt_embeds,
            "negative_prompt_embeds": prepared.negative_prompt_embeds,
            "num_inference_steps": settings.steps,
            "guidance_scale": settings.guidance,
            "generator": list(prepared.generators),
            "output_type": "latent",
            "callback_on_step_end": on_step_end if progress is not None or latents_hook is not None else None,
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
            decoded = _decode(vae, latents / vae.config["scaling_factor"])
            # The same arithmetic as diffusers' postprocess (denormalise in the model's dtype, then float32 * 255,
            # round half to even), on the device: a quarter of the bytes cross to the CPU, and this is the sync.
            pixels = ((decoded * 0.5 + 0.5).clamp(0, 1).float() * 255).round().to(torch.uint8)
            array = pixels.permute(0, 2, 3, 1).cpu().numpy()
        return Decoded(specs=prepared.specs, real=prepared.real, pixels=array)

    def _finish(self, decoded: Decoded) -> list[RenderedImage]:
        specs = decoded.specs[: decoded.real]
        pixels, flags = self.screen(decoded.pixels[: decoded.real])
        pngs = self._encoders.map(self._encode, specs, pixels)
        return [
            RenderedImage(png=png, seed=spec.seed, nsfw=nsfw)
            for spec, png, nsfw in zip(specs, pngs, flags, strict=True)
        ]

    @property
    def checks_safety(self) -> bool:
        """Return whether the model's safety checker is loaded (``model.safety_checker``)."""
        return self._pipe.safety_checker is not None and self._pipe.feature_extractor is not None

    def screen(self, pixels: NDArray[np.uint8]) -> tuple[NDArray[np.uint8], list[bool]]:
        """Run the safety checker over uint8 RGB images (images, height, width, 3): return them with the flagged ones
        blacked out, and which were flagged (none without a checker). Safe beside a denoise, on its own stream."""
        checker = self._pipe.safety_checker
        extractor = self._pipe.feature_extractor
        if checker is None or extractor is None:
            return pixels, [False] * len(pixels)
        features = extractor([Image.fromarray(image) for image in pixels], return_tensors="pt")
        with torch.inference_mode(), self._on(self._finish_stream):
            clip_input = features.pixel_values.to(device=self.device, dtype=checker.dtype)
            # The checker blacks out what it flags, in place, as in diffusers' pipeline: hand it a copy.
            checked, verdicts = checker(images=pixels.copy(), clip_input=clip_input)
        return checked, [bool(flag) for flag in verdicts]

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
        return encode_png(spec, pixels, scheduler=self.scheduler_name, model_id=self.model_id, revision=self.revision)


def _decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Decode latents to pixels; in overlapping tiles of the VAE's own sample size past twice its area per image.

    An upscale (1024² for SD 1.5) then needs the decoder's memory of one 512² tile per image, not of the whole
    image, so a batch of them fits wherever a batch at 512² does. Every size /imagine offers stays under the
    threshold and decodes in one piece, as before, pixel for pixel. The tiles run the decoder in place (compiled or
    eager), so a warmed-up upscale size compiles its tile shapes at warm-up.
    """
    tile = vae.tile_latent_min_size
    if latents.shape[-1] * latents.shape[-2] > 2 * tile * tile:
        decoded = vae.tiled_decode(latents, return_dict=False)[0]
    else:
        decoded = vae.decode(latents, return_dict=False)[0]
    assert isinstance(decoded, torch.Tensor)
    return decoded
