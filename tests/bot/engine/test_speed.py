"""Speed settings and render stages: same images as the plain engine, warm-up, padding, compile, out of memory."""

from __future__ import annotations

import concurrent.futures
import functools
import io
import os
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._dynamo.utils

# diffusers exports its public names through a lazy module that pyright reads as private imports.
# pyright: reportPrivateImportUsage=false
from diffusers import UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel

from bot.engine import Engine, EngineOptions, ImageSpec, Mode, RenderedImage, Settings
from bot.errors import OutOfMemory

FAST = Settings(steps=4, guidance=7.0, width=64, height=64)
PLAIN = EngineOptions(channels_last=False, fused_qkv=False)


def _pixels(image: RenderedImage) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image.png)).convert("RGB"), dtype=np.int16)


def _specs(count: int, settings: Settings = FAST) -> list[ImageSpec]:
    prompts = ["species:seal, beach", "studio:dc, city at night", "species:fox, forest"]
    return [
        ImageSpec(prompt=prompts[index % 3], negative_prompt="blurry", seed=100 + index, settings=settings)
        for index in range(count)
    ]


def _max_difference(first: list[RenderedImage], second: list[RenderedImage]) -> int:
    assert len(first) == len(second)
    return max(int(np.abs(_pixels(a) - _pixels(b)).max()) for a, b in zip(first, second, strict=True))


def _mean_difference(first: list[RenderedImage], second: list[RenderedImage]) -> float:
    assert len(first) == len(second)
    return max(float(np.abs(_pixels(a) - _pixels(b)).mean()) for a, b in zip(first, second, strict=True))


@pytest.fixture(scope="module")
def plain(tiny_model_dir: Path) -> Engine:
    """Load the tiny model with every speed setting off."""
    return Engine.load(str(tiny_model_dir), options=PLAIN)


def test_channels_last_and_fused_qkv_render_the_same_images(engine: Engine, plain: Engine) -> None:
    assert engine.describe()["channels_last"] is True and engine.describe()["fused_qkv"] is True
    specs = _specs(2)
    assert _max_difference(engine.render(specs), plain.render(specs)) <= 2


def test_attention_slicing_renders_the_same_images(tiny_model_dir: Path, plain: Engine) -> None:
    sliced = Engine.load(str(tiny_model_dir), options=EngineOptions(attention="slicing"))
    assert (sliced.describe()["attention"], sliced.describe()["fused_qkv"]) == ("slicing", False)
    assert _max_difference(sliced.render(_specs(2)), plain.render(_specs(2))) <= 2


def test_xformers_without_cuda_falls_back_to_sdpa(tiny_model_dir: Path) -> None:
    engine = Engine.load(str(tiny_model_dir), options=EngineOptions(attention="xformers"))
    described = engine.describe()
    assert (described["attention"], described["attention_requested"]) == ("sdpa", "xformers")
    [image] = engine.render(_specs(1))
    assert Image.open(io.BytesIO(image.png)).size == (64, 64)


def test_staged_render_equals_render(engine: Engine) -> None:
    specs = _specs(3)
    staged = engine.finish(engine.denoise(engine.prepare(specs)))
    assert [image.png for image in staged] == [image.png for image in engine.render(specs)]


def test_prepare_of_the_next_batch_between_stages_changes_nothing(engine: Engine) -> None:
    first, second = _specs(2), _specs(3, replace(FAST, steps=3))
    prepared = engine.prepare(first)
    engine.prepare(second)  # what the worker's side thread does while the first batch denoises
    assert [image.png for image in engine.finish(engine.denoise(prepared))] == [
        image.png for image in engine.render(first)
    ]


def test_stages_overlap_on_threads_as_the_worker_runs_them(engine: Engine) -> None:
    batches = [_specs(2), _specs(3, replace(FAST, steps=3)), _specs(1, replace(FAST, width=48))]
    expected = [[image.png for image in engine.render(specs)] for specs in batches]
    results: list[concurrent.futures.Future[list[RenderedImage]]] = []
    with (
        concurrent.futures.ThreadPoolExecutor(1) as side,
        concurrent.futures.ThreadPoolExecutor(2) as pool,
    ):
        prepared = side.submit(engine.prepare, batches[0])
        for index in range(len(batches)):
            current = prepared.result()
            if index + 1 < len(batches):
                prepared = side.submit(engine.prepare, batches[index + 1])  # encodes while this batch denoises
            results.append(pool.submit(engine.finish, engine.denoise(current)))
        assert [[image.png for image in result.result()] for result in results] == expected


