"""Plain data crossing the executor seam: settings in, PNG bytes out; no torch, no Discord."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Mode(enum.StrEnum):
    TXT2IMG = "txt2img"
    IMG2IMG = "img2img"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything that must match for images to share one pipeline call."""

    steps: int = 25
    guidance: float = 7.0
    width: int = 512
    height: int = 512
    mode: Mode = Mode.TXT2IMG
    strength: float = 0.6  # img2img only

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= 150:
            raise ValueError(f"steps must be between 1 and 150, got {self.steps}")
        if not 0.0 <= self.guidance <= 30.0:
            raise ValueError(f"guidance must be between 0 and 30, got {self.guidance}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value < 8 or value > 2048 or value % 8:
                raise ValueError(f"{name} must be a multiple of 8 between 8 and 2048, got {value}")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")


@dataclass(frozen=True, slots=True)
class ImageSpec:
    """One image to render."""

    prompt: str
    negative_prompt: str
    seed: int
    settings: Settings
    init_image: bytes | None = field(default=None, repr=False)  # PNG, img2img only

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be between 0 and {2**32 - 1}, got {self.seed}")
        if (self.settings.mode is Mode.IMG2IMG) != (self.init_image is not None):
            raise ValueError("init_image is required for img2img and not allowed for txt2img")


@dataclass(frozen=True, slots=True)
class RenderedImage:
    """One finished image: PNG bytes with the prompt, seed and settings in its text chunks."""

    png: bytes = field(repr=False)
    seed: int
    nsfw: bool = False


ATTENTIONS = ("sdpa", "xformers", "slicing")


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """How the engine trades start-up time and memory for speed; plain data, so it can cross to a worker process."""

    compile: bool = False  # torch.compile the UNet and the VAE decoder
    cuda_graphs: bool = False  # with compile: mode="reduce-overhead" (CUDA graphs); ignored on CPU
    channels_last: bool = True
    fused_qkv: bool = True  # one projection for query, key and value: fewer, larger matmuls
    attention: str = "sdpa"  # "sdpa" | "xformers" | "slicing" (attention slicing for small GPUs)
    warmup_batches: tuple[int, ...] = (1,)  # image batch sizes compiled at warm-up
    warmup_sizes: tuple[tuple[int, int], ...] = ((512, 512),)  # (width, height) compiled at warm-up
    warmup_steps: int = 2
    compile_cache: str | None = None  # folder for the inductor and FX graph caches, so a restart is warm

    def __post_init__(self) -> None:
        for name in ("compile", "cuda_graphs", "channels_last", "fused_qkv"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, got {self.attention!r}")
        if not self.warmup_batches or any(
            isinstance(batch, bool) or not isinstance(batch, int) or batch < 1 for batch in self.warmup_batches
        ):
            raise ValueError(f"warmup_batches must hold at least one whole number >= 1, got {self.warmup_batches!r}")
        if not self.warmup_sizes:
            raise ValueError("warmup_sizes must hold at least one (width, height)")
        for size in self.warmup_sizes:
            if (
                not isinstance(size, tuple)
                or len(size) != 2
                or any(isinstance(side, bool) or not isinstance(side, int) or side < 8 or side % 8 for side in size)
            ):
                raise ValueError(f"warmup_sizes entries must be (width, height) multiples of 8, got {size!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 1:
            raise ValueError(f"warmup_steps must be a whole number >= 1, got {self.warmup_steps!r}")
        if self.compile_cache is not None and not self.compile_cache.strip():
            raise ValueError("compile_cache must be a folder path or None, got an empty string")
