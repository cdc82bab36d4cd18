"""The deployment files: the Docker image, compose.yaml, constraints.txt, and `sygil-bot health` on a real bot."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import sys
import time
import tomllib
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import redis as redis_client
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version
from redis.backoff import NoBackoff
from redis.exceptions import NoPermissionError
from redis.retry import Retry

from bot.__main__ import _parser, main
from bot.cluster.broker import parse
from bot.config import Config
from tests.fakediscord import FakeDiscord
from tests.redis_server import RedisServer
from tests.test_run import bot_process, stop, write_config
from tests.waiting import until

ROOT = Path(__file__).parents[1]
IMAGE_USER, IMAGE_UID = "sygil", "1000"
TORCH = canonicalize_name("torch")


def dockerfile() -> list[tuple[str, str]]:
    """Return the Dockerfile's instructions as (INSTRUCTION, arguments): continuations joined, comments left out."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for raw in (ROOT / "Dockerfile").read_text("utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        name, _, arguments = (current + line).partition(" ")
        instructions.append((name.upper(), arguments.strip()))
        current = ""
    return instructions


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for name, arguments in dockerfile():
        if name == "ENV":
            for item in shlex.split(arguments):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text("utf-8"))


def pins() -> dict[NormalizedName, str]:
    """Read constraints.txt: the tested version of each library."""
    pinned: dict[NormalizedName, str] = {}
    for line in (ROOT / "constraints.txt").read_text("utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pinned[canonicalize_name(name)] = version
    return pinned


def pyproject_requirements(*extras: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]
    texts = list(project["dependencies"])
    for extra in extras:
        texts += project["optional-dependencies"][extra]
    return [Requirement(text) for text in texts]


def requirements_of(name: str) -> list[Requirement]:
    """Return every requirement in an installed library's metadata, of its extras too."""
    return [Requirement(text) for text in distribution(name).requires or []]


def applies(requirement: Requirement, extras: set[str]) -> bool:
    marker = requirement.marker
    return marker is None or any(marker.evaluate({"extra": extra}) for extra in extras or {""})


def installed_closure(roots: list[Requirement]) -> set[NormalizedName]:
    """Return every library the project pulls in, as installed here, torch and what only torch pulls in aside."""
    found: dict[NormalizedName, set[str]] = {}
    todo = [requirement for requirement in roots if applies(requirement, set())]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name == TORCH or (name in found and requirement.extras <= found[name]):
            continue
        found[name] = found.get(name, set()) | requirement.extras
        try:
            todo += [r for r in requirements_of(name) if applies(r, found[name])]
        except PackageNotFoundError:
            pytest.fail(f"{name} is not installed in this venv: run scripts/test, which installs the project")
    return set(found)


def minimum(specifier: SpecifierSet) -> Version | None:
    bounds = [Version(spec.version) for spec in specifier if spec.operator in (">=", "==", "~=")]
    bounds += [Version(spec.version) for spec in specifier if spec.operator == ">"]  # a strict bound: close enough
    return max(bounds, default=None)


def base_torch() -> Version:
    """Return the torch release of the Dockerfile's base image, from its tag (pytorch/pytorch:X.Y.Z-cudaA-…)."""
    (base,) = [arguments for name, arguments in dockerfile() if name == "FROM"]
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda\d+\.\d+-cudnn\d+-runtime", base)
    assert match, f"the base image {base} is not a pytorch/pytorch CUDA runtime tag, whose torch release is known"
    return Version(match[1])


def test_the_base_images_torch_meets_every_torch_requirement_so_the_image_keeps_it() -> None:
    torch = base_torch()
    wanted: dict[str, SpecifierSet] = {}
    for name in pins():
        for requirement in requirements_of(name):
            if canonicalize_name(requirement.name) == TORCH and requirement.specifier:
                wanted[f"{name} {distribution(name).version} ({requirement})"] = requirement.specifier
    (ours,) = [r.specifier for r in pyproject_requirements() if canonicalize_name(r.name) == TORCH]
    wanted["pyproject.toml"] = ours
    assert any("accelerate" in who for who in wanted)  # accelerate needs torch: the check reads the metadata
    refused = [who for who, specifier in wanted.items() if not specifier.contains(torch, prereleases=True)]
    assert not refused, f"the base image's torch {torch} does not meet: {refused}; pip would install another torch"
    # Honest bounds: pyproject.toml admits no torch that a tested library refuses.
    ours_min = minimum(ours)
    for who, specifier in wanted.items():
        theirs = minimum(specifier)
        assert theirs is None or (ours_min is not None and ours_min >= theirs), f"pyproject.toml {ours} < {who}"


def test_constraints_pin_what_the_tests_ran_with_and_both_installs_use_them() -> None:
    pinned = pins()
    assert TORCH not in pinned  # CPU torch in the tests, the base image's CUDA torch in the image
    wrong = {
        name: (version, distribution(name).version)
        for name, version in pinned.items()
        if Version(distribution(name).version) != Version(version)
    }
    assert not wrong, f"constraints.txt pins (pinned, installed): {wrong}; pin what scripts/test passed with"
    pulled_in = installed_closure(pyproject_requirements("export", "test"))
    assert not pulled_in - set(pinned), f"not pinned in constraints.txt: {sorted(pulled_in - set(pinned))}"
    assert not set(pinned) - pulled_in, f"pinned but not used: {sorted(set(pinned) - pulled_in)}"

    installs = [line for line in (ROOT / "scripts/test").read_text("utf-8").splitlines() if " -e " in line]
    assert installs and all("-c constraints.txt" in line for line in installs), installs
    instructions = dockerfile()
    assert any(name == "COPY" and "constraints.txt" in arguments.split() for name, arguments in instructions)
    (install,) = [arguments for name, arguments in instructions if name == "RUN" and "pip install" in arguments]
    # torch pinned to the base image's own build while the project installs: nothing can replace it.
    written = re.search(r"import torch; print\(f'torch==\{torch.__version__\}'\)\" > (\S+)", install)
    assert written, install
    assert f"-c constraints.txt -c {written[1]}" in install, install


def paths_after(command: str, runs: str) -> list[PurePosixPath]:
    """Return the paths a shell command (a regular expression) is given in the image's RUN lines."""
    return [PurePosixPath(path) for paths in re.findall(rf"{command} ([^&;]+)", runs) for path in paths.split()]


def test_the_image_user_can_write_the_volumes_and_the_worker_caches_the_model_in_one() -> None:
    instructions = dockerfile()
    runs = " && ".join(arguments for name, arguments in instructions if name == "RUN")
    assert re.search(rf"useradd .*--uid {IMAGE_UID} {IMAGE_USER}\b", runs)
    assert ("USER", IMAGE_USER) in instructions
    owned = paths_after(rf"chown -R {IMAGE_USER}\S*", runs)
    created = paths_after(r"mkdir -p", runs)
    image_home = PurePosixPath(image_env()["HF_HOME"])
    assert image_home in created and any(image_home.is_relative_to(folder) for folder in owned), (created, owned)

    worker = compose()["services"]["worker"]
    hf_home = PurePosixPath(worker.get("environment", {}).get("HF_HOME", image_home))
    mounts = [PurePosixPath(volume.split(":")[1]) for volume in worker["volumes"]]
    (cache,) = [mount for mount in mounts if hf_home.is_relative_to(mount)]
    # A new named volume takes the owner of the image's folder: the image must create it, owned by its user.
    assert cache in created or any(folder.is_relative_to(cache) for folder in created), (cache, created)
    assert any(cache.is_relative_to(folder) for folder in owned), (cache, owned)
    assert hf_home.is_relative_to(image_home) or hf_home == image_home


def test_compose_runs_redis_the_bot_and_a_worker_the_token_from_a_file_not_inline() -> None:
    text = (ROOT / "compose.yaml").read_text("utf-8")
    services = compose()["services"]
    assert set(services) == {"redis", "users", "bot", "worker"}
    parser = _parser()
    for name, command in (("bot", "run"), ("worker", "worker")):
        args = services[name]["command"]
        assert args[:2] == ["sygil-bot", command]
        parser.parse_args(args[1:])
    # Each with its own Redis user (bot.cluster.acl), made by the one-shot `users` service before either starts.
    for name, user, password in (
        ("bot", "sygil-bot", "BOT_REDIS_PASSWORD"),
        ("worker", "local", "WORKER_REDIS_PASSWORD"),
    ):
        assert services[name]["environment"]["SYGIL_BROKER"].startswith(f"redis://{user}:${{{password}}}@redis:6379/")
        assert "DISCORD_TOKEN" not in services[name]["environment"]
        assert services[name]["depends_on"] == {"users": {"condition": "service_completed_successfully"}}
    assert "${DISCORD_TOKEN" not in text  # never interpolated into the compose model
    assert services["bot"].get("env_file") or services["bot"].get("secrets")
    assert not services["worker"].get("env_file") and not services["worker"].get("secrets")  # never sees the token
    assert "REDIS_PASSWORD" not in services["bot"]["environment"]["SYGIL_BROKER"].replace("BOT_REDIS_PASSWORD", "")
    assert "--aclfile /data/users.acl" in services["redis"]["command"][2]
    assert services["users"]["depends_on"] == {"redis": {"condition": "service_healthy"}}
    for args in users_commands():
        parser.parse_args(args[1:])


def interpolate(text: str, env: dict[str, str]) -> str:
    """Do what compose does to a value: ``${NAME}``, ``${NAME:?message}`` from ``env``, ``$$`` to ``$``."""
    return re.sub(r"\$\$|\$\{(\w+)(?::?[?-][^}]*)?\}", lambda found: env[found[1]] if found[1] else "$", text)


def users_commands() -> list[list[str]]:
    """Return the `sygil-bot ...` commands the `users` service runs, one after another."""
    shell, flag, script = compose()["services"]["users"]["command"]
    assert (shell, flag) == ("sh", "-c")
    commands = [shlex.split(part) for part in script.split("&&")]
    assert all(args[0] == "sygil-bot" for args in commands)
    return commands


def test_compose_redis_keeps_the_users_in_its_aclfile_and_takes_the_admin_password_from_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """compose.yaml's Redis command, run with the real redis-server, and its `users` service's commands."""
    data, bin_folder = tmp_path / "data", tmp_path / "bin"
    data.mkdir()
    bin_folder.mkdir()
    entrypoint = bin_folder / "docker-entrypoint.sh"  # the redis image's: it drops root, then runs its arguments
    entrypoint.write_text('#!/bin/sh\nexec "$@"\n')
    entrypoint.chmod(0o755)
    passwords = {"REDIS_PASSWORD": "admin/one+=", "BOT_REDIS_PASSWORD": "bot/pw+=", "WORKER_REDIS_PASSWORD": "wk/pw+="}
    redis_service = compose()["services"]["redis"]
    launch = [interpolate(part, passwords).replace("/data/", f"{data}/") for part in redis_service["command"]]

    def redis(admin_password: str) -> RedisServer:
        env = {"PATH": f"{bin_folder}:{os.environ['PATH']}", "REDIS_PASSWORD": admin_password}
        return RedisServer(tmp_path / "redis", password=admin_password, launch=launch, env=env)

    def urls(server: RedisServer) -> dict[str, str]:
        env = passwords | {"REDIS_PASSWORD": server.password or ""}
        keys = (("users", "SYGIL_REDIS_ADMIN"), ("bot", "SYGIL_BROKER"), ("worker", "SYGIL_BROKER"))
        found = {name: interpolate(compose()["services"][name]["environment"][key], env) for name, key in keys}
        return {name: url.replace("@redis:6379/", f"@127.0.0.1:{server.port}/") for name, url in found.items()}

    def make_users(server: RedisServer) -> None:
        monkeypatch.setenv("SYGIL_REDIS_ADMIN", urls(server)["users"])
        for name in ("BOT_REDIS_PASSWORD", "WORKER_REDIS_PASSWORD"):
            monkeypatch.setenv(name, passwords[name])
        for args in users_commands():
            args = [str(ROOT / "config.example.toml") if arg == "/data/config.toml" else arg for arg in args]
            assert main(args[1:]) == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        assert "bot/pw" not in out and "wk/pw" not in out  # passwords the caller gave are not printed

    def connected(url: str) -> redis_client.Redis:
        broker = parse(url)
        return redis_client.Redis(
            host=broker.host,
            port=broker.port,
            username=broker.username,
            password=broker.password,
            retry=Retry(NoBackoff(), 0),  # a refused password is an answer: no tries again
        )

    with redis("admin/one+=") as server:
        make_users(server)
        with connected(urls(server)["bot"]) as bot, connected(urls(server)["worker"]) as worker:
            assert bot.xadd("sygil:batches", {"data": "{}"})
            assert worker.set("sygil:w:local:beat:cuda:0", "{}", ex=30)
            with pytest.raises(NoPermissionError):
                worker.xadd("sygil:batches", {"data": "{}"})
        with (
            pytest.raises(redis_client.AuthenticationError),
            connected(server.url.replace(":admin/one+=@", "@")) as anyone,
        ):
            anyone.ping()
    # A new admin password in .env takes at the next start; the users made before stay.
    with redis("admin/two") as server:
        with connected(server.url) as admin:
            assert admin.ping()
        with (
            pytest.raises(redis_client.AuthenticationError),
            connected(server.url.replace("admin/two", "admin/one+=")) as old,
        ):
            old.ping()
        with connected(urls(server)["worker"]) as worker:
            assert worker.set("sygil:w:local:beat:cuda:0", "{}", ex=30)
        make_users(server)  # again at every `up`: no harm


def seconds(duration: str) -> float:
    """Read a compose duration such as 45s, 1m30s or 2m."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", duration)
    assert parts and duration, duration
    hours, minutes, secs = (float(part or 0) for part in parts.groups())
    return 3600 * hours + 60 * minutes + secs


def test_compose_lets_the_bot_and_the_worker_finish_their_batches_before_docker_kills_them() -> None:
    services = compose()["services"]
    bot = Config.load(ROOT / "config.example.toml", environ={"DISCORD_TOKEN": "x"})
    worker = Config.load(ROOT / "worker.example.toml", environ={}, require_token=False)
    for name, config in (("bot", bot), ("worker", worker)):
        stop = seconds(str(services[name].get("stop_grace_period", "10s")))  # Docker's default is 10 s
        assert stop > config.queue.shutdown_grace, f"{name}: stop_grace_period {stop} s"


def test_the_image_and_compose_check_health_with_sygil_bot_health() -> None:
    (check,) = [arguments for name, arguments in dockerfile() if name == "HEALTHCHECK"]
    command = check.split(" CMD ", 1)[1]
    args = yaml.safe_load(command)  # the exec form is a JSON list
    assert args[:2] == ["sygil-bot", "health"] and "--config" in args
    parsed = _parser().parse_args(args[1:])
    assert not parsed.worker and str(parsed.config) == "/data/config.toml"
    test = compose()["services"]["worker"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    assert _parser().parse_args(test[2:]).worker


def test_no_install_instruction_asks_pypi_for_sygil_bot() -> None:
    # The project is not on PyPI: it installs from its checkout (pip install -e . / pip install .).
    sources = [ROOT / "README.md", ROOT / "Dockerfile", *(ROOT / "bot").rglob("*.py")]
    pypi = re.compile(r"pip install (-\S+ )*['\"]?sygil-bot\b")
    found = [f"{path.relative_to(ROOT)}: {match[0]}" for path in sources for match in pypi.finditer(path.read_text())]
    assert not found, found
    assert "pip install -c constraints.txt -e ." in (ROOT / "README.md").read_text("utf-8")


def test_the_worker_example_config_loads_without_a_token() -> None:
    config = Config.load(ROOT / "worker.example.toml", environ={}, require_token=False)
    assert config.cluster.enabled and config.cluster.prefix == "sygil"
    assert config.model.devices == ("auto",)


Health = Callable[[], tuple[int, str]]


def health_command(config: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> Health:
    """Return a way to run `sygil-bot health --config CONFIG` in-process: its exit status and what it printed."""

    def health() -> tuple[int, str]:
        status = main(["health", *flags, "--config", str(config)])
        return status, capsys.readouterr().out

    return health


async def healthy(health: Health, within: float = 60) -> str:
    """Wait until `sygil-bot health` says healthy; return what it printed."""
    replies: list[tuple[int, str]] = []
    await until(lambda: replies.append(health()) or replies[-1][0] == 0, within, f"healthy, not {replies[-1:]}")
    return replies[-1][1]


@pytest.mark.e2e
async def test_sygil_bot_health_says_whether_the_bot_serves(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database, config, log = tmp_path / "sygil.db", tmp_path / "config.toml", tmp_path / "bot.log"
    heartbeat = tmp_path / "bot.health"
    health = health_command(config, capsys)

    async with FakeDiscord() as server:
        write_config(config, server, tiny_model_dir, database)
        assert health() == (1, f"unhealthy: no heartbeat file {heartbeat}: sygil-bot run is not running, or is "
                               "still loading the model\n")  # fmt: skip
        async with bot_process(config, server, log) as process:
            assert await healthy(health) == "healthy: connected to Discord; workers up: cpu\n"
            # A hung bot no longer rewrites its heartbeat: after three beats' time it is unhealthy.
            process.send_signal(signal.SIGSTOP)
            try:
                long_ago = time.time() - 60
                os.utime(heartbeat, (long_ago, long_ago))
                status, line = health()
            finally:
                process.send_signal(signal.SIGCONT)
            assert status == 1
            assert line == f"unhealthy: the heartbeat in {heartbeat} is 60 s old (it is rewritten every 10 s): " \
                           "sygil-bot run hangs, or was killed\n"  # fmt: skip
        assert process.returncode == 0
        status, line = health()
        assert status == 1 and "sygil-bot run is not running" in line


@pytest.mark.e2e
async def test_sygil_bot_health_worker_says_whether_the_worker_serves(
    tiny_model_dir: Path, tmp_path: Path, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    config, log = tmp_path / "worker.toml", tmp_path / "worker.log"
    config.write_text(
        f"""
[model]
id = "{tiny_model_dir}"
devices = ["cpu"]

[generation]
sizes = ["64x64"]

[engine]
warmup_batches = [1]

[storage]
path = "{tmp_path / "sygil.db"}"

[cluster]
broker = "{redis_server.url}"
heartbeat = 0.3
""",
        "utf-8",
    )
    health = health_command(config, capsys, "--worker")

    env = {k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"} | {"HF_HUB_OFFLINE": "1"}
    with log.open("ab") as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "worker", "--config", str(config), env=env, stdout=output, stderr=output
        )
    try:
        assert await healthy(health) == "healthy: the broker answers; workers up: cpu\n"
        redis_server.stop()
        down = (1, "unhealthy: the broker (cluster.broker) does not answer\n")
        await until(lambda: health() == down, 30, "unhealthy without the broker")
        redis_server.start()
        await healthy(health, 30)
    finally:
        await stop(process, log, "the worker")
    assert process.returncode == 0
    assert "sygil-bot worker is not running" in health()[1]