def test_prompt_embeds_path_matches_the_prompt_path(engine: Engine) -> None:
    specs = _specs(3)
    with torch.inference_mode():
        reference = engine._pipe(
            prompt=[spec.prompt for spec in specs],
            negative_prompt=[spec.negative_prompt for spec in specs],
            num_inference_steps=FAST.steps,
            guidance_scale=FAST.guidance,
            generator=[torch.Generator("cpu").manual_seed(spec.seed) for spec in specs],
            height=FAST.height,
            width=FAST.width,
            output_type="np",
        ).images  # pyright: ignore[reportAttributeAccessIssue]
    expected = (np.asarray(reference) * 255).round().astype(np.int16)
    rendered = np.stack([_pixels(image) for image in engine.render(specs)])
    assert np.abs(rendered - expected).max() <= 2


def test_img2img_prompt_embeds_path_matches_the_prompt_path(engine: Engine) -> None:
    [source] = engine.render(_specs(1))
    settings = replace(FAST, mode=Mode.IMG2IMG, strength=0.75)
    specs = [replace(spec, settings=settings, init_image=source.png) for spec in _specs(2)]
    init = Image.open(io.BytesIO(source.png)).convert("RGB")
    with torch.inference_mode():
        reference = engine._img2img(
            prompt=[spec.prompt for spec in specs],
            negative_prompt=[spec.negative_prompt for spec in specs],
            image=[init, init],
            strength=0.75,
            num_inference_steps=FAST.steps,
            guidance_scale=FAST.guidance,
            generator=[torch.Generator("cpu").manual_seed(spec.seed) for spec in specs],
            output_type="np",
        ).images  # pyright: ignore[reportAttributeAccessIssue]
    expected = (np.asarray(reference) * 255).round().astype(np.int16)
    rendered = np.stack([_pixels(image) for image in engine.render(specs)])
    assert np.abs(rendered - expected).max() <= 2


def test_warm_up_without_compile_takes_time_and_is_described(tiny_model_dir: Path) -> None:
    options = EngineOptions(warmup_batches=(1, 2), warmup_sizes=((64, 64), (48, 64)), warmup_steps=1)
    engine = Engine.load(str(tiny_model_dir), options=options)
    seconds = engine.warm_up()
    assert seconds > 0
    described = engine.describe()
    assert described["warm_up_seconds"] == seconds
    assert described["warmed"] == [[1, 48, 64], [1, 64, 64], [2, 48, 64], [2, 64, 64]]
    assert {key: described[key] for key in ("compile", "cuda_graphs", "channels_last", "fused_qkv", "attention")} == {
        "compile": False,
        "cuda_graphs": False,
        "channels_last": True,
        "fused_qkv": True,
        "attention": "sdpa",
    }
    assert (described["device"], described["dtype"], described["scheduler"]) == ("cpu", "float32", "dpm++")
    assert engine.peak_memory() is None


def test_progress_may_raise_to_stop_a_batch(engine: Engine) -> None:
    def stop(step: int, total: int) -> None:
        raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError, match="cancelled"):
        engine.denoise(engine.prepare(_specs(2)), stop)
    [image] = engine.render(_specs(1))
    assert _pixels(image).std() > 1


