"""The ``sygil-bot`` command line, run as a user would run it: in a child process, or through ``main`` in this one
where the exit status and the output are all there is to see."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngImageFile

from bot.__main__ import main
from bot.prompts import Tokenizer
from tests.fakediscord import serve_in_thread
from tests.redis_server import BASE64_PASSWORD as PASSWORD
from tests.redis_server import RedisServer

# Runs ``sygil-bot ARGS`` in this process: its exit status, standard output and standard error.
Cli = Callable[..., tuple[int, str, str]]


def sygil(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"} | {"HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        capture_output=True,
        text=True,
        env=environ | (env or {}),
        cwd=cwd,
        timeout=300,
        check=False,
    )


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")  # what main sets for itself, undone after the test

    def run(*args: str) -> tuple[int, str, str]:
        status = main(list(args))
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run


@pytest.mark.e2e
def test_imagine_writes_a_png_with_its_settings_and_the_same_seed_gives_the_same_pixels(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    outputs = []
    for name in ("a.png", "b.png"):
        result = sygil(
            "imagine", "Species:Seal, studio:dc", "--model", str(tiny_model_dir), "--width", "64", "--height", "64",
            "--seed", "7", "--steps", "4", "-o", str(tmp_path / name),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        outputs.append(tmp_path / name)
    first, second = (Image.open(path) for path in outputs)
    assert isinstance(first, PngImageFile)
    assert first.size == (64, 64)
    assert first.tobytes() == second.tobytes()
    metadata = json.loads(first.text["sygil"])
    assert metadata["prompt"] == "species:seal, studio:dc"
    assert metadata["seed"] == 7 and metadata["steps"] == 4 and metadata["width"] == 64
    assert "Seed: 7" in first.text["parameters"]


def test_imagine_refuses_a_bad_prompt_without_a_traceback(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = sygil("imagine", "speces:seal", "--model", str(tiny_model_dir), "--width", "64", "--height", "64",
                   "-o", str(tmp_path / "x.png"))  # fmt: skip
    assert result.returncode == 1
    assert "Did you mean `species:`?" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_imagine_with_a_missing_model_says_what_to_do(tmp_path: Path) -> None:
    result = sygil("imagine", "species:seal", "--model", str(tmp_path / "nope"), "-o", str(tmp_path / "x.png"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "make-tiny-model" in result.stderr


@pytest.mark.parametrize("size", [("--width", "65"), ("--height", "0")])
def test_imagine_rejects_bad_sizes(tmp_path: Path, size: tuple[str, str]) -> None:
    result = sygil("imagine", "species:seal", *size, "-o", str(tmp_path / "x.png"))
    assert result.returncode == 2
    assert "multiple of 8" in result.stderr and "Traceback" not in result.stderr


def test_run_with_a_bad_config_says_which_key(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[model]\nscheduler = "fastest"\n')
    result = sygil("run", "--config", str(config), env={"DISCORD_TOKEN": "x"})
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"sygil-bot: {config}: model.scheduler: must be one of dpm++, ddim, euler-a, got 'fastest'"]


def test_run_without_a_token_says_so(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("")
    result = sygil("run", "--config", str(config))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "DISCORD_TOKEN is not set" in lines[0]


def test_run_with_a_missing_config_file(tmp_path: Path) -> None:
    result = sygil("run", "--config", str(tmp_path / "missing.toml"), env={"DISCORD_TOKEN": "x"})
    assert result.returncode == 2
    assert "no such config file" in result.stderr and "Traceback" not in result.stderr


def _run_config(path: Path, api_base_url: str, gateway_url: str, model: Path, database: Path) -> Path:
    path.write_text(
        f'[discord]\napi_base_url = "{api_base_url}"\ngateway_url = "{gateway_url}"\n'
        f'[model]\nid = "{model}"\ndevices = ["cpu"]\n[generation]\nsizes = ["64x64"]\n'
        f'[storage]\npath = "{database}"\n'
    )
    return path


@pytest.fixture
def discord_endpoints() -> Iterator[None]:
    """`run` in this process points discord.py's process-wide endpoints at its config: put them back afterwards."""
    from discord.gateway import DiscordWebSocket
    from discord.http import Route

    base, gateway = Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
    try:
        yield
    finally:
        Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = base, gateway


def _loading(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.getMessage().startswith("Loading")]


