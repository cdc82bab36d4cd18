"""The tiny model: real CLIP tokenizer, Sygil's folder layout, deterministic builds, offline loading."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

# diffusers exports its public names through a lazy module that pyright reads as private imports.
# pyright: reportPrivateImportUsage=false
from diffusers import DDIMScheduler, StableDiffusionPipeline
from transformers import CLIPTokenizer

from bot.engine import make_tiny_model
from bot.engine._tokenizer import write_clip_tokenizer

SD15_DOWN_BLOCKS = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
SD15_UP_BLOCKS = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> CLIPTokenizer:
    folder = tmp_path_factory.mktemp("clip-tokenizer")
    write_clip_tokenizer(folder)
    return CLIPTokenizer.from_pretrained(folder)


def test_tokenizer_matches_openai_clip(clip_tokenizer: CLIPTokenizer) -> None:
    # Known output of openai/clip-vit-large-patch14 for this prompt.
    assert clip_tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(clip_tokenizer) == 49408
    assert clip_tokenizer.model_max_length == 77
    assert clip_tokenizer.pad_token == clip_tokenizer.eos_token == "<|endoftext|>"
    assert clip_tokenizer.bos_token == "<|startoftext|>"


def test_namespaced_tag_is_three_tokens(clip_tokenizer: CLIPTokenizer) -> None:
    assert clip_tokenizer.tokenize("species:seal") == ["species</w>", ":</w>", "seal</w>"]
    ids = clip_tokenizer("species:seal", add_special_tokens=False).input_ids
    assert ids == clip_tokenizer.convert_tokens_to_ids(["species</w>", ":</w>", "seal</w>"])
    assert len(set(ids)) == 3
    assert clip_tokenizer.unk_token_id not in ids


def test_tokenizer_lowercases_and_pads_like_stable_diffusion(clip_tokenizer: CLIPTokenizer) -> None:
    assert clip_tokenizer("A Photo of a CAT").input_ids == clip_tokenizer("a photo of a cat").input_ids
    padded = clip_tokenizer("a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77
    assert padded[:4] == [49406, 320, 2368, 49407]
    assert set(padded[3:]) == {49407}


def test_folder_has_sygil_layout(tiny_model_dir: Path) -> None:
    index = json.loads((tiny_model_dir / "model_index.json").read_text("utf-8"))
    components = {name: value for name, value in index.items() if not name.startswith("_") and value != [None, None]}
    assert components == {
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "requires_safety_checker": True,
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    for weights in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model"):
        assert (tiny_model_dir / f"{weights}.safetensors").is_file()
    assert (tiny_model_dir / "safety_checker/model.safetensors").is_file()
    assert (tiny_model_dir / "feature_extractor/preprocessor_config.json").is_file()
    tokenizer_files = {path.name for path in (tiny_model_dir / "tokenizer").iterdir()}
    assert tokenizer_files == {"vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"}
    assert not list(tiny_model_dir.rglob("*.bin")), "weights must be safetensors only"


def test_scheduler_is_sd15_ddim(tiny_model_dir: Path) -> None:
    config = json.loads((tiny_model_dir / "scheduler/scheduler_config.json").read_text("utf-8"))
    assert config["_class_name"] == "DDIMScheduler"
    assert config["beta_schedule"] == "scaled_linear"
    assert (config["beta_start"], config["beta_end"]) == (0.00085, 0.012)
    assert (config["prediction_type"], config["steps_offset"], config["clip_sample"]) == ("epsilon", 1, False)


def test_builds_are_byte_identical(tiny_model_dir: Path, tmp_path: Path) -> None:
    make_tiny_model(tmp_path / "again")
    assert _files(tmp_path / "again") == _files(tiny_model_dir)


def test_loads_offline_with_sd15_shapes(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("loading the tiny model tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    assert isinstance(pipe, StableDiffusionPipeline)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.safety_checker is not None
    assert pipe.vae_scale_factor == 8
    assert pipe.vae.config["latent_channels"] == 4
    assert list(pipe.unet.config["down_block_types"]) == SD15_DOWN_BLOCKS
    assert list(pipe.unet.config["up_block_types"]) == SD15_UP_BLOCKS
    assert pipe.unet.config["cross_attention_dim"] == pipe.text_encoder.config.hidden_size
    assert pipe.text_encoder.config.max_position_embeddings == 77
    assert pipe.text_encoder.config.vocab_size == 49408
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
