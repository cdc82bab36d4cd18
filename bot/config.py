"""Typed settings from a TOML file plus the environment; every error names the file and the key."""

from __future__ import annotations

import logging
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from bot.cluster.broker import parse as parse_broker
from bot.cluster.wire import exact_revision, valid_name
from bot.engine.protocol import PREVIEW_DECODERS, PreviewOptions
from bot.engine.revision import names_folder, tag
from bot.engine.types import ATTENTIONS, EngineOptions
from bot.errors import ConfigError

T = TypeVar("T")
log = logging.getLogger(__name__)

DISCORD_API = "https://discord.com/api/v10"
DISCORD_GATEWAY = "wss://gateway.discord.gg/"
SCHEDULERS = ("dpm++", "ddim", "euler-a")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "float16", "bfloat16")
_SIZE = re.compile(r"(?P<width>\d+)x(?P<height>\d+)")


@dataclass(frozen=True, slots=True)
class DiscordConfig:
    api_base_url: str = DISCORD_API
    gateway_url: str = DISCORD_GATEWAY
    guild_ids: tuple[int, ...] = ()
    guild_ready_timeout: float = 2.0


@dataclass(frozen=True, slots=True)
class ModelConfig:
    id: str = "Sygil/Sygil-Diffusion"
    revision: str = "main"  # branch, tag or commit of a hub id; a local folder is named by its weights' hash
    # Other revisions served beside the production one, for the arena: branches, tags or commits of ``id``, or local
    # model folders. Each gets its own workers (and GPU memory).
    candidates: tuple[str, ...] = ()
    devices: tuple[str, ...] = ("auto",)  # one GPU worker process per entry
    device: str | None = None  # the older spelling of one device; read into ``devices``
    dtype: str = "auto"
    scheduler: str = "dpm++"
    safety_checker: bool = True
    attention_slicing: bool = False


@dataclass(frozen=True, slots=True)
class GenerationConfig:
    default_steps: int = 25
    max_steps: int = 50
    default_guidance: float = 7.0
    min_guidance: float = 1.0
    max_guidance: float = 15.0
    max_count: int = 4
    default_count: int = 1
    sizes: tuple[str, ...] = ("512x512", "512x768", "768x512", "640x640")
    # Deprecated: the one Variation's strength before [variation]; read as variation.subtle when [variation] is absent.
    variation_strength: float = 0.6

    def size(self, name: str) -> tuple[int, int]:
        """Return (width, height) of a size preset such as ``512x768``."""
        match = _SIZE.fullmatch(name)
        if match is None:
            raise ValueError(f"size must look like 512x768, got {name!r}")
        return int(match["width"]), int(match["height"])


@dataclass(frozen=True, slots=True)
class VariationConfig:
    """How far each Vary button moves from its image (img2img strength)."""

    subtle: float = 0.35
    strong: float = 0.7


@dataclass(frozen=True, slots=True)
class UpscaleConfig:
    """Upscale x2: img2img of an image at twice its width and height (hires fix), at this strength."""

    strength: float = 0.35


@dataclass(frozen=True, slots=True)
class PromptsConfig:
    blocklist: tuple[str, ...] = ()
    allow_truncation: bool = False
    rating_channels: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class QueueConfig:
    max_queue: int = 32
    max_batch: int = 8
    max_per_user: int = 3
    images_per_hour: int = 60
    shutdown_grace: float = 30.0
    server_share: float = 0.5  # of max_queue, the most jobs one server (DMs count as one) holds at once


@dataclass(frozen=True, slots=True)
class EngineConfig:
    compile: bool = False
    cuda_graphs: bool = False
    channels_last: bool = True
    fused_qkv: bool = True
    attention: str = "sdpa"
    warmup_batches: tuple[int, ...] = ()  # empty: 1, 2, 4, ... below queue.max_batch, and max_batch
    warmup_sizes: tuple[str, ...] = ()  # empty: the first of generation.sizes


