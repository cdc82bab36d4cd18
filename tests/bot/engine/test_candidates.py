"""A candidate revision served beside the production one: each job renders on the weights it asked for."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest

from bot.admission import Requester
from bot.cli.devices import start_workers
from bot.config import Config, GenerationConfig, ModelConfig, StorageConfig
from bot.engine.revision import folder_revision
from bot.errors import RevisionUnserved
from bot.prompts import Tokenizer
from bot.scheduler import Scheduler
from bot.service import open_service
from bot.storage import Database
from tests.bot.engine.test_revision import retrain


async def test_jobs_of_each_revision_are_rendered_by_that_revision_and_recorded(
    tiny_model_dir: Path, tmp_path: Path, clip_tokenizer: Tokenizer
) -> None:
    production = shutil.copytree(tiny_model_dir, tmp_path / "production")
    candidate = shutil.copytree(tiny_model_dir, tmp_path / "candidate")
    retrain(candidate)  # the same model, one weight changed: a new checkpoint to try
    config = Config(
        token="unused",
        model=ModelConfig(id=str(production), devices=("cpu",), candidates=(str(candidate),)),
        generation=GenerationConfig(sizes=("64x64",), default_steps=2),
        storage=StorageConfig(path=tmp_path / "sygil.db"),
    )
    async with contextlib.AsyncExitStack() as stack:
        # What `sygil-bot run` starts: one process per device for production, and one per candidate.
        workers = await start_workers(config, stack, candidates=True)
        assert [(worker.name, worker.serves) for worker in workers] == [
            ("cpu", None),
            ("cpu+candidate", str(candidate)),
        ]
        served = [worker.hello.engine["revision"] if worker.hello else None for worker in workers]
        assert served == [folder_revision(production), folder_revision(candidate)]
        db = await stack.enter_async_context(await Database.open(config.storage.path))
        scheduler = await stack.enter_async_context(Scheduler(workers=workers, max_batch=4))
        service = await open_service(
            config, db=db, scheduler=scheduler, model=config.model.id, tokenizer=clip_tokenizer
        )
        requester = Requester(user_id=1, guild_id=2, channel_id=3)
        jobs: dict[str | None, tuple[int, bytes]] = {}
        for revision in (None, str(candidate)):
            # The same prompt and seed: only the weights can make the images differ.
            admission = service.admit(requester, prompt="species:seal", seed=7)
            queued = await service.enqueue(admission, revision=revision)
            assert queued.job.revision == revision
            [image] = await service.wait(queued)
            jobs[revision] = (queued.job.id, image.png)

        for revision, folder in ((None, production), (str(candidate), candidate)):
            job_id, _ = jobs[revision]
            job = await db.get_job(job_id=job_id)
            assert job is not None and job.revision == revision
            [record] = await db.job_images(job_id=job_id)
            assert record.provenance is not None and record.provenance.model_revision == folder_revision(folder)
        assert jobs[None][1] != jobs[str(candidate)][1]

        admission = service.admit(requester, prompt="species:seal")
        with pytest.raises(RevisionUnserved, match="No GPU worker serves the model revision v9"):
            await service.enqueue(admission, revision="v9")
        assert not admission.place.taken  # its place in the queue was given back
        assert await db.get_job(job_id=max(job_id for job_id, _ in jobs.values()) + 1) is None  # nothing stored
