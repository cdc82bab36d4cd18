"""Hostile input: oversized or non-PNG init images, and worker text meant to break or phish in Discord."""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from PIL import Image

from bot.admission import Requester
from bot.cluster.wire import WorkerInfo
from bot.config import Config, GenerationConfig
from bot.engine.executor import Progress
from bot.engine.images import BadImage, open_init_image
from bot.engine.types import ImageSpec, RenderedImage
from bot.jobs import JobKind
from bot.prompts import Tokenizer
from bot.scheduler import Scheduler
from bot.service import ImageService, open_service
from bot.storage import Database
from tests.bot.cluster.test_pool import FakeWorker, eventually, running
from tests.redis_server import RedisServer

GUILD = 2
NOT_PNG = "That image is not a PNG: a variation starts only from a PNG image."
PHISHING = "[Free Nitro](https://evil.example/claim) **@everyone** `x`\n# Heading"


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buffer, format="JPEG")
    return buffer.getvalue()


def render(specs: Sequence[ImageSpec], progress: Progress | None = None, /) -> list[RenderedImage]:
    return [RenderedImage(png=png(8, 8), seed=spec.seed) for spec in specs]


@pytest.fixture
async def service(tmp_path: Path, clip_tokenizer: Tokenizer) -> AsyncIterator[ImageService]:
    config = Config(token="unused", generation=GenerationConfig(sizes=("64x64",), max_steps=50, max_count=4))
    async with await Database.open(tmp_path / "sygil.db") as db, Scheduler(render) as scheduler:
        yield await open_service(config, db=db, scheduler=scheduler, model="tiny", tokenizer=clip_tokenizer)


async def variation(service: ImageService, init_image: bytes) -> None:
    """Render one image, then ask for a variation of it starting from ``init_image``."""
    asker = Requester(user_id=1, guild_id=GUILD, channel_id=3)
    parent = await service.enqueue(service.admit(asker, prompt="species:seal"))
    await service.wait(parent)
    await service.complete(parent, message_id=None)
    source = await service.source(job_id=parent.job.id, index=0, guild_id=GUILD)
    admission = service.admit_remix(asker, kind=JobKind.VARIATION, parent=source, index=0)
    await service.enqueue(admission, init_image=init_image)


@pytest.mark.parametrize(
    ("init_image", "message"),
    [
        (png(4096, 4096), "That image is 4096×4096 pixels: a variation starts only from a PNG of at most 2048×2048."),
        (png(2049, 16), "That image is 2049×16 pixels: a variation starts only from a PNG of at most 2048×2048."),
        (jpeg(64, 64), NOT_PNG),
        (b"<html><script>alert(1)</script></html>", NOT_PNG),
    ],
    ids=["4096x4096-png", "too-wide-png", "jpeg", "html"],
)
async def test_a_variation_from_a_too_large_or_non_png_image_is_refused(
    service: ImageService, init_image: bytes, message: str
) -> None:
    with pytest.raises(BadImage) as refused:
        await variation(service, init_image)
    assert str(refused.value) == message
    assert await service.db.unfinished_jobs() == []  # refused before it was stored or queued
    await variation(service, png(64, 64))  # and the place it held is free again


def test_a_png_bomb_is_refused_before_it_is_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    # A header can claim far more pixels than its few bytes hold: the size is read and refused before decoding.
    header = png(64, 64)
    bomb = header[:16] + (60000).to_bytes(4, "big") + (60000).to_bytes(4, "big") + header[24:]
    with pytest.raises(BadImage, match=r"60000×60000 pixels"):
        open_init_image(bomb)
    # Pillow's own decompression-bomb warning is a refusal too, not a warning in the log.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(BadImage, match="decompression bomb"):
        open_init_image(png(64, 64))
    assert open_init_image(png(31, 31)).size == (31, 31)


def test_worker_text_in_a_heartbeat_is_escaped_and_capped() -> None:
    info = WorkerInfo("gpu_1", PHISHING, "cuda:0", PHISHING + "x" * 2100, "m", None, "float16", 1, 0, 0.0)
    loaded = WorkerInfo.load(info.dump())
    for text in (loaded.name, loaded.host, loaded.device_name):
        assert len(text) <= 64
        assert not set(text) & set("[]*`#@\n_") and "://" not in text, text
    assert loaded.device == "cuda:0" and loaded.name == "gpu-1"


async def test_queue_shows_a_hostile_device_name_escaped_and_capped(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bot")
    device_name = PHISHING + "x" * 2100
    async with running(redis_server.url) as (pool, _scheduler):
        async with FakeWorker(redis_server.url, "evil", device_name=device_name, host="**host**\n@here"):
            await eventually(lambda: bool(pool.workers))
            shown = pool.describe()
    assert len(shown) < 200, len(shown)
    for markup in ("[Free Nitro]", "](", "https://", "@everyone", "@here", "**", "`", "\n"):
        assert markup not in shown, markup
    assert shown.startswith("Workers: 1 up — -Free Nitro-(https:--evil.example/claim) ---everyone-- -x- - He… on ")
    joined = next(record.getMessage() for record in caplog.records if record.getMessage().startswith("Worker evil"))
    assert len(joined) < 300 and "\n" not in joined and "[Free Nitro]" not in joined
    assert "model Sygil/Sygil-Diffusion" in joined  # honest text is kept as it is
