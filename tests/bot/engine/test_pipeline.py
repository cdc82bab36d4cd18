"""The engine: batched renders that reproduce from their seeds, img2img, PNG metadata, loading errors."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bot.engine import Engine, ImageSpec, Mode, RenderedImage, Settings
from bot.engine.pipeline import SCHEDULERS
from bot.errors import HubUnreachable, ModelError

FAST = Settings(steps=4, guidance=7.0, width=64, height=64)


def _pixels(image: RenderedImage | bytes) -> np.ndarray:
    png = image.png if isinstance(image, RenderedImage) else image
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def _text(image: RenderedImage) -> dict[str, str]:
    return Image.open(io.BytesIO(image.png)).text  # type: ignore[attr-defined]


def _spec(prompt: str = "species:seal, beach", seed: int = 7, settings: Settings = FAST, **kwargs: object) -> ImageSpec:
    return ImageSpec(prompt=prompt, negative_prompt="blurry", seed=seed, settings=settings, **kwargs)  # type: ignore[arg-type]


def test_same_seed_gives_identical_png(engine: Engine) -> None:
    [first] = engine.render([_spec()])
    [second] = engine.render([_spec()])
    assert first.png == second.png
    assert first.seed == 7
    assert Image.open(io.BytesIO(first.png)).size == (64, 64)
    assert _pixels(first).std() > 1, "a flat image would make the comparisons below meaningless"


def test_different_seed_or_prompt_changes_the_image(engine: Engine) -> None:
    base, other_seed, other_prompt = engine.render(
        [_spec(seed=7), _spec(seed=8), _spec(prompt="species:cat, snow", seed=7)]
    )
    assert np.abs(_pixels(base) - _pixels(other_seed)).mean() > 1
    assert np.abs(_pixels(base) - _pixels(other_prompt)).mean() > 0.1


def test_image_in_a_batch_matches_it_rendered_alone(engine: Engine) -> None:
    specs = [_spec(prompt="species:fox", seed=1), _spec(seed=7), _spec(prompt="studio:dc", seed=123456789)]
    batch = engine.render(specs)
    assert [image.seed for image in batch] == [1, 7, 123456789]
    for spec, in_batch in zip(specs, batch, strict=True):
        [alone] = engine.render([spec])
        # CPU kernels may sum in another order for another batch size; the starting noise is the same.
        assert np.abs(_pixels(alone) - _pixels(in_batch)).max() <= 2


def test_progress_reports_each_denoising_step(engine: Engine) -> None:
    calls: list[tuple[int, int]] = []
    engine.render([_spec(), _spec(seed=8)], progress=lambda step, total: calls.append((step, total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_img2img_reworks_the_init_image(engine: Engine) -> None:
    [source] = engine.render([_spec()])
    settings = replace(FAST, mode=Mode.IMG2IMG, strength=0.75)
    calls: list[tuple[int, int]] = []
    [result] = engine.render(
        [_spec(settings=settings, init_image=source.png)], progress=lambda step, total: calls.append((step, total))
    )
    assert Image.open(io.BytesIO(result.png)).size == (64, 64)
    assert np.abs(_pixels(result) - _pixels(source)).mean() > 1
    assert calls == [(1, 3), (2, 3), (3, 3)], "strength 0.75 of 4 steps denoises 3"
    [again] = engine.render([_spec(settings=settings, init_image=source.png)])
    assert again.png == result.png


def test_img2img_converts_and_resizes_any_init_image(engine: Engine) -> None:
    buffer = io.BytesIO()
    Image.new("RGBA", (100, 30), (200, 40, 90, 128)).save(buffer, format="PNG")
    settings = Settings(steps=2, width=48, height=64, mode=Mode.IMG2IMG, strength=0.5)
    [result] = engine.render([_spec(settings=settings, init_image=buffer.getvalue())])
    image = Image.open(io.BytesIO(result.png))
    assert (image.size, image.mode) == ((48, 64), "RGB")


def test_unreadable_init_image_raises_value_error(engine: Engine) -> None:
    settings = replace(FAST, mode=Mode.IMG2IMG)
    with pytest.raises(ValueError, match=r"specs\[0\]\.init_image is not a readable image"):
        engine.render([_spec(settings=settings, init_image=b"not a png")])


def test_img2img_with_no_denoising_step_raises_value_error(engine: Engine) -> None:
    settings = Settings(steps=1, width=64, height=64, mode=Mode.IMG2IMG, strength=0.5)
    with pytest.raises(ValueError, match="no denoising step"):
        engine.render([_spec(settings=settings, init_image=b"unused")])


def test_png_carries_parameters_and_sygil_metadata(engine: Engine) -> None:
    spec = ImageSpec(prompt="species:seal 🦭, cloudy sky", negative_prompt="lowres", seed=7, settings=FAST)
    [image] = engine.render([spec])
    text = _text(image)
    assert text["parameters"] == (
        "species:seal 🦭, cloudy sky\nNegative prompt: lowres\n"
        f"Steps: 4, Sampler: dpm++, CFG scale: 7.0, Seed: 7, Size: 64x64, Model: {engine.model_id}, "
        f"Model revision: {engine.revision}"
    )
    assert engine.revision is not None and engine.revision.startswith("sha256:")
    assert json.loads(text["sygil"]) == {
        "prompt": "species:seal 🦭, cloudy sky",
        "negative_prompt": "lowres",
        "seed": 7,
        "steps": 4,
        "guidance": 7.0,
        "width": 64,
        "height": 64,
        "mode": "txt2img",
        "scheduler": "dpm++",
        "model": engine.model_id,
        "revision": engine.revision,
    }


def test_img2img_metadata_records_strength(engine: Engine) -> None:
    [source] = engine.render([_spec()])
    settings = Settings(steps=2, width=64, height=48, mode=Mode.IMG2IMG, strength=0.5)
    spec = ImageSpec(prompt="studio:dc", negative_prompt="", seed=3, settings=settings, init_image=source.png)
    [image] = engine.render([spec])
    text = _text(image)
    assert text["parameters"] == (
        "studio:dc\nSteps: 2, Sampler: dpm++, CFG scale: 7.0, Seed: 3, Size: 64x48, "
        f"Model: {engine.model_id}, Model revision: {engine.revision}, Denoising strength: 0.5"
    )
    sygil = json.loads(text["sygil"])
    assert (sygil["mode"], sygil["strength"], sygil["negative_prompt"]) == ("img2img", 0.5, "")


def test_batch_with_mixed_settings_raises_value_error(engine: Engine) -> None:
    with pytest.raises(ValueError, match=r"share settings: specs\[1\]"):
        engine.render([_spec(), _spec(settings=replace(FAST, steps=5))])
    with pytest.raises(ValueError, match="at least one"):
        engine.render([])


def test_count_tokens_counts_content_tokens_untruncated(engine: Engine) -> None:
    assert engine.count_tokens("species:seal") == 3
    assert engine.count_tokens("a photo of a cat") == 5
    assert engine.count_tokens("") == 0
    assert engine.count_tokens("cat " * 100) == 100
    assert engine.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_safety_checker_verdict_sets_nsfw(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    [clean] = engine.render([_spec()])
    assert clean.nsfw is False
    checker = engine._pipe.safety_checker
    assert checker is not None
    # A negative threshold makes every image score over it: the checker flags all. Patched through _parameters
    # because pytest's setattr would restore an nn.Parameter into the instance __dict__, where torch can't see it.
    flag_all = torch.nn.Parameter(-torch.ones(17), requires_grad=False)
    monkeypatch.setitem(checker._parameters, "concept_embeds_weights", flag_all)
    [flagged] = engine.render([_spec()])
    assert flagged.nsfw is True
    assert _pixels(flagged).max() == 0, "diffusers blacks out flagged images"


def test_load_without_safety_checker_renders_same_pixels(engine: Engine, tiny_model_dir: Path) -> None:
    unchecked = Engine.load(str(tiny_model_dir), safety_checker=False)
    [with_checker] = engine.render([_spec()])
    [without] = unchecked.render([_spec()])
    assert without.nsfw is False
    assert without.png == with_checker.png


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_each_scheduler_renders_and_is_recorded(scheduler: str, engine: Engine, tiny_model_dir: Path) -> None:
    loaded = engine if scheduler == engine.scheduler_name else Engine.load(str(tiny_model_dir), scheduler=scheduler)
    assert (loaded.scheduler_name, loaded.model_id) == (scheduler, str(tiny_model_dir))
    [image] = loaded.render([_spec()])
    assert f"Sampler: {scheduler}," in _text(image)["parameters"]
    assert json.loads(_text(image)["sygil"])["scheduler"] == scheduler
    if scheduler != "dpm++":
        [dpm] = engine.render([_spec()])
        assert np.abs(_pixels(image) - _pixels(dpm)).mean() > 0.1, "the scheduler must change the sampling"


def test_unknown_scheduler_lists_valid_names(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown scheduler 'k-lms'") as excinfo:
        Engine.load(str(tiny_model_dir), scheduler="k-lms")
    assert all(name in str(excinfo.value) for name in ("dpm++", "ddim", "euler-a"))


def test_dtype_applies_to_every_model(tiny_model_dir: Path) -> None:
    half = Engine.load(str(tiny_model_dir), dtype="bfloat16", safety_checker=False)
    pipe = half._pipe
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.bfloat16}
    [image] = half.render([_spec(settings=Settings(steps=1, width=64, height=64))])
    assert Image.open(io.BytesIO(image.png)).size == (64, 64)


def test_unknown_dtype_lists_valid_names(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="float32, float16, bfloat16"):
        Engine.load(str(tiny_model_dir), dtype="fp8")


def test_missing_folder_raises_model_error_with_a_fix(tmp_path: Path) -> None:
    missing = tmp_path / "no-model-here"
    with pytest.raises(ModelError) as excinfo:
        Engine.load(str(missing))
    message = str(excinfo.value)
    assert str(missing) in message
    assert "sygil-bot make-tiny-model" in message
    assert "\n" not in message


def test_folder_without_model_index_raises_model_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model", "utf-8")
    with pytest.raises(ModelError, match="not a diffusers model folder") as excinfo:
        Engine.load(str(tmp_path))
    assert "\n" not in str(excinfo.value)


def test_uncached_hub_id_offline_says_the_hub_is_out_of_reach() -> None:
    with pytest.raises(HubUnreachable, match="HF_HUB_OFFLINE") as excinfo:
        Engine.load("sygil-bot-tests/no-such-model")
    message = str(excinfo.value)
    assert "'sygil-bot-tests/no-such-model'" in message
    assert "cannot reach the Hugging Face hub and the model is not in the cache (HF_HOME=" in message
    assert "model.id" in message
    assert "\n" not in message
