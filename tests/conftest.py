"""Shared fixtures: a tiny Stable Diffusion model built once per session, and an engine loaded from it."""

from __future__ import annotations

import os

# Set before anything imports huggingface_hub, which reads these once: tests must never reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from bot.engine import Engine
    from bot.prompts import Tokenizer
    from tests.redis_server import RedisServer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the tiny random-weights model once per test session."""
    # Imported here so test sessions that never touch the engine don't pay for importing diffusers.
    from bot.engine import make_tiny_model

    path = tmp_path_factory.mktemp("tiny-model")
    make_tiny_model(path)
    return path


@pytest.fixture(scope="session")
def clip_tokenizer() -> Tokenizer:
    """Load the real CLIP ViT-L/14 tokenizer from the vocabulary shipped in the package."""
    from bot.prompts import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def engine(tiny_model_dir: Path) -> Engine:
    """Load the tiny model on the CPU in float32 with DPM-Solver++."""
    from bot.engine import Engine

    return Engine.load(str(tiny_model_dir), device="cpu", dtype="float32", scheduler="dpm++")


@pytest.fixture
def empty_hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache of this process, offline: no hub model is in it, and the hub is out of reach."""
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads HF_HOME once, at import; its functions read these at each call.
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    return home


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real Redis server on 127.0.0.1 on a free port, for one test."""
    from tests.redis_server import RedisServer

    with RedisServer(tmp_path / "redis") as server:
        yield server
