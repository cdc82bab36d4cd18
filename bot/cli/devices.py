"""Which devices render, in which dtype, and the worker processes the commands start on them.

Shared by ``sygil-bot run`` and ``sygil-bot worker`` (one process per device) and ``sygil-bot imagine`` (one
device, in this process).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from bot.config import Config, ModelConfig
from bot.engine.revision import names_folder
from bot.errors import ConfigError

if TYPE_CHECKING:
    from bot.engine.process import WorkerProcess

log = logging.getLogger(__name__)


async def start_workers(
    config: Config, stack: contextlib.AsyncExitStack, *, candidates: bool = False
) -> list[WorkerProcess]:
    """Start one worker process per configured device, each loading the model; raise if any cannot.

    With ``candidates`` (the bot, not a remote worker), each device also gets one process per candidate revision
    (``model.candidates``): every revision stays loaded, each in its own process, so none is swapped in and out.
    """
    from bot.engine.process import WorkerProcess
    from bot.engine.protocol import WorkerSettings

    devices = _resolve_devices(config.model)
    revisions: list[str | None] = [None, *(config.model.candidates if candidates else ())]
    cpu_workers = sum(device == "cpu" for device, _ in devices) * len(revisions)
    # CPU workers share the cores rather than each spawning a thread per core.
    threads = max(1, (os.cpu_count() or 1) // cpu_workers) if cpu_workers else None
    workers = [
        WorkerProcess(
            WorkerSettings(
                model_id=_source(config.model, candidate)[0],
                revision=_source(config.model, candidate)[1],
                device=device,
                dtype=dtype,
                scheduler=config.model.scheduler,
                safety_checker=config.model.safety_checker,
                # Compiled kernels are kept beside the database, on the volume that outlives a container.
                options=config.engine_options(compile_cache=config.storage.path.parent / "compile-cache"),
                threads=threads if device == "cpu" else None,
                verbose=log.isEnabledFor(logging.DEBUG),
                preview=config.preview.options(),
            ),
            name=_name(f"{index}:{device}" if len(devices) > 1 else device, candidate),
            announce=not config.cluster.enabled,  # `sygil-bot worker` announces each device as a cluster worker
            serves=candidate,
        )
        for index, (device, dtype) in enumerate(devices)
        for candidate in revisions
    ]
    for worker in workers:
        stack.push_async_callback(worker.close)
    log.info("Loading %s on %s", config.model.id, ", ".join(f"{device} ({dtype})" for device, dtype in devices))
    for candidate in revisions[1:]:
        log.info("Loading candidate revision %s beside it on each device, in processes of its own", candidate)
    results = await asyncio.gather(*(worker.start() for worker in workers), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return workers


def _source(model: ModelConfig, candidate: str | None) -> tuple[str, str]:
    """Return the model id (or folder) and revision a worker of ``candidate`` loads; None: the production one."""
    if candidate is None:
        return model.id, model.revision
    if names_folder(candidate):
        return candidate, "main"  # a folder is named by its weights' hash, whatever revision says
    return model.id, candidate


def _name(device: str, candidate: str | None) -> str:
    """Return a worker's name: its device, and for a candidate's worker the candidate (a folder by its last part)."""
    if candidate is None:
        return device
    return f"{device}+{Path(candidate).name if names_folder(candidate) else candidate}"


def _resolve_devices(model: ModelConfig) -> list[tuple[str, str]]:
    """Return (device, dtype) for each worker: "auto" means every CUDA GPU, else the CPU."""
    import torch

    if model.devices == ("auto",) and torch.cuda.is_available():
        devices = [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    else:
        devices = list(model.devices)
    return [resolve_device(model, device) for device in devices]


def resolve_device(model: ModelConfig, device: str) -> tuple[str, str]:
    """Return (device, dtype) for one configured device: "auto" picks CUDA where there is one."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f'model.devices names {device}, but this machine has no CUDA GPU (set model.devices = ["cpu"])'
        )
    dtype = model.dtype
    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    return device, dtype
