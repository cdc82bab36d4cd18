"""The VAE decode of big images (upscales): in tiles, so its memory is that of one tile per image."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL  # pyright: ignore[reportPrivateImportUsage]
from PIL import Image

from bot.engine import Engine, ImageSpec, Mode, Settings
from bot.engine.pipeline import _decode  # pyright: ignore[reportPrivateUsage]


@pytest.fixture(scope="module")
def vae(tiny_model_dir: Path) -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(tiny_model_dir / "vae").eval()  # pyright: ignore[reportReturnType]


def _decoded_sides(vae: AutoencoderKL, latents: torch.Tensor) -> tuple[torch.Tensor, set[tuple[int, int]]]:
    """Decode with the engine's decode and return the pixels and the latent sizes the decoder was run on."""
    seen: set[tuple[int, int]] = set()
    hook = vae.decoder.register_forward_pre_hook(lambda _module, args: seen.add(tuple(args[0].shape[-2:])))
    try:
        with torch.inference_mode():
            pixels = _decode(vae, latents)
    finally:
        hook.remove()
    return pixels, seen


def test_past_twice_the_vae_sample_area_the_decoder_sees_only_tiles(vae: AutoencoderKL) -> None:
    tile = vae.tile_latent_min_size  # the tiny VAE's 64 px sample size: 8 latent pixels
    latents = torch.randn(2, 4, 2 * tile, 3 * tile, generator=torch.Generator().manual_seed(1))
    pixels, sides = _decoded_sides(vae, latents)
    assert pixels.shape == (2, 3, 16 * tile, 24 * tile)
    assert max(height * width for height, width in sides) <= tile * tile  # never the whole image at once
    with torch.inference_mode():
        assert torch.equal(pixels, vae.tiled_decode(latents, return_dict=False)[0])


@pytest.mark.parametrize(("height", "width"), [(8, 8), (8, 12), (8, 16)])
def test_up_to_twice_the_vae_sample_area_the_decode_is_unchanged(vae: AutoencoderKL, height: int, width: int) -> None:
    latents = torch.randn(1, 4, height, width, generator=torch.Generator().manual_seed(2))
    pixels, sides = _decoded_sides(vae, latents)
    assert sides == {(height, width)}
    with torch.inference_mode():
        assert torch.equal(pixels, vae.decode(latents, return_dict=False)[0])  # pyright: ignore[reportArgumentType]


def test_an_upscale_renders_at_twice_the_size_through_the_tiled_decode(engine: Engine) -> None:
    small = Settings(steps=4, width=64, height=48)
    [source] = engine.render([ImageSpec(prompt="species:seal", negative_prompt="", seed=3, settings=small)])
    upscale = Settings(steps=4, width=128, height=96, mode=Mode.IMG2IMG, strength=0.35)
    spec = ImageSpec(prompt="species:seal", negative_prompt="", seed=3, settings=upscale, init_image=source.png)
    [first, second] = engine.render([spec, spec])
    image = Image.open(io.BytesIO(first.png))
    assert image.size == (128, 96)
    assert first.png == second.png  # the tiles blend the same way for every image of a batch
    assert np.asarray(image.convert("RGB")).std() > 0