@dataclass(frozen=True, slots=True)
class ModerationConfig:
    # Role ids (numbers) or role names (text) whose members may use /mod besides those with Manage Server.
    roles: tuple[int | str, ...] = ()
    # The most a moderator may grant (/mod limits set), and the most a stored override gives, whatever it says;
    # never below the config's own default (queue.images_per_hour, queue.max_per_user).
    max_images_per_hour: int = 600
    max_queued: int = 32


@dataclass(frozen=True, slots=True)
class StorageConfig:
    path: Path = Path("sygil.db")
    keep_images: bool = False  # also write every PNG under the storage folder (images/), for training data
    forget_deleted: bool = False  # a deleted result's rows and votes go too (else they stay, marked deleted)


@dataclass(frozen=True, slots=True)
class StatsConfig:
    min_votes: int = 3  # a namespace or tag needs this many votes before /stats ranks it


@dataclass(frozen=True, slots=True)
class ArenaConfig:
    """The blind A/B arena between model revisions."""

    rate: float = 0.0  # the share of /imagine requests also rendered by a candidate and shown as a blind pair
    max_votes_per_day: int = 200  # a member's arena votes counted per UTC day; later ones are stored, not counted


@dataclass(frozen=True, slots=True)
class PreviewConfig:
    """The image forming in the status message while a job renders."""

    decoder: str = "taesd"  # "taesd" | "latent2rgb" (no weights, blurry) | "off"
    taesd: str = "madebyollin/taesd"  # hub id or folder of a diffusers AutoencoderTiny
    every: int = 5  # steps between frames
    min_interval: float = 2.0  # seconds between edits of a status message (Discord rate-limits edits)
    max_side: int = 256  # pixels of the frame's longer side
    quality: int = 70  # JPEG quality

    def options(self) -> PreviewOptions | None:
        """Return what a worker needs to draw frames, or None when previews are off."""
        if self.decoder == "off":
            return None
        return PreviewOptions(
            decoder=self.decoder,
            taesd=self.taesd,
            every=self.every,
            min_interval=self.min_interval,
            max_side=self.max_side,
            quality=self.quality,
        )


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """Remote GPU workers through Redis Streams; an empty broker (the default) keeps the workers in this process."""

    broker: str = ""  # redis://host:6379/0 or rediss://:password@host:6380/0; SYGIL_BROKER overrides it
    prefix: str = "sygil"  # every Redis key starts with this: one Redis can serve several bots
    lease: float = 30.0  # seconds a batch stays with a worker that stopped renewing it before another takes it
    heartbeat: float = 2.0  # seconds between announcements; one missing three of them is gone
    name: str = ""  # this worker's name (its Redis user's); empty: the broker URL's user, else host name and process id
    max_image_mib: float = 8.0  # the bot refuses a rendered PNG larger than this from a worker
    seconds_per_step: float = 2.0  # a batch's deadline: this many seconds per step and megapixel, plus the lease
    strikes: int = 3  # bad results or missed deadlines in a row after which the bot refuses a worker

    @property
    def enabled(self) -> bool:
        return bool(self.broker)


