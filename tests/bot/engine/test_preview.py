"""Live previews: the protocol's frames, the decoders (latent2rgb and a tiny TAESD) and the worker's throttle."""

from __future__ import annotations

import asyncio
import io
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from bot.engine.executor import Call
from bot.engine.preview import Previewer
from bot.engine.process import WorkerProcess
from bot.engine.protocol import (
    MAX_PREVIEW_BYTES,
    Preview,
    PreviewOptions,
    RenderBatch,
    WorkerSettings,
    decode,
    encode,
)
from bot.engine.types import EngineOptions, ImageSpec, Settings

FAST = Settings(steps=3, width=64, height=64)
JPEG = b"\xff\xd8\xff\xe0" + b"\0" * 60


def _spec(prompt: str, seed: int) -> ImageSpec:
    return ImageSpec(prompt=prompt, negative_prompt="", seed=seed, settings=FAST)


def test_a_batch_names_the_images_it_wants_to_see_forming_and_frames_cross_as_bytes() -> None:
    batch = RenderBatch(7, (_spec("a", 1), _spec("b", 2), _spec("c", 3)), previews=(0, 2))
    frame = Preview(7, 2, 5, 25, JPEG)
    for message in (batch, frame):
        assert decode(encode(message)) == message
    # A bot from before previews sends no list: no frames are asked for.
    data = encode(batch)
    del data["previews"]
    assert decode(data) == RenderBatch(7, batch.specs)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"jpeg": "not bytes"}, "jpeg is not bytes"),
        ({"jpeg": b"\x89PNG\r\n\x1a\n" + b"\0" * 60}, "not a JPEG"),
        ({"jpeg": JPEG + b"\0" * MAX_PREVIEW_BYTES}, "not a JPEG of at most"),
        ({"step": 0}, "not a step"),
        ({"step": 26}, "not a step"),
        ({"index": -1}, "not a step"),
        ({"index": True}, "index is not an integer"),
        ({"total": 2.5}, "total is not an integer"),
        ({"batch_id": "7"}, "batch_id is not an integer"),
    ],
)
def test_a_malformed_frame_is_refused(change: dict[str, Any], why: str) -> None:
    data = encode(Preview(7, 0, 5, 25, JPEG)) | change
    with pytest.raises(ValueError, match=why):
        decode(data)


def test_a_batch_asking_for_frames_of_specs_it_lacks_is_refused() -> None:
    data = encode(RenderBatch(7, (_spec("a", 1),), previews=(0,)))
    for previews in ([1], [-1], ["0"], 0):
        with pytest.raises(ValueError, match="previews"):
            decode(data | {"previews": previews})


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"decoder": "vae"}, "decoder"),
        ({"taesd": " "}, "taesd"),
        ({"every": 0}, "every"),
        ({"min_interval": -1.0}, "min_interval"),
        ({"max_side": 8}, "max_side"),
        ({"quality": 100}, "quality"),
    ],
)
def test_preview_options_name_the_bad_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field} "):
        PreviewOptions(**change)


def _latents(count: int = 2, height: int = 8, width: int = 12) -> torch.Tensor:
    return torch.randn(count, 4, height, width, generator=torch.Generator().manual_seed(0))


def _frame(data: bytes) -> Image.Image:
    assert data.startswith(b"\xff\xd8\xff")
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG"
    return image


def test_latent2rgb_frames_are_jpegs_fitting_max_side() -> None:
    previewer = Previewer.load(PreviewOptions(decoder="latent2rgb", max_side=48), device="cpu")
    assert previewer is not None and previewer.decoder == "latent2rgb"
    latents = _latents(3)
    pixels = previewer.decode(latents, [0, 2])
    assert pixels.shape == (2, 8, 12, 3) and pixels.dtype == np.uint8  # 1/8 of a 96x64 image
    frames = [_frame(previewer.encode(image).result()) for image in pixels]
    assert [frame.size for frame in frames] == [(48, 32), (48, 32)]
    # The map is linear: the first latent channel's colours, and opposite latents give opposite colours.
    [one] = previewer.decode(torch.zeros(1, 4, 1, 1) + torch.tensor([1.0, 0, 0, 0]).view(1, 4, 1, 1), [0])
    assert one[0, 0].tolist() == [round((0.3444 * 0.5 + 0.5) * 255), round((0.1385 * 0.5 + 0.5) * 255), 136]
    previewer.close()


def test_the_tiny_taesd_decodes_full_size_frames_to_jpegs_fitting_max_side(tiny_model_dir: Path) -> None:
    options = PreviewOptions(decoder="taesd", taesd=str(tiny_model_dir / "taesd"), max_side=40)
    previewer = Previewer.load(options, device="cpu")
    assert previewer is not None and previewer.decoder == "taesd"
    pixels = previewer.decode(_latents(2), [1])
    assert pixels.shape == (1, 64, 96, 3)  # TAESD decodes to the image's own size
    assert _frame(previewer.encode(pixels[0]).result()).size == (40, 27)
    previewer.close()


