"""The cluster's stream entries: every protocol message survives the trip, bytes as they are."""

from __future__ import annotations

import pytest
import redis

from bot.cluster.wire import BotInfo, Keys, WorkerInfo, exact_revision, pack, unpack
from bot.config import Config
from bot.engine.protocol import Failed, FailureKind, Progress, RenderBatch, Rendered, Started
from bot.engine.types import ImageSpec, Mode, RenderedImage, Settings
from bot.errors import ConfigError
from tests.redis_server import RedisServer


def _as_redis_returns(fields: dict[str, str | bytes]) -> dict[bytes, bytes]:
    return {key.encode(): value if isinstance(value, bytes) else value.encode() for key, value in fields.items()}


@pytest.mark.parametrize(
    "message",
    [
        RenderBatch(
            7,
            (
                ImageSpec('species:seal, {"$blob": 0}', "blurry", 1, Settings(steps=4, width=64, height=64)),
                ImageSpec(
                    "species:cat", "", 2, Settings(mode=Mode.IMG2IMG, strength=0.6), init_image=b"\x89PNG\x00\xff"
                ),
            ),
        ),
        Started(7),
        Progress(7, 3, 25),
        Rendered(7, (RenderedImage(b"\x89PNG\r\n\x1a\n\x00", 1, False), RenderedImage(b"\x00", 2, True)), 1.5, None),
        Failed(7, FailureKind.OUT_OF_MEMORY, "CUDA out of memory"),
    ],
)
def test_a_message_survives_a_stream_entry(message: object) -> None:
    fields = pack(message, session="s1", worker="gpu-a")  # type: ignore[arg-type]
    assert all(isinstance(value, bytes) for key, value in fields.items() if key.startswith("b"))
    back, plain = unpack(_as_redis_returns(fields))
    assert back == message
    assert plain == {"session": "s1", "worker": "gpu-a"}


def test_a_malformed_entry_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="without its message"):
        unpack({b"session": b"s1"})
    fields = _as_redis_returns(pack(Rendered(1, (RenderedImage(b"png", 1, False),), 0.1)))
    del fields[b"b0"]
    with pytest.raises(ValueError, match="without its blob 0"):
        unpack(fields)


def test_announcements_round_trip() -> None:
    bot = BotInfo(session="abc", model="Sygil/Sygil-Diffusion", revision=None, lease=30.0)
    assert BotInfo.load(bot.dump()) == bot
    worker = WorkerInfo(
        "gpu-a", "host", "cuda:0", "NVIDIA H200", "Sygil/Sygil-Diffusion", "a" * 40, "float16", 2, 1, 1.0
    )
    assert WorkerInfo.load(worker.dump().encode()) == worker
    keys = Keys("test")
    assert (keys.batches, keys.events("gpu-a", "abc"), keys.beat("gpu-a", "cuda:0"), keys.own("gpu-a")) == (
        "test:batches",
        "test:w:gpu-a:events:abc",
        "test:w:gpu-a:beat:cuda:0",
        "test:w:gpu-a:*",
    )


def test_a_heartbeat_key_names_its_worker_and_device_or_nothing() -> None:
    keys = Keys("test")
    assert keys.beat_of("test:w:gpu-a:beat:cuda:0") == ("gpu-a", "cuda:0")
    assert keys.beat_of("test:w:gpu-a:beat:0-cuda:1") == ("gpu-a", "0-cuda:1")
    # A key a worker could not have been given, or one that does not name a plain worker and device, is nobody's.
    for key in ("test:w:gpu/a:beat:cpu", "test:w:gpu-a:beat:", "other:w:gpu-a:beat:cpu", "test:w:a:events:s",
                "test:w:gpu-a:beat:cpu <@1>", "test:w::beat:cpu", "test:w:" + "a" * 49 + ":beat:cpu"):  # fmt: skip
        assert keys.beat_of(key) is None, key


def test_exact_revisions() -> None:
    assert exact_revision("0123456789abcdef0123456789abcdef01234567")
    assert exact_revision("sha256:" + "0" * 64)
    assert not exact_revision("main") and not exact_revision("v1.0")


def test_cluster_settings() -> None:
    config = Config.from_dict({"cluster": {"broker": "redis://127.0.0.1:6379/0"}}, require_token=False)
    assert config.cluster.enabled and config.cluster.lease == 30.0
    assert not Config.from_dict({}, require_token=False).cluster.enabled
    from_env = Config.from_dict({}, require_token=False, environ={"SYGIL_BROKER": "redis://:pw@h:1/0"})
    assert from_env.cluster.broker == "redis://:pw@h:1/0"
    with pytest.raises(ConfigError, match=r"cluster\.broker: must be a redis://"):
        Config.from_dict({"cluster": {"broker": "http://x"}}, require_token=False)
    with pytest.raises(ConfigError, match="at least three heartbeats"):
        Config.from_dict({"cluster": {"broker": "redis://x", "lease": 1.0}}, require_token=False)


def test_the_test_redis_server_stops_and_starts_on_its_port(redis_server: RedisServer) -> None:
    client = redis_server.client()
    assert client.set("k", "v") and client.get("k") == b"v"
    redis_server.stop()
    with pytest.raises(redis.ConnectionError):
        client.get("k")
    redis_server.start()
    assert client.get("k") is None  # a restarted Redis is empty: the cluster must not count on its data
    client.close()


def test_the_announcement_names_each_revisions_stream() -> None:
    keys = Keys("sygil")
    production, candidate = "a" * 40, "sha256:" + "b" * 64
    info = BotInfo.load(BotInfo("s", "m", production, 30.0, (candidate,)).dump())
    assert info.candidates == (candidate,)
    assert info.stream_of(keys, production) == "sygil:batches"
    assert info.stream_of(keys, candidate) == "sygil:batches:sha256-bbbbbbbbbbbb"
    assert info.stream_of(keys, "c" * 40) is None and info.stream_of(keys, None) is None
    # An older bot's announcement has no candidates; a malformed list is no announcement.
    assert BotInfo.load('{"session": "s", "model": "m", "revision": null, "lease": 3}').candidates == ()
    assert BotInfo.read('{"session": "s", "model": "m", "revision": null, "lease": 3, "candidates": [1]}') is None