@dataclass(frozen=True, slots=True)
class Config:
    token: str = field(repr=False)
    discord: DiscordConfig = DiscordConfig()
    model: ModelConfig = ModelConfig()
    generation: GenerationConfig = GenerationConfig()
    variation: VariationConfig = VariationConfig()
    upscale: UpscaleConfig = UpscaleConfig()
    prompts: PromptsConfig = PromptsConfig()
    queue: QueueConfig = QueueConfig()
    engine: EngineConfig = EngineConfig()
    moderation: ModerationConfig = ModerationConfig()
    storage: StorageConfig = StorageConfig()
    stats: StatsConfig = StatsConfig()
    arena: ArenaConfig = ArenaConfig()
    cluster: ClusterConfig = ClusterConfig()
    preview: PreviewConfig = PreviewConfig()

    @classmethod
    def load(cls, path: Path, *, environ: Mapping[str, str] = os.environ, require_token: bool = True) -> Config:
        """Read settings from ``path`` and the token from ``DISCORD_TOKEN``."""
        try:
            text = path.read_text("utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file (copy config.example.toml to start one)") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read the config file: {exc}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        return cls.from_dict(data, source=str(path), environ=environ, require_token=require_token, folder=path.parent)

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        source: str = "<config>",
        environ: Mapping[str, str] = os.environ,
        require_token: bool = True,
        folder: Path | None = None,
    ) -> Config:
        """Build settings from parsed TOML, naming ``source`` and the key in every error.

        A relative storage.path is taken from ``folder`` (the config file's), so the bot finds its database whatever
        folder it is started from; None leaves it relative to the working folder.
        """
        reader = _Reader(source, data)
        token = environ.get("DISCORD_TOKEN", "").strip()
        if require_token and not token:
            raise ConfigError("DISCORD_TOKEN is not set: export your bot token in the environment (never in the file)")
        if "token" in data.get("discord", {}):
            raise ConfigError(f"{source}: discord.token: the token must not be in the file; set DISCORD_TOKEN instead")
        config = cls(
            token=token,
            discord=reader.section("discord", DiscordConfig, {"guild_ids": _ids}),
            model=_model(
                reader.section(
                    "model", ModelConfig, {"devices": _devices, "device": _device, "candidates": _candidates}
                ),
                source,
            ),
            generation=reader.section("generation", GenerationConfig, {"sizes": _sizes}),
            variation=_variation(reader.section("variation", VariationConfig), data, source),
            upscale=reader.section("upscale", UpscaleConfig),
            prompts=reader.section("prompts", PromptsConfig, {"blocklist": _terms, "rating_channels": _ids}),
            queue=reader.section("queue", QueueConfig),
            engine=reader.section(
                "engine", EngineConfig, {"warmup_batches": _batches, "warmup_sizes": _optional_sizes}
            ),
            moderation=reader.section("moderation", ModerationConfig, {"roles": _roles}),
            storage=_storage(reader.section("storage", StorageConfig, {"path": _path}), folder),
            stats=reader.section("stats", StatsConfig),
            arena=reader.section("arena", ArenaConfig),
            cluster=_cluster(
                reader.section("cluster", ClusterConfig, {"broker": _optional_text, "name": _optional_text}),
                environ,
                source,
            ),
            preview=reader.section("preview", PreviewConfig),
        )
        reader.finish()
        _check(config, source)
        return config

    def engine_options(self, compile_cache: Path | None = None) -> EngineOptions:
        """Return the engine's speed settings, filling empty warm-up lists from the queue and generation settings."""
        engine = self.engine
        max_batch = self.queue.max_batch
        batches = engine.warmup_batches
        if not batches:
            doubling = [1 << power for power in range(max_batch.bit_length()) if 1 << power < max_batch]
            batches = (*doubling, max_batch)
        sizes = engine.warmup_sizes or self.generation.sizes[:1]
        # model.attention_slicing predates [engine]; true still means slicing.
        attention = "slicing" if self.model.attention_slicing else engine.attention
        return EngineOptions(
            compile=engine.compile,
            cuda_graphs=engine.cuda_graphs,
            channels_last=engine.channels_last,
            fused_qkv=engine.fused_qkv,
            attention=attention,
            warmup_batches=batches,
            warmup_sizes=tuple(self.generation.size(size) for size in sizes),
            compile_cache=None if compile_cache is None else str(compile_cache),
        )


