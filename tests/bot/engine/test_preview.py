"""Live previews: the protocol's frames, the decoders (latent2rgb and a tiny TAESD) and the worker's throttle."""

from __future__ import annotations

from typing import Any

import pytest

from bot.engine.protocol import MAX_PREVIEW_BYTES, Preview, PreviewOptions, RenderBatch, decode, encode
from bot.engine.types import ImageSpec, Settings

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
