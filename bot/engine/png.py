"""Write a rendered image as PNG bytes whose text chunks say how to render it again.

Two chunks: `parameters`, the AUTOMATIC1111 text that image tools already read, and `sygil`, JSON with every
setting, the model and its revision.
"""

from __future__ import annotations

import io
import json

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from bot.engine.types import ImageSpec, Mode


def encode_png(
    spec: ImageSpec, pixels: NDArray[np.uint8], *, scheduler: str, model_id: str, revision: str | None
) -> bytes:
    """Return the image as PNG bytes whose text chunks hold its prompt, seed and settings."""
    info = PngInfo()
    info.add_text("parameters", _parameters_text(spec, scheduler, model_id, revision))
    info.add_text("sygil", _sygil_json(spec, scheduler, model_id, revision))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


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