class _Reader:
    """Walk the TOML tables, converting each key to its field's type and remembering which keys were used."""

    def __init__(self, source: str, data: Mapping[str, Any]) -> None:
        self._source = source
        self._data = data
        self._unknown = [name for name in data if name not in _SECTIONS]

    def section(
        self,
        name: str,
        kind: Callable[..., T],
        converters: Mapping[str, Callable[[Any], Any]] | None = None,
    ) -> T:
        table = self._data.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{self._source}: {name}: must be a table ([{name}])")
        known = {item.name: item for item in fields(kind)}  # type: ignore[arg-type]
        values: dict[str, Any] = {}
        for key, value in table.items():  # pyright: ignore[reportUnknownVariableType]
            key = str(key)  # pyright: ignore[reportUnknownArgumentType]
            if key not in known:
                self._unknown.append(f"{name}.{key}")
                continue
            default = known[key].default
            try:
                if converters and key in converters:
                    values[key] = converters[key](value)
                else:
                    values[key] = _convert(value, type(default))  # pyright: ignore[reportUnknownArgumentType]
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{self._source}: {name}.{key}: {exc}") from None
        return kind(**values)

    def finish(self) -> None:
        if self._unknown:
            raise ConfigError(f"{self._source}: unknown setting {self._unknown[0]} (see config.example.toml)")


_SECTIONS = (
    "discord",
    "model",
    "generation",
    "variation",
    "upscale",
    "prompts",
    "queue",
    "engine",
    "moderation",
    "storage",
    "stats",
    "arena",
    "cluster",
    "preview",
)


def _variation(variation: VariationConfig, data: Mapping[str, Any], source: str) -> VariationConfig:
    """Read the older generation.variation_strength as the subtle strength when the file has no [variation]."""
    generation = data.get("generation", {})
    if not isinstance(generation, dict) or "variation_strength" not in generation:
        return variation
    if "variation" in data:
        log.warning(
            "%s: generation.variation_strength is ignored: [variation] sets the strengths (subtle, strong); "
            "remove generation.variation_strength",
            source,
        )
        return variation
    strength = _convert(generation["variation_strength"], float)  # pyright: ignore[reportUnknownArgumentType]
    log.warning(
        "%s: generation.variation_strength is deprecated: it is read as variation.subtle = %g; write "
        "[variation] subtle = %g (and strong) instead",
        source,
        strength,
        strength,
    )
    return replace(variation, subtle=strength)


def _cluster(cluster: ClusterConfig, environ: Mapping[str, str], source: str) -> ClusterConfig:
    """Take the broker from SYGIL_BROKER when set (so its password need not be in the file), and check the URL."""
    from_environment = environ.get("SYGIL_BROKER", "").strip()
    broker = from_environment or cluster.broker.strip()
    if broker:
        try:
            parse_broker(broker)
        except ValueError as exc:  # its message never quotes the URL: it may hold the password
            raise ConfigError(f"{'SYGIL_BROKER' if from_environment else f'{source}: cluster.broker'}: {exc}") from None
    if cluster.lease <= 0 or cluster.heartbeat <= 0:
        raise ConfigError(f"{source}: cluster.lease and cluster.heartbeat: must be more than 0 seconds")
    if cluster.lease < 3 * cluster.heartbeat:
        raise ConfigError(f"{source}: cluster.lease: must be at least three heartbeats ({3 * cluster.heartbeat:g} s)")
    if cluster.max_image_mib <= 0 or cluster.seconds_per_step <= 0:
        raise ConfigError(f"{source}: cluster.max_image_mib and cluster.seconds_per_step: must be more than 0")
    if cluster.strikes < 1:
        raise ConfigError(f"{source}: cluster.strikes: must be at least 1, got {cluster.strikes}")
    if cluster.name and not valid_name(cluster.name):
        raise ConfigError(
            f"{source}: cluster.name: 1 to 48 letters, digits, '.', '_' or '-', starting with a letter or digit "
            "(it names the worker's Redis keys and user)"
        )
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", cluster.prefix):
        raise ConfigError(f"{source}: cluster.prefix: letters, digits, '_', '.' and '-' only")
    return replace(cluster, broker=broker)


def _storage(storage: StorageConfig, folder: Path | None) -> StorageConfig:
    if folder is None or storage.path.is_absolute():
        return storage
    return replace(storage, path=folder / storage.path)


