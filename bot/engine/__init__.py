"""Diffusers behind plain data: load a model, render batches of ImageSpecs, build a tiny test model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bot.engine.types import EngineOptions, ImageSpec, Mode, RenderedImage, Settings

if TYPE_CHECKING:
    from bot.engine.pipeline import Engine
    from bot.engine.tiny import make_tiny_model

__all__ = ["Engine", "EngineOptions", "ImageSpec", "Mode", "RenderedImage", "Settings", "make_tiny_model"]


def __getattr__(name: str) -> Any:
    """Import torch and diffusers only when Engine or make_tiny_model is first used."""
    # `from bot.engine.types import Settings` runs this package's __init__; importing diffusers here would
    # cost the scheduler, storage and cog tests seconds for nothing.
    if name == "Engine":
        from bot.engine.pipeline import Engine

        return Engine
    if name == "make_tiny_model":
        from bot.engine.tiny import make_tiny_model

        return make_tiny_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
