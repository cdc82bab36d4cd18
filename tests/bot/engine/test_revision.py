"""Which weights made an image: a folder's revision is the hash of its weights, carried into PNGs and the database."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from bot.config import Config, GenerationConfig
from bot.engine import EngineOptions
from bot.engine.process import WorkerProcess
from bot.engine.protocol import WorkerSettings
from bot.engine.revision import folder_revision, short, snapshot_revision
from bot.prompts import Tokenizer
from bot.scheduler import Scheduler
from bot.service import Requester, open_service
from bot.storage import Database


def _retrained(source: Path, target: Path) -> Path:
    """Copy a model folder and change one weight: the same model id, a new checkpoint."""
    shutil.copytree(source, target)
    weights = next((target / "unet").glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, weights)
    return target


def test_a_folder_is_named_by_its_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    (copy / "README.md").write_text("notes do not change the weights")
    revision = folder_revision(tiny_model_dir)
    assert revision.startswith("sha256:") and len(revision) == len("sha256:") + 64
    assert folder_revision(copy) == revision
    assert folder_revision(_retrained(tiny_model_dir, tmp_path / "retrained")) != revision
    assert short(revision) == revision[: len("sha256:") + 12]


def test_a_hub_snapshot_is_named_by_its_commit() -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert snapshot_revision(f"/cache/models--Sygil--Sygil-Diffusion/snapshots/{commit}") == commit
    assert snapshot_revision("/models/sygil") is None


@pytest.mark.parametrize("retrain", [False, True])
async def test_two_checkpoints_are_told_apart_in_the_png_and_the_database(
    tiny_model_dir: Path, tmp_path: Path, clip_tokenizer: Tokenizer, retrain: bool
) -> None:
    folder = _retrained(tiny_model_dir, tmp_path / "model") if retrain else tiny_model_dir
    expected = folder_revision(folder)
    settings = WorkerSettings(
        model_id=str(folder), device="cpu", threads=1, options=EngineOptions(warmup_sizes=((64, 64),))
    )
    config = Config(token="unused", generation=GenerationConfig(sizes=("64x64",), default_steps=2))
    async with (
        await Database.open(tmp_path / "sygil.db") as db,
        WorkerProcess(settings) as worker,
        Scheduler(workers=[worker], max_batch=4) as scheduler,
    ):
        service = await open_service(config, db=db, scheduler=scheduler, model=str(folder), tokenizer=clip_tokenizer)
        admission = service.admit(Requester(user_id=1, guild_id=2, channel_id=3), prompt="species:seal")
        queued = await service.enqueue(admission)
        [image] = await service.wait(queued)
        [record] = await db.job_images(job_id=queued.job.id)
    assert record.provenance is not None and record.provenance.model_revision == expected
    text = Image.open(io.BytesIO(image.png)).text  # type: ignore[attr-defined]
    assert json.loads(text["sygil"])["revision"] == expected
    assert f"Model revision: {expected}" in text["parameters"]
    if retrain:
        assert expected != folder_revision(tiny_model_dir)
