"""The deployment files: compose.yaml runs Redis, the bot and a worker; the example configs load."""

from __future__ import annotations

from pathlib import Path

import yaml

from bot.config import Config

ROOT = Path(__file__).parents[1]


def test_compose_runs_redis_the_bot_and_a_worker_without_the_token() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text("utf-8"))
    services = compose["services"]
    assert set(services) == {"redis", "bot", "worker"}
    assert services["bot"]["command"][:2] == ["sygil-bot", "run"]
    assert services["worker"]["command"][:2] == ["sygil-bot", "worker"]
    assert "DISCORD_TOKEN" in services["bot"]["environment"]
    assert "DISCORD_TOKEN" not in services["worker"]["environment"]  # a worker never sees the token
    for name in ("bot", "worker"):
        assert services[name]["environment"]["SYGIL_BROKER"].startswith("redis://:${REDIS_PASSWORD}@redis:6379/")
    assert "--requirepass" in services["redis"]["command"]


def test_the_worker_example_config_loads_without_a_token() -> None:
    config = Config.load(ROOT / "worker.example.toml", environ={}, require_token=False)
    assert config.cluster.enabled and config.cluster.prefix == "sygil"
    assert config.model.devices == ("auto",)