def _convert(value: Any, kind: type) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise TypeError(f"must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"must be a whole number, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"must be a number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str) or not value.strip():
            raise TypeError(f"must be a non-empty string, got {value!r}")
        return value.strip()
    raise TypeError(f"unsupported setting type {kind.__name__}")


def _optional_text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"must be a string, got {value!r}")
    return value.strip()


def _device(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise TypeError(f'must be a device name like "cuda:0", got {value!r}')
    name = value.strip()
    if name not in DEVICES and not re.fullmatch(r"cuda:\d+", name):
        raise ValueError(f"must be one of {', '.join(DEVICES)} (or cuda:N), got {name!r}")
    return name


def _devices(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise TypeError(f'must be a non-empty list of devices, like ["auto"] or ["cuda:0", "cuda:1"], got {value!r}')
    devices = tuple(_device(item) for item in value)  # pyright: ignore[reportUnknownVariableType]
    if "auto" in devices and len(devices) > 1:
        raise ValueError('"auto" (every GPU, else the CPU) cannot be combined with other devices')
    return devices


def _model(model: ModelConfig, source: str) -> ModelConfig:
    """Read the older ``model.device`` into ``model.devices``."""
    if model.device is None:
        return model
    if model.devices != ModelConfig().devices:
        raise ConfigError(f"{source}: model.device: set model.devices only (model.device is its older one-device form)")
    return replace(model, devices=(model.device,), device=None)


def _candidates(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) and item.strip() for item in value):  # pyright: ignore[reportUnknownVariableType]
        raise TypeError(
            f'must be a list of revisions of model.id or model folders, like ["v2", "/models/sygil-v2"], got {value!r}'
        )
    candidates = tuple(str(item).strip() for item in value)  # pyright: ignore[reportUnknownVariableType, reportUnknownArgumentType]
    for index, candidate in enumerate(candidates):
        if candidate in candidates[:index]:
            raise ValueError(f"{candidate!r} is listed twice")
    return candidates


def _check_candidates(config: Config, source: str) -> None:
    """Refuse a candidate that is the production revision, and, with a cluster, candidates it cannot tell apart."""
    model = config.model
    production_folder = Path(model.id).expanduser().is_dir()
    for candidate in model.candidates:
        folder = names_folder(candidate)
        same = (
            Path(candidate).expanduser().resolve() == Path(model.id).expanduser().resolve()
            if folder and production_folder
            else not folder and not production_folder and candidate == model.revision
        )
        if same:
            raise ConfigError(
                f"{source}: model.candidates: {candidate!r} is the production model (model.id and model.revision); "
                "list only other revisions"
            )
    if not config.cluster.enabled or not model.candidates:
        return
    # Remote workers say which exact weights they serve: the bot tells the revisions apart only by those.
    for key, revision in (("model.revision", model.revision), *(("model.candidates", c) for c in model.candidates)):
        if not exact_revision(revision):
            raise ConfigError(
                f"{source}: {key}: with model.candidates and a cluster, name each revision exactly (a 40-digit "
                f"commit, or sha256:… of a folder, as a worker logs it when it starts), not {revision!r}"
            )
    tags = [tag(revision) for revision in (model.revision, *model.candidates)]
    if len(set(tags)) != len(tags):
        raise ConfigError(f"{source}: model.candidates: two revisions start with the same 12 digits; give others")


def _ids(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise TypeError(f"must be a list of Discord ids, got {value!r}")
    ids: list[int] = []
    for item in value:  # pyright: ignore[reportUnknownVariableType]
        if isinstance(item, bool) or not isinstance(item, int | str) or not str(item).isdigit():  # pyright: ignore[reportUnknownArgumentType]
            raise TypeError(f"must be a list of numeric Discord ids, got {item!r}")
        ids.append(int(item))  # pyright: ignore[reportUnknownArgumentType]
    return tuple(ids)


def _roles(value: Any) -> tuple[int | str, ...]:
    if not isinstance(value, list):
        raise TypeError(f'must be a list of role ids or names, like [123456789012345678, "Moderators"], got {value!r}')
    roles: list[int | str] = []
    for item in value:  # pyright: ignore[reportUnknownVariableType]
        if isinstance(item, bool) or not isinstance(item, int | str) or not str(item).strip():  # pyright: ignore[reportUnknownArgumentType]
            raise TypeError(f"each role must be a role id (a number) or a role name (text), got {item!r}")
        text = str(item).strip()  # pyright: ignore[reportUnknownArgumentType]
        roles.append(int(text) if text.isdigit() else text)
    return tuple(roles)


def _terms(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) and item.strip() for item in value):  # pyright: ignore[reportUnknownVariableType]
        raise TypeError(f'must be a list of non-empty strings, like ["term", "two words"], got {value!r}')
    return tuple(str(item).strip() for item in value)  # pyright: ignore[reportUnknownVariableType, reportUnknownArgumentType]


def _sizes(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise TypeError(f'must be a non-empty list like ["512x512", "512x768"], got {value!r}')
    sizes: list[str] = []
    for item in value:  # pyright: ignore[reportUnknownVariableType]
        match = _SIZE.fullmatch(str(item))  # pyright: ignore[reportUnknownArgumentType]
        if match is None:
            raise ValueError(f'each size must look like "512x768", got {item!r}')
        width, height = int(match["width"]), int(match["height"])
        if width % 8 or height % 8 or not (64 <= width <= 2048 and 64 <= height <= 2048):
            raise ValueError(f"{item}: width and height must be multiples of 8 between 64 and 2048")
        sizes.append(f"{width}x{height}")
    if len(sizes) > 25:
        raise ValueError("at most 25 sizes (Discord shows at most 25 choices)")
    return tuple(sizes)


def _batches(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(item, int) and not isinstance(item, bool) for item in value):  # pyright: ignore[reportUnknownVariableType]
        raise TypeError(f"must be a list of whole numbers like [1, 2, 4, 8], got {value!r}")
    return tuple(sorted(set(value)))  # pyright: ignore[reportUnknownArgumentType]


def _optional_sizes(value: Any) -> tuple[str, ...]:
    if isinstance(value, list) and not value:
        return ()
    return _sizes(value)


def _path(value: Any) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise TypeError(f"must be a file path, got {value!r}")
    return Path(value).expanduser()


def _check(config: Config, source: str) -> None:
    """Reject combinations of values that would break at run time."""

    def fail(key: str, why: str) -> None:
        raise ConfigError(f"{source}: {key}: {why}")

    for key, url, schemes in (
        ("discord.api_base_url", config.discord.api_base_url, ("http://", "https://")),
        ("discord.gateway_url", config.discord.gateway_url, ("ws://", "wss://")),
    ):
        if not url.startswith(schemes):
            fail(key, f"must start with {' or '.join(schemes)}, got {url!r}")
    if config.discord.guild_ready_timeout < 0:
        fail("discord.guild_ready_timeout", "must not be negative")
    if config.model.dtype not in DTYPES:
        fail("model.dtype", f"must be one of {', '.join(DTYPES)}, got {config.model.dtype!r}")
    if config.model.scheduler not in SCHEDULERS:
        fail("model.scheduler", f"must be one of {', '.join(SCHEDULERS)}, got {config.model.scheduler!r}")
    gen = config.generation
    if not 1 <= gen.max_steps <= 150:
        fail("generation.max_steps", f"must be between 1 and 150, got {gen.max_steps}")
    if not 1 <= gen.default_steps <= gen.max_steps:
        fail("generation.default_steps", f"must be between 1 and generation.max_steps ({gen.max_steps})")
    if not 0 <= gen.min_guidance <= gen.max_guidance <= 30:
        fail("generation.min_guidance", "need 0 <= min_guidance <= max_guidance <= 30")
    if not gen.min_guidance <= gen.default_guidance <= gen.max_guidance:
        fail("generation.default_guidance", f"must be between {gen.min_guidance} and {gen.max_guidance}")
    if not 1 <= gen.max_count <= 4:
        fail("generation.max_count", f"must be between 1 and 4 (one row of buttons per image), got {gen.max_count}")
    if not 1 <= gen.default_count <= gen.max_count:
        fail("generation.default_count", f"must be between 1 and generation.max_count ({gen.max_count})")
    if not 0 < gen.variation_strength <= 1:
        fail("generation.variation_strength", f"must be in (0, 1], got {gen.variation_strength}")
    for key, strength in (
        ("variation.subtle", config.variation.subtle),
        ("variation.strong", config.variation.strong),
        ("upscale.strength", config.upscale.strength),
    ):
        if not 0 < strength <= 1:
            fail(key, f"must be more than 0 and at most 1 (an img2img strength), got {strength:g}")
    queue = config.queue
    if queue.max_batch < gen.max_count:
        fail("queue.max_batch", f"must be at least generation.max_count ({gen.max_count}), got {queue.max_batch}")
    if queue.max_queue < 1:
        fail("queue.max_queue", f"must be at least 1, got {queue.max_queue}")
    if queue.max_per_user < 1:
        fail("queue.max_per_user", f"must be at least 1, got {queue.max_per_user}")
    if queue.images_per_hour < 0:
        fail("queue.images_per_hour", f"must not be negative (0 lets nobody generate), got {queue.images_per_hour}")
    if not 0 < queue.shutdown_grace <= 3600:
        fail("queue.shutdown_grace", f"must be between 0 and 3600 seconds, got {queue.shutdown_grace}")
    if not 0 < queue.server_share <= 1:
        fail(
            "queue.server_share", f"must be more than 0 and at most 1 (a share of max_queue), got {queue.server_share}"
        )
    for key, cap in (
        ("moderation.max_images_per_hour", config.moderation.max_images_per_hour),
        ("moderation.max_queued", config.moderation.max_queued),
    ):
        if cap < 1:
            fail(key, f"must be at least 1, got {cap}")
    engine = config.engine
    if engine.attention not in ATTENTIONS:
        fail("engine.attention", f"must be one of {', '.join(ATTENTIONS)}, got {engine.attention!r}")
    if config.model.attention_slicing and engine.attention not in ("sdpa", "slicing"):
        fail(
            "model.attention_slicing", f"true means engine.attention = slicing, which contradicts {engine.attention!r}"
        )
    for batch in engine.warmup_batches:
        if not 1 <= batch <= queue.max_batch:
            fail(
                "engine.warmup_batches", f"each must be between 1 and queue.max_batch ({queue.max_batch}), got {batch}"
            )
    _check_candidates(config, source)
    if config.stats.min_votes < 1:
        fail("stats.min_votes", f"must be at least 1 (a rate needs a vote to rank by), got {config.stats.min_votes}")
    if not 0 <= config.arena.rate <= 1:
        fail("arena.rate", f"must be between 0 and 1 (a share of /imagine requests), got {config.arena.rate}")
    if config.arena.max_votes_per_day < 1:
        fail("arena.max_votes_per_day", f"must be at least 1, got {config.arena.max_votes_per_day}")
    _check_preview(config.preview, fail)


def _check_preview(preview: PreviewConfig, fail: Callable[[str, str], None]) -> None:
    if preview.decoder not in PREVIEW_DECODERS:
        fail("preview.decoder", f"must be one of {', '.join(PREVIEW_DECODERS)}, got {preview.decoder!r}")
    if preview.every < 1:
        fail("preview.every", f"must be at least 1 (steps between frames), got {preview.every}")
    if not 0 <= preview.min_interval <= 3600:
        fail("preview.min_interval", f"must be between 0 and 3600 seconds, got {preview.min_interval:g}")
    if not 16 <= preview.max_side <= 1024:
        fail("preview.max_side", f"must be between 16 and 1024 pixels, got {preview.max_side}")
    if not 1 <= preview.quality <= 95:
        fail("preview.quality", f"must be between 1 and 95 (JPEG quality), got {preview.quality}")