@pytest.mark.usefixtures("discord_endpoints")
def test_run_that_cannot_reach_discord_says_so_before_loading_the_model(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = _run_config(
        tmp_path / "config.toml", "http://127.0.0.1:9/api/v10", "ws://127.0.0.1:9/", tmp_path / "model", tmp_path / "db"
    )
    monkeypatch.setenv("DISCORD_TOKEN", "x")
    caplog.set_level(logging.INFO)
    assert main(["run", "--config", str(config)]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("sygil-bot: Cannot reach Discord at http://127.0.0.1:9/api/v10: ")
    assert _loading(caplog) == []


@pytest.mark.usefixtures("discord_endpoints")
def test_run_checks_the_token_then_opens_the_database_before_it_loads_the_model(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    model, database = tmp_path / "no-model", tmp_path / "data" / "sygil.db"
    with serve_in_thread() as server:
        config = _run_config(tmp_path / "config.toml", server.api_base_url, server.gateway_url, model, database)
        monkeypatch.setenv("DISCORD_TOKEN", "not-the-token")
        assert main(["run", "--config", str(config)]) == 2
        assert capsys.readouterr().err.splitlines() == [
            "sygil-bot: Discord refused the token in DISCORD_TOKEN: check it in the developer portal"
        ]
        assert _loading(caplog) == [] and not database.exists()  # no GPU worker was started
        # With the right token, the database is opened (created) before the model is loaded, and found missing.
        monkeypatch.setenv("DISCORD_TOKEN", server.token)
        assert main(["run", "--config", str(config)]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"sygil-bot: Model folder '{model}' does not exist") and "make-tiny-model" in line
        assert database.is_file() and len(_loading(caplog)) == 1
        logins = [request for request in server.requests if request.path.endswith("/users/@me")]
        assert len(logins) == 2  # one refused, one accepted


@pytest.mark.e2e
def test_the_worker_connects_with_a_raw_password_first_then_says_the_hub_is_out_of_reach(tmp_path: Path) -> None:
    config = tmp_path / "worker.toml"
    config.write_text('[model]\nid = "Sygil/Sygil-Diffusion"\ndevices = ["cpu"]\n[cluster]\nprefix = "test"\n')
    home = tmp_path / "hf-home"  # empty: the model is not in it
    with RedisServer(tmp_path / "redis", password=PASSWORD) as server:
        env = {"SYGIL_BROKER": server.url, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
        result = sygil("worker", "--config", str(config), env=env)
    assert result.returncode == 1, result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("sygil-bot:")] == [
        "sygil-bot: Model 'Sygil/Sygil-Diffusion': cannot reach the Hugging Face hub and the model is not in the cache "
        f"(HF_HOME={home}). HF_HUB_OFFLINE is set: unset it once on a host that can reach the hub to download the "
        "model, or set model.id to a local folder (a tiny test model: `sygil-bot make-tiny-model DIR`)."
    ]
    answers = result.stderr.index(f"The broker at redis://:***@127.0.0.1:{server.port}/0 answers")
    assert answers < result.stderr.index("Loading Sygil/Sygil-Diffusion on cpu")
    assert PASSWORD not in result.stderr and "Traceback" not in result.stderr


def test_prompt_check_json_accepts_and_counts(tiny_model_dir: Path) -> None:
    result = sygil("prompt", "check", "Species:Seal, artist:chris_rallis", "--json", "--model", str(tiny_model_dir))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report == {
        "ok": True,
        "prompt": "species:seal, creator:chris rallis",
        "tags": [{"namespace": "species", "tag": "seal"}, {"namespace": "creator", "tag": "chris rallis"}],
        "tokens": 9,
        "max_tokens": 75,
        "errors": [],
        "warnings": [report["warnings"][0]],
    }
    assert "`artist:` became `creator:`" in report["warnings"][0]


def test_prompt_check_json_refuses_with_a_suggestion() -> None:
    result = sygil("prompt", "check", "speces:seal", "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["tokens"] == 4
    assert report["errors"][0]["code"] == "unknown_namespace"
    assert report["errors"][0]["suggestion"] == "species:"


def test_prompt_check_file_prints_one_line_per_prompt_in_order(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("species:seal, studio:dc\ntitle:foo\nrating:explicit\n16:9, re:zero\n", "utf-8")
    result = sygil("prompt", "check", "--file", str(prompts), "--json")
    assert result.returncode == 1
    reports = [json.loads(line) for line in result.stdout.splitlines()]
    assert [report["ok"] for report in reports] == [True, False, False, True]
    assert reports[1]["errors"][0]["code"] == "provenance_namespace"
    assert reports[2]["errors"][0]["code"] == "rating_not_allowed"
    allowed = sygil("prompt", "check", "rating:explicit", "--allow-rating", "--json")
    assert allowed.returncode == 0 and json.loads(allowed.stdout)["ok"]


def test_prompt_check_uses_the_configs_blocklist_and_truncation(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[prompts]\nblocklist = ["forbidden"]\nallow_truncation = true\n[model]\nid = "{tiny_model_dir}"\n'
    )
    blocked = sygil("prompt", "check", "a f0rbidden seal", "--json", "--config", str(config))
    assert blocked.returncode == 1
    (error,) = json.loads(blocked.stdout)["errors"]
    assert error["code"] == "blocked_term" and "rbidden" not in error["message"]
    long = sygil("prompt", "check", "cat " * 80, "--json", "--config", str(config))
    report = json.loads(long.stdout)
    assert long.returncode == 0 and report["tokens"] == 80 and "left out" in report["warnings"][0]


def test_prompt_check_counts_with_clip_when_the_configs_model_is_out_of_reach(
    empty_hf_home: Path,
    tmp_path: Path,
    clip_tokenizer: Tokenizer,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[model]\nid = "Sygil/Sygil-Diffusion"\n')
    caplog.set_level(logging.INFO)
    prompt = "species:seal, studio:dc"
    assert main(["prompt", "check", prompt, "--json", "--config", str(config)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens"] == len(clip_tokenizer.encode(prompt, add_special_tokens=False))
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == [
        "Counting tokens with the bundled CLIP ViT-L/14 tokenizer: Sygil/Sygil-Diffusion: cannot reach the Hugging "
        f"Face hub and the model is not in the cache (HF_HOME={empty_hf_home})"
    ]


def test_prompt_check_refuses_a_model_folder_whose_tokenizer_is_not_clips(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "model" / "tokenizer").mkdir(parents=True)
    assert main(["prompt", "check", "species:seal", "--model", str(tmp_path / "model")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith(f"sygil-bot: Cannot load the tokenizer of model '{tmp_path / 'model'}': it is not a CLIP")


def test_prompt_check_negative_prompt_errors_are_reported() -> None:
    result = sygil("prompt", "check", "species:seal", "--negative", "title:blurry", "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert [error["code"] for error in report["errors"]] == ["provenance_namespace"]


def test_prompt_check_for_people() -> None:
    result = sygil("prompt", "check", "speces:seal")
    assert result.returncode == 1
    assert result.stdout.splitlines()[0] == "refused: speces:seal (4/75 tokens)"
    assert "Did you mean `species:`?" in result.stdout


def test_prompt_check_needs_a_prompt_or_a_file(tmp_path: Path) -> None:
    assert sygil("prompt", "check").returncode == 2
    missing = sygil("prompt", "check", "--file", str(tmp_path / "none.txt"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr and "Traceback" not in missing.stderr


def test_imagine_with_an_unknown_scheduler_names_the_valid_ones(cli: Cli, tmp_path: Path) -> None:
    assert cli("imagine", "species:seal", "--scheduler", "bogus", "-o", str(tmp_path / "x.png")) == (
        2,
        "",
        "sygil-bot: --scheduler must be one of dpm++, ddim, euler-a, got 'bogus'\n",
    )


def test_imagine_names_the_negative_prompt_it_refuses(cli: Cli, tiny_model_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "x.png"
    status, _, err = cli(
        "imagine", "species:seal", "--negative", "speces:blur", "--model", str(tiny_model_dir), "--width", "64",
        "--height", "64", "-o", str(output),
    )  # fmt: skip
    assert (status, err) == (
        1,
        "sygil-bot: In the negative prompt, `speces:` is not a namespace Sygil knows. Did you mean `species:`?\n",
    )
    assert not output.exists()


def test_prompt_check_names_the_negative_prompt_and_skips_blank_lines(
    cli: Cli, tiny_model_dir: Path, tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("species:seal\n\n   \nstudio:dc\n", "utf-8")
    model = ("--model", str(tiny_model_dir))
    status, out, _ = cli("prompt", "check", "--file", str(prompts), "--json", *model)
    assert status == 0 and [json.loads(line)["prompt"] for line in out.splitlines()] == ["species:seal", "studio:dc"]
    status, out, _ = cli("prompt", "check", "species:seal", "--negative", "title:blurry", *model)
    assert status == 1
    assert "  error [provenance_namespace]: In the negative prompt, `title:` records where" in out
    prompts.write_text("\n  \n", "utf-8")
    assert cli("prompt", "check", "--file", str(prompts), *model) == (
        2,
        "",
        f"sygil-bot: {prompts} holds no prompt (one prompt per line)\n",
    )


def test_make_tiny_model_overwrites_nothing(cli: Cli, tmp_path: Path) -> None:
    file = tmp_path / "model"
    file.write_text("mine")
    assert cli("make-tiny-model", str(file)) == (
        2,
        "",
        f"sygil-bot: {file} is a file: make-tiny-model writes a folder; name a new one\n",
    )
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    assert cli("make-tiny-model", str(folder)) == (
        2,
        "",
        f"sygil-bot: {folder} is not empty: make-tiny-model writes only into a new or empty folder, so that it "
        "overwrites nothing\n",
    )
    assert file.read_text() == "mine" and [path.name for path in folder.iterdir()] == ["notes.txt"]


def test_make_tiny_model_says_once_what_it_wrote(cli: Cli, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)  # what `sygil-bot` logs on its standard error
    folder = tmp_path / "tiny"
    folder.mkdir()  # an empty folder is as good as a new one
    status, out, err = cli("make-tiny-model", str(folder))
    assert (status, out, err) == (0, f"wrote a tiny random-weights model to {folder}\n", "")
    assert caplog.text == ""
    assert (folder / "model_index.json").is_file()
