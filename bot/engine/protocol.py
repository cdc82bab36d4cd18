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
    ``Preview``      a small JPEG of one image of a batch as it forms (only of the specs ``RenderBatch.previews``
                     names, at most every ``PreviewOptions.every`` steps and ``min_interval`` seconds)
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


PREVIEW_DECODERS = ("taesd", "latent2rgb", "off")
MAX_PREVIEW_BYTES = 256 * 1024  # a 256 px JPEG is about 10 KiB; anything near this is not a preview
_JPEG_SIGNATURE = b"\xff\xd8\xff"


@dataclass(frozen=True, slots=True)
class PreviewOptions:
    """How a worker draws the images forming while a batch renders; plain data, so it can cross to a worker."""

    decoder: str = "taesd"  # "taesd" | "latent2rgb" | "off"
    taesd: str = "madebyollin/taesd"  # a hub id or folder of a diffusers AutoencoderTiny
    every: int = 5  # steps between frames
    min_interval: float = 2.0  # seconds between frames of one batch, at least
    max_side: int = 256  # pixels of the JPEG's longer side
    quality: int = 70  # JPEG quality

    def __post_init__(self) -> None:
        if self.decoder not in PREVIEW_DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(PREVIEW_DECODERS)}, got {self.decoder!r}")
        if not isinstance(self.taesd, str) or not self.taesd.strip():  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValueError(f"taesd must be a hub id or a folder, got {self.taesd!r}")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValueError(f"every must be a whole number of steps >= 1, got {self.every!r}")
        if isinstance(self.min_interval, bool) or not 0 <= self.min_interval <= 3600:
            raise ValueError(f"min_interval must be between 0 and 3600 seconds, got {self.min_interval!r}")
        if isinstance(self.max_side, bool) or not isinstance(self.max_side, int) or not 16 <= self.max_side <= 1024:  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValueError(f"max_side must be a whole number of pixels between 16 and 1024, got {self.max_side!r}")
        if isinstance(self.quality, bool) or not isinstance(self.quality, int) or not 1 <= self.quality <= 95:  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValueError(f"quality must be a whole number between 1 and 95, got {self.quality!r}")

    @property
    def enabled(self) -> bool:
        return self.decoder != "off"


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
    preview: PreviewOptions | None = None  # None: no previews, whatever a batch asks for


@dataclass(frozen=True, slots=True)
class RenderBatch:
    batch_id: int
    specs: tuple[ImageSpec, ...]
    previews: tuple[int, ...] = ()  # the indices of the specs whose images the bot wants to see forming


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
class Preview:
    """One image of a batch as it forms: spec ``index`` after ``step`` of ``total`` steps, as a small JPEG."""

    batch_id: int
    index: int
    step: int
    total: int
    jpeg: bytes = field(repr=False)


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
FromWorker = Hello | LoadFailed | Started | Progress | Preview | Rendered | Failed
Message = ToWorker | FromWorker


def encode(message: Message) -> dict[str, Any]:
    """Return a message as plain data."""
    match message:
        case RenderBatch(batch_id, specs, previews):
            return {
                "type": "render",
                "batch_id": batch_id,
                "specs": [_spec_data(spec) for spec in specs],
                "previews": list(previews),
            }
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
        case Preview(batch_id, index, step, total, jpeg):
            return {"type": "preview", "batch_id": batch_id, "index": index, "step": step, "total": total, "jpeg": jpeg}
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
            specs = tuple(_spec(item) for item in data["specs"])
            return RenderBatch(data["batch_id"], specs, _previews(data.get("previews", []), len(specs)))
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
        if kind == "preview":
            return _preview(data)
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


def _previews(value: object, count: int) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise TypeError("previews is not a list")
    indices = tuple(cast(list[object], value))
    if not all(isinstance(index, int) and not isinstance(index, bool) and 0 <= index < count for index in indices):
        raise TypeError("previews holds something other than indices of the specs")
    return cast(tuple[int, ...], indices)


def _preview(data: Mapping[str, Any]) -> Preview:
    """Read a worker's preview frame, strictly: small, a JPEG, of a step within the batch's steps."""
    index, step, total = _int(data, "index"), _int(data, "step"), _int(data, "total")
    jpeg = _bytes(data, "jpeg")
    if index < 0 or not 1 <= step <= total <= 10_000:
        raise TypeError(f"index {index}, step {step} of {total} is not a step of a batch")
    if not jpeg.startswith(_JPEG_SIGNATURE) or len(jpeg) > MAX_PREVIEW_BYTES:
        raise TypeError(f"jpeg is not a JPEG of at most {MAX_PREVIEW_BYTES} bytes")
    return Preview(_int(data, "batch_id"), index, step, total, jpeg)


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
