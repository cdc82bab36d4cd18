"""Build a tiny random-weights Stable Diffusion 1.5-shaped pipeline for tests, benchmarks and offline runs."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

# diffusers exports its public names through a lazy module that pyright reads as private imports.
# pyright: reportPrivateImportUsage=false
from diffusers import AutoencoderKL, AutoencoderTiny, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from bot.engine._tokenizer import MODEL_MAX_LENGTH, VOCAB_SIZE, write_clip_tokenizer

log = logging.getLogger(__name__)

_SEED = 0
_TEXT_HIDDEN = 32
_SAFETY_IMAGE_SIZE = 32

# The SD 1.5 DDIM schedule (reference/sd15-configs/scheduler): Sygil's default scheduler.
_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "trained_betas": None,
}


# SD 1.5's UNet (reference/sd15-configs/unet) with the same blocks and tiny channels. Plain dicts like the
# reference JSON, because diffusers annotates these tuple parameters as one-element tuples. One layer per block
# and one attention head keep full-resolution self-attention cheap: 512 px renders in seconds on a CPU, not a
# minute, so the tiny model also serves someone trying the bot with the default sizes.
_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,  # 64 px / 8
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 32, 64, 64],
    "layers_per_block": 1,
    "attention_head_dim": 1,
    "cross_attention_dim": _TEXT_HIDDEN,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "center_input_sample": False,
}

# SD 1.5's VAE with tiny channels: still 4 latent channels and four blocks, so a downscale factor of 8.
_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 16, 32, 32],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "act_fn": "silu",
    "sample_size": 64,
    "scaling_factor": 0.18215,
}


# TAESD (diffusers AutoencoderTiny) with tiny channels and one block per stage: still 4 latent channels and three
# upsamplings (x8), so the preview decoder reads the tiny model's latents; about 5,000 random weights.
_TAESD_CONFIG: dict[str, Any] = {
    "encoder_block_out_channels": [4, 4, 4, 4],
    "decoder_block_out_channels": [4, 4, 4, 4],
    "num_encoder_blocks": [1, 1, 1, 1],
    "num_decoder_blocks": [1, 1, 1, 1],
    "latent_channels": 4,
}
TAESD_FOLDER = "taesd"  # beside the pipeline's components: what preview.taesd names for the tiny model


def _text_config() -> CLIPTextConfig:
    """Return the CLIP ViT-L/14 text config with tiny widths: same vocabulary, same 77 positions."""
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        projection_dim=_TEXT_HIDDEN,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


def _safety_checker() -> StableDiffusionSafetyChecker:
    """Return a tiny safety checker; its concept embeddings start at ones, so it never flags an image."""
    config = CLIPConfig(
        text_config=_text_config().to_dict(),
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": _SAFETY_IMAGE_SIZE,
            "patch_size": 4,
            "projection_dim": _TEXT_HIDDEN,
        },
        projection_dim=_TEXT_HIDDEN,
    )
    return StableDiffusionSafetyChecker(config)


def _feature_extractor() -> CLIPImageProcessor:
    """Return the CLIP image processor sized for the tiny safety checker."""
    return CLIPImageProcessor(
        size={"shortest_edge": _SAFETY_IMAGE_SIZE},
        crop_size={"height": _SAFETY_IMAGE_SIZE, "width": _SAFETY_IMAGE_SIZE},
    )


def make_tiny_model(path: Path) -> None:
    """Write a tiny random-weights SD 1.5-shaped pipeline with the real CLIP tokenizer to path, and a tiny TAESD for
    its previews in path/taesd."""
    # fork_rng keeps the caller's global RNG untouched while fixing every weight to the same seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        unet = UNet2DConditionModel(**_UNET_CONFIG)
        vae = AutoencoderKL(**_VAE_CONFIG)
        text_encoder = CLIPTextModel(_text_config())
        safety_checker = _safety_checker()
        taesd = AutoencoderTiny(**_TAESD_CONFIG)
    with tempfile.TemporaryDirectory() as folder:
        write_clip_tokenizer(Path(folder))
        tokenizer = CLIPTokenizer.from_pretrained(folder)
    # A plain dict: diffusers annotates `scheduler` as an Enum of scheduler names, not a scheduler.
    components: dict[str, Any] = {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "unet": unet,
        "scheduler": DDIMScheduler(**_SCHEDULER_CONFIG),
        "safety_checker": safety_checker,
        "feature_extractor": _feature_extractor(),
    }
    pipe = StableDiffusionPipeline(**components, requires_safety_checker=True)
    # Without torchvision, transformers 5 swaps in CLIPImageProcessorPil, and model_index.json would name a
    # class that transformers 4 lacks; record the class the real model names, which loads either way.
    pipe.register_to_config(feature_extractor=("transformers", "CLIPImageProcessor"))
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path, safe_serialization=True)
    # save_pretrained writes tokenizer.json plus loader state (is_local, local_files_only); the real model's
    # tokenizer folder is the four plain CLIP files, which both transformers 4 and 5 load.
    shutil.rmtree(path / "tokenizer")
    write_clip_tokenizer(path / "tokenizer")
    taesd.save_pretrained(path / TAESD_FOLDER, safe_serialization=True)
    log.debug("wrote a tiny Stable Diffusion pipeline to %s", path)  # `make-tiny-model` says so itself