def _out_of_memory(*args: object, **kwargs: object) -> None:
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_in_denoise_says_what_did_not_fit(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    [before] = engine.render(_specs(1))
    with monkeypatch.context() as patch:
        patch.setattr(UNet2DConditionModel, "forward", _out_of_memory)
        with pytest.raises(OutOfMemory, match=r"^The GPU ran out of memory rendering 3 images at 64x64\.$"):
            engine.render(_specs(3))
    [after] = engine.render(_specs(1))
    assert after.png == before.png


def test_out_of_memory_in_prepare_says_what_did_not_fit(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(CLIPTextModel, "forward", _out_of_memory)
        with pytest.raises(OutOfMemory, match=r"rendering 1 image at 48x64\."):
            engine.prepare(_specs(1, replace(FAST, width=48)))
    assert len(engine.render(_specs(1))) == 1


def test_options_are_picklable_plain_data() -> None:
    options = EngineOptions(compile=True, warmup_batches=(1, 2, 4), warmup_sizes=((512, 768),), compile_cache="/c")
    assert pickle.loads(pickle.dumps(options)) == options


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"attention": "flash"}, "attention"),
        ({"warmup_batches": ()}, "warmup_batches"),
        ({"warmup_batches": (1, 0)}, "warmup_batches"),
        ({"warmup_sizes": ((512, 500),)}, "warmup_sizes"),
        ({"warmup_sizes": ()}, "warmup_sizes"),
        ({"warmup_steps": 0}, "warmup_steps"),
        ({"compile": "yes"}, "compile"),
        ({"compile_cache": " "}, "compile_cache"),
    ],
)
def test_bad_options_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field} "):
        EngineOptions(**kwargs)  # type: ignore[arg-type]


@pytest.mark.slow
def test_compiled_engine_pads_to_warm_shapes_and_never_compiles_for_a_request(
    tiny_model_dir: Path, plain: Engine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Inductor needs about 8 minutes to compile the tiny model on two CPU cores; dynamo's eager backend traces and
    # guards exactly the same graphs in seconds, which is what decides when a request would wait for a compile.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "default-cache"))
    options = EngineOptions(
        compile=True, warmup_batches=(4,), warmup_sizes=((64, 64),), compile_cache=str(tmp_path / "cache")
    )
    engine = Engine.load(str(tiny_model_dir), options=options)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache")
    engine.warm_up()
    assert engine.describe()["warmed"] == [[4, 64, 64]]
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs > 0

    three = _specs(3)
    padded = engine.prepare(three)
    assert (len(padded.specs), padded.real, padded.compiled) == (4, 3, True)
    compiled = engine.finish(engine.denoise(padded))
    assert [image.seed for image in compiled] == [100, 101, 102]
    assert _max_difference(compiled, plain.render(three)) <= 2

    settings = replace(FAST, mode=Mode.IMG2IMG, strength=0.5)
    variations = [replace(spec, settings=settings, init_image=compiled[0].png) for spec in three]
    assert engine.prepare(variations).compiled
    # img2img in a padded batch of 4 against an unpadded 3 on random tiny weights: a few pixels of the last image
    # move by up to 4-7 levels from float noise alone (plain eager, batch 3 against 4, does the same), while a
    # wrong image differs by about 40 levels on average.
    assert _mean_difference(engine.render(variations), plain.render(variations)) < 1.0

    unwarmed = [_specs(1, replace(FAST, width=48)), _specs(5), _specs(2, replace(FAST, guidance=1.0))]
    for specs in unwarmed:
        assert not engine.prepare(specs).compiled
        assert _max_difference(engine.render(specs), plain.render(specs)) <= 2
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "a request compiled a graph"


@pytest.mark.gpu
@pytest.mark.skipif(os.environ.get("RUN_GPU") != "1", reason="needs a CUDA GPU; run with RUN_GPU=1")
def test_compiled_with_cuda_graphs_matches_eager_on_gpu(tiny_model_dir: Path) -> None:
    warm = EngineOptions(compile=True, cuda_graphs=True, warmup_batches=(2,), warmup_sizes=((64, 64),))
    compiled = Engine.load(str(tiny_model_dir), device="cuda", options=warm)
    eager = Engine.load(str(tiny_model_dir), device="cuda", options=PLAIN)
    assert compiled.warm_up() > 0 and compiled.describe()["cuda_graphs"] is True
    for _ in range(2):  # a second replay must not see the first one's graph outputs overwritten
        assert _max_difference(compiled.render(_specs(2)), eager.render(_specs(2))) <= 2
    assert (compiled.peak_memory() or 0) > 0
