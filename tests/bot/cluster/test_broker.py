"""The broker URL as operators write it (raw passwords from ``openssl rand -base64 32``), and connecting with it."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import pytest

from bot.__main__ import main
from bot.cli.run import start_cluster
from bot.cluster.broker import BrokerURL, check, connect, parse, redacted
from bot.cluster.pool import ClusterPool
from bot.config import ClusterConfig, Config, ModelConfig
from bot.errors import ConfigError
from tests.redis_server import BASE64_PASSWORD, RedisServer
from tests.waiting import until

PASSWORD = BASE64_PASSWORD
assert {"+", "/", "="} <= set(PASSWORD) and len(PASSWORD) == 44


@pytest.mark.parametrize(
    ("url", "expected", "shown"),
    [
        (
            f"redis://:{PASSWORD}@redis:6379/0",
            BrokerURL("redis", host="redis", port=6379, db=0, password=PASSWORD),
            "redis://:***@redis:6379/0",
        ),
        (
            "rediss://bot:p@ss:w/rd@cache/1",
            BrokerURL("rediss", host="cache", port=6379, db=1, username="bot", password="p@ss:w/rd"),
            "rediss://bot:***@cache/1",
        ),
        (
            "redis://:a%2Fb%40c@[::1]:6380",
            BrokerURL("redis", host="::1", port=6380, password="a/b@c"),
            "redis://:***@[::1]:6380",
        ),
        ("redis://cache:6379", BrokerURL("redis", host="cache"), "redis://cache:6379"),
        (
            "unix://:pw/x@/run/redis.sock?db=2",
            BrokerURL("unix", path="/run/redis.sock", db=2, password="pw/x"),
            "unix://:***@/run/redis.sock?db=2",
        ),
    ],
)
def test_broker_urls_keep_raw_passwords_and_show_none(url: str, expected: BrokerURL, shown: str) -> None:
    broker = parse(url)
    assert broker == expected
    assert str(broker) == redacted(url) == shown
    if expected.password:
        assert expected.password not in repr(broker)


def test_an_unreadable_broker_url_is_one_line_naming_where_it_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = f"redis://:{PASSWORD}@redis:port/0"  # a port that is not a number
    config = tmp_path / "config.toml"
    config.write_text(f'[cluster]\nbroker = "{bad}"\n')
    monkeypatch.setenv("DISCORD_TOKEN", "token")
    for command in ("run", "worker"):
        assert main([command, "--config", str(config)]) == 2
        assert capsys.readouterr().err == (
            f"sygil-bot: {config}: cluster.broker: the port is not a number from 1 to 65535; "
            "like redis://:PASSWORD@HOST:6379/0\n"
        )
    config.write_text("")
    monkeypatch.setenv("SYGIL_BROKER", f"redis://:{PASSWORD}")  # no host
    for command in ("run", "worker"):
        assert main([command, "--config", str(config)]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith("sygil-bot: SYGIL_BROKER: no host") and PASSWORD not in line
    with pytest.raises(ConfigError, match=r"^SYGIL_BROKER: must be a redis://, rediss:// or unix:// URL"):
        Config.from_dict({}, environ={"SYGIL_BROKER": "http://x"}, require_token=False)


async def test_a_base64_password_works_on_both_sides_and_never_reaches_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with RedisServer(tmp_path / "redis", password=PASSWORD) as server:
        url = server.url  # the password raw, as compose passes it
        assert PASSWORD in url
        async with connect(url) as broker:  # the workers' side
            await check(broker, url)
            assert await broker.set("k", "v") and await broker.get("k") == b"v"
        config = Config(token="t", model=ModelConfig(revision="a" * 40), cluster=ClusterConfig(broker=url))
        async with contextlib.AsyncExitStack() as stack:  # the bot's side
            (pool,) = await start_cluster(config, stack)
            assert isinstance(pool, ClusterPool)
            await until(lambda: pool.up, within=10, what="the bot connected to the broker")
        shown = f"redis://:***@127.0.0.1:{server.port}/0"
    assert f"Cluster mode: broker {shown}" in caplog.text
    assert f"Connected to the cluster's broker at {shown}" in caplog.text
    assert PASSWORD not in caplog.text


def test_a_worker_with_a_wrong_password_stops_before_it_loads_the_model(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = tmp_path / "worker.toml"
    config.write_text(f'[model]\nid = "{tmp_path / "model"}"\ndevices = ["cpu"]\n')
    caplog.set_level(logging.INFO)
    wrong = PASSWORD.replace("/", "_")
    with RedisServer(tmp_path / "redis", password=PASSWORD) as server:
        monkeypatch.setenv("SYGIL_BROKER", server.url.replace(PASSWORD, wrong))
        assert main(["worker", "--config", str(config)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"sygil-bot: The broker at redis://:***@127.0.0.1:{server.port}/0 refused this worker: ")
    assert line.endswith("Check the user and password in cluster.broker (or SYGIL_BROKER)")
    assert not [record for record in caplog.records if record.getMessage().startswith("Loading")]
    assert wrong not in caplog.text + line and PASSWORD not in caplog.text + line
