"""Which weights made an image: a folder's revision is the hash of its weights, carried into PNGs and the database."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

from PIL import Image
from safetensors.torch import load_file, save_file

from bot.admission import Requester
from bot.config import Config, GenerationConfig
from bot.engine import EngineOptions
from bot.engine.process import WorkerProcess
from bot.engine.protocol import WorkerSettings
from bot.engine.revision import folder_revision, short, snapshot_revision
from bot.feedback import export
from bot.prompts import Tokenizer
from bot.scheduler import Scheduler
from bot.service import open_service
from bot.storage import Database


def retrain(folder: Path) -> None:
    """Change one weight of a model folder in place: the same model id, a new checkpoint."""
    weights = next((folder / "unet").glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, weights)


def test_a_folder_is_named_by_its_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    (copy / "README.md").write_text("notes do not change the weights")
    revision = folder_revision(tiny_model_dir)
    assert revision.startswith("sha256:") and len(revision) == len("sha256:") + 64
    assert folder_revision(copy) == revision
    retrain(copy)
    assert folder_revision(copy) != revision
    assert short(revision) == revision[: len("sha256:") + 12]


def test_a_hub_snapshot_is_named_by_its_commit() -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert snapshot_revision(f"/cache/models--Sygil--Sygil-Diffusion/snapshots/{commit}") == commit
    assert snapshot_revision("/models/sygil") is None


async def test_two_checkpoints_are_told_apart_in_the_database_the_pngs_and_the_export(
    tiny_model_dir: Path, tmp_path: Path, clip_tokenizer: Tokenizer
) -> None:
    """One model folder, rendered from, then retrained in place and rendered from again (as after a restart)."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = Config(token="unused", generation=GenerationConfig(sizes=("64x64",), default_steps=2))
    rendered: list[tuple[str, int, bytes]] = []  # the folder's revision at the time, the job, its PNG
    async with await Database.open(tmp_path / "sygil.db") as db:
        for checkpoint in range(2):
            if checkpoint:
                retrain(folder)
            settings = WorkerSettings(
                model_id=str(folder), device="cpu", threads=1, options=EngineOptions(warmup_sizes=((64, 64),))
            )
            async with WorkerProcess(settings) as worker, Scheduler(workers=[worker], max_batch=4) as scheduler:
                service = await open_service(
                    config, db=db, scheduler=scheduler, model=str(folder), tokenizer=clip_tokenizer
                )
                admission = service.admit(Requester(user_id=1, guild_id=2, channel_id=3), prompt="species:seal")
                queued = await service.enqueue(admission)
                [image] = await service.wait(queued)
            rendered.append((folder_revision(folder), queued.job.id, image.png))

        out = io.StringIO()
        assert (await export(db, out)).images == 2
        records = [json.loads(line) for line in out.getvalue().splitlines()]
        exported = {record["job_id"]: record["model_revision"] for record in records}
        (old, old_job, _), (new, new_job, _) = rendered
        assert old != new
        for revision, job_id, png in rendered:
            [record] = await db.job_images(job_id=job_id)
            assert record.provenance is not None and record.provenance.model_revision == revision
            text = Image.open(io.BytesIO(png)).text  # type: ignore[attr-defined]
            assert json.loads(text["sygil"])["revision"] == revision
            assert f"Model revision: {revision}" in text["parameters"]
            assert exported[job_id] == revision
    assert (old_job, new_job) == (1, 2)