def test_taesd_that_cannot_be_loaded_falls_back_to_latent2rgb_saying_how_to_fix_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    options = PreviewOptions(decoder="taesd", taesd=str(tmp_path / "missing"))
    with caplog.at_level(logging.WARNING, logger="bot.engine.preview"):
        previewer = Previewer.load(options, device="cpu")
    assert previewer is not None and previewer.decoder == "latent2rgb"
    [record] = caplog.records
    assert "preview.taesd" in record.getMessage() and "missing" in record.getMessage()
    previewer.close()
    assert Previewer.load(PreviewOptions(decoder="off"), device="cpu") is None


def _worker_settings(model: Path, preview: PreviewOptions) -> WorkerSettings:
    options = EngineOptions(warmup_batches=(1,), warmup_sizes=((64, 64),), warmup_steps=1)
    return WorkerSettings(model_id=str(model), device="cpu", threads=1, options=options, preview=preview)


async def _frames(worker: WorkerProcess, specs: tuple[ImageSpec, ...], previews: tuple[int, ...]) -> list[Preview]:
    frames: list[Preview] = []
    call = Call(
        specs,
        lambda: None,
        lambda step, total: None,
        previews=previews,
        on_preview=lambda index, step, total, jpeg: frames.append(Preview(0, index, step, total, jpeg)),
    )
    images = await asyncio.wait_for(worker.render(call), 60)
    assert len(images) == len(specs)
    return frames


async def test_the_worker_sends_frames_every_n_steps_of_the_images_asked_for_and_throttles_them(
    tiny_model_dir: Path,
) -> None:
    seven = Settings(steps=7, width=64, height=64)
    specs = tuple(ImageSpec(prompt=f"species:fox {i}", negative_prompt="", seed=i, settings=seven) for i in range(3))
    every_other = PreviewOptions(decoder="taesd", taesd=str(tiny_model_dir / "taesd"), every=2, min_interval=0)
    rarely = PreviewOptions(decoder="latent2rgb", every=1, min_interval=3600, max_side=32)
    async with (
        WorkerProcess(_worker_settings(tiny_model_dir, every_other)) as frequent,
        WorkerProcess(_worker_settings(tiny_model_dir, rarely)) as throttled,
    ):
        frames, few = await asyncio.gather(_frames(frequent, specs, (0, 2)), _frames(throttled, specs, (1,)))
        # Every second step of the two images asked for, never the last step (the images follow at once), and all
        # of them before the images: a frame after them would have been dropped.
        assert sorted((frame.index, frame.step) for frame in frames) == [(i, s) for i in (0, 2) for s in (2, 4, 6)]
        assert {frame.total for frame in frames} == {7}
        assert all(_frame(frame.jpeg).size == (256, 256) for frame in frames)
        # One frame an hour: the first step's only.
        assert [(frame.index, frame.step) for frame in few] == [(1, 1)]
        assert _frame(few[0].jpeg).size == (32, 32)
        # A batch asking for no frames gets none.
        assert await _frames(frequent, specs[:1], ()) == []


def _flagging_model(tiny_model_dir: Path, folder: Path) -> Path:
    """Return a copy of the tiny model whose safety checker flags every image."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    shutil.copytree(tiny_model_dir, folder)
    checker = StableDiffusionSafetyChecker.from_pretrained(folder / "safety_checker")
    assert isinstance(checker, StableDiffusionSafetyChecker)
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-1e3)  # every concept's threshold far below any similarity
        checker.special_care_embeds_weights.fill_(-1e3)
    checker.save_pretrained(folder / "safety_checker")
    return folder


async def test_no_frame_shows_what_the_safety_checker_withholds(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = _flagging_model(tiny_model_dir, tmp_path / "flagging")
    seven = Settings(steps=7, width=64, height=64)
    spec = ImageSpec(prompt="species:fox", negative_prompt="", seed=1, settings=seven)
    every_other = PreviewOptions(decoder="taesd", taesd=str(tiny_model_dir / "taesd"), every=2, min_interval=0)
    frames: list[Preview] = []
    call = Call(
        (spec,),
        lambda: None,
        lambda step, total: None,
        previews=(0,),
        on_preview=lambda index, step, total, jpeg: frames.append(Preview(0, index, step, total, jpeg)),
    )
    async with WorkerProcess(_worker_settings(model, every_other)) as worker:
        [image] = await asyncio.wait_for(worker.render(call), 60)
    assert image.nsfw, "the result is withheld"
    assert frames == [], "and no frame of it was shown while it rendered"
