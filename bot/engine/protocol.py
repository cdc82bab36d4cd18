"""The plain data between the bot and a GPU worker: the one seam the bot scales out on.

Every message turns into a dict of str, int, float, bool, bytes, None, lists and dicts (``encode``) and back
(``decode``): nothing of torch, diffusers or Discord crosses. Today the dicts travel through a local pipe to a worker
process; the same dicts can travel through Redis to a worker on another host.

Bot to worker:
    ``RenderBatch``  render these specs (a worker takes batches in the order sent; it may hold two at once, so it
                     prepares the next while the GPU renders the current one)
    ``StopBatch``    stop that batch at its next step (nobody wants its images any more, or the bot is stopping)
    ``Shutdown``     finish nothing more and exit

Worker to bot:
    ``Hello``        the model is loaded and warmed up: where, on what, how long warm-up took
    ``LoadFailed``   the model could not be loaded (the message is for the person running the bot)
    ``Started``      a batch went on the GPU
    ``Progress``     a batch finished a denoising step
    ``Rendered``     a batch's images: PNG bytes, seeds, safety flags, and the GPU seconds they took
    ``Failed``       a batch did not render: out of memory, stopped, or an error whose message is for users
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from bot.engine.types import EngineOptions, ImageSpec, Mode, RenderedImage, Settings


class FailureKind(enum.StrEnum):
    OUT_OF_MEMORY = "oom"  # the batch may render in smaller parts
    STOPPED = "stopped"  # the bot asked for it
    ERROR = "error"  # this batch cannot render; the message says why


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """What a worker needs to load its model: given once, when the process starts."""

    model_id: str
    device: str
    revision: str = "main"
    dtype: str = "float32"
    scheduler: str = "dpm++"
    safety_checker: bool = True
    options: EngineOptions = field(default_factory=EngineOptions)
    threads: int | None = None  # CPU threads for torch; None leaves torch's default
    verbose: bool = False
    environ: Mapping[str, str] = field(
        default_factory=lambda: dict[str, str]()
    )  # set in the worker's environment before loading


@dataclass(frozen=True, slots=True)
class RenderBatch:
    batch_id: int
    specs: tuple[ImageSpec, ...]


@dataclass(frozen=True, slots=True)
class StopBatch:
    batch_id: int


@dataclass(frozen=True, slots=True)
class Shutdown:
    pass


@dataclass(frozen=True, slots=True)
class Hello:
    pid: int
    device: str
    device_name: str
    warmup_seconds: float
    engine: Mapping[str, Any] = field(
        default_factory=lambda: dict[str, Any]()
    )  # what is on: compile, channels_last, attention…


@dataclass(frozen=True, slots=True)
class LoadFailed:
    message: str
    unreachable: bool = False  # the hub could not be reached and the model is not cached: no setting is wrong


@dataclass(frozen=True, slots=True)
class Started:
    batch_id: int


@dataclass(frozen=True, slots=True)
class Progress:
    batch_id: int
    step: int
    total: int


@dataclass(frozen=True, slots=True)
class Rendered:
    batch_id: int
    images: tuple[RenderedImage, ...]
    seconds: float  # from Started to the last PNG: what the batch cost this worker
    peak_memory: int | None = None  # bytes of GPU memory at the peak, where the device reports it
    compiled: bool = False  # the compiled UNet rendered it (else the eager one)


@dataclass(frozen=True, slots=True)
class Failed:
    batch_id: int
    kind: FailureKind
    message: str


ToWorker = RenderBatch | StopBatch | Shutdown
FromWorker = Hello | LoadFailed | Started | Progress | Rendered | Failed
Message = ToWorker | FromWorker


def encode(message: Message) -> dict[str, Any]:
    """Return a message as plain data."""
    match message:
        case RenderBatch(batch_id, specs):
            return {"type": "render", "batch_id": batch_id, "specs": [_spec_data(spec) for spec in specs]}
        case StopBatch(batch_id):
            return {"type": "stop", "batch_id": batch_id}
        case Shutdown():
            return {"type": "shutdown"}
        case Hello(pid, device, device_name, warmup_seconds, engine):
            return {
                "type": "hello",
                "pid": pid,
                "device": device,
                "device_name": device_name,
                "warmup_seconds": warmup_seconds,
                "engine": dict(engine),
            }
        case LoadFailed(text, unreachable):
            return {"type": "load_failed", "message": text, "unreachable": unreachable}
        case Started(batch_id):
            return {"type": "started", "batch_id": batch_id}
        case Progress(batch_id, step, total):
            return {"type": "progress", "batch_id": batch_id, "step": step, "total": total}
        case Rendered(batch_id, images, seconds, peak_memory, compiled):
            return {
                "type": "rendered",
                "batch_id": batch_id,
                "images": [{"png": image.png, "seed": image.seed, "nsfw": image.nsfw} for image in images],
                "seconds": seconds,
                "peak_memory": peak_memory,
                "compiled": compiled,
            }
        case Failed(batch_id, kind, text):
            return {"type": "failed", "batch_id": batch_id, "kind": kind.value, "message": text}


def decode(data: Mapping[str, Any]) -> Message:
    """Return the message that ``encode`` turned into ``data``; raise ValueError for anything else."""
    if not isinstance(data, Mapping):  # pyright: ignore[reportUnnecessaryIsInstance] (JSON may be any value)
        raise ValueError(f"a message is a JSON object, not {type(data).__name__}")
    try:
        kind = data["type"]
        if kind == "render":
            return RenderBatch(data["batch_id"], tuple(_spec(item) for item in data["specs"]))
        if kind == "stop":
            return StopBatch(data["batch_id"])
        if kind == "shutdown":
            return Shutdown()
        if kind == "hello":
            return Hello(data["pid"], data["device"], data["device_name"], data["warmup_seconds"], dict(data["engine"]))
        if kind == "load_failed":
            return LoadFailed(data["message"], bool(data.get("unreachable", False)))
        # What a worker sends is checked for type: a remote worker may be anyone (the bot trusts none of them).
        if kind == "started":
            return Started(_int(data, "batch_id"))
        if kind == "progress":
            return Progress(_int(data, "batch_id"), _int(data, "step"), _int(data, "total"))
        if kind == "rendered":
            items: Any = data["images"]
            if not isinstance(items, list):
                raise ValueError("malformed 'rendered' message: images is not a list")
            images = tuple(
                RenderedImage(png=_bytes(item, "png"), seed=_int(item, "seed"), nsfw=item["nsfw"] is True)
                for item in cast(list[Mapping[str, Any]], items)
            )
            peak = data["peak_memory"]
            return Rendered(
                _int(data, "batch_id"),
                images,
                _seconds(data["seconds"]),
                peak if isinstance(peak, int) and not isinstance(peak, bool) else None,
                data["compiled"] is True,
            )
        if kind == "failed":
            text = data["message"]
            return Failed(_int(data, "batch_id"), FailureKind(data["kind"]), text if isinstance(text, str) else "")
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"malformed {str(data.get('type', 'untyped'))[:20]!r} message: {error!r}") from None
    raise ValueError(f"unknown message type {kind!r}")


def _int(data: Mapping[str, Any], key: str) -> int:
    value = data[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{key} is not an integer")
    return value


def _bytes(data: Mapping[str, Any], key: str) -> bytes:
    value = data[key]
    if not isinstance(value, bytes):
        raise TypeError(f"{key} is not bytes")
    return value


def _seconds(value: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < 1e9:
        raise TypeError("seconds is not a number of seconds")
    return float(value)


def _spec_data(spec: ImageSpec) -> dict[str, Any]:
    settings = spec.settings
    return {
        "prompt": spec.prompt,
        "negative_prompt": spec.negative_prompt,
        "seed": spec.seed,
        "init_image": spec.init_image,
        "settings": {
            "steps": settings.steps,
            "guidance": settings.guidance,
            "width": settings.width,
            "height": settings.height,
            "mode": settings.mode.value,
            "strength": settings.strength,
        },
    }


def _spec(data: Mapping[str, Any]) -> ImageSpec:
    settings = data["settings"]
    return ImageSpec(
        prompt=data["prompt"],
        negative_prompt=data["negative_prompt"],
        seed=data["seed"],
        init_image=data["init_image"],
        settings=Settings(
            steps=settings["steps"],
            guidance=settings["guidance"],
            width=settings["width"],
            height=settings["height"],
            mode=Mode(settings["mode"]),
            strength=settings["strength"],
        ),
    )
