"""The benchmarks run: gpu_step.py's tiny CPU check and its refusal without a GPU, trainer_overhead.py and
harmon_derived.py at their smallest."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_step_checks_itself_on_the_cpu_and_refuses_without_a_gpu(tmp_path, monkeypatch):
    gpu_step = _load("gpu_step")
    (result,) = gpu_step.main(["--tiny", "--steps", "2", "--warmup", "1", "--out", str(tmp_path)])
    assert result["samples_per_second"] > 0 and result["tflops_per_second"] > 0
    assert result["trainable_parameters"] < result["parameters"]  # RecA's freeze: auto
    assert json.loads((tmp_path / "gpu_step.json").read_text())[0]["size"] == "tiny"
    assert "| tiny | 2 |" in (tmp_path / "gpu_step.md").read_text()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        gpu_step.main(["--out", ""])


def test_janus_pro_shapes_have_the_public_sizes():
    shapes = _load("janus_shapes")
    sizes = {}
    for size in ("1b", "7b"):
        model, _ = shapes.janus_pro_like(size, device="meta")
        sizes[size] = sum(p.numel() for p in model.parameters())
        assert model.config.vq_config.num_embeddings == 16384
        assert model.config.vision_config.num_image_tokens == 576
    assert 1.8e9 < sizes["1b"] < 1.95e9 and 6.9e9 < sizes["7b"] < 7.1e9


def test_harmon_shapes_have_the_published_sizes_and_train_at_512_px(tmp_path):
    gpu_step = _load("gpu_step")
    sizes = {}
    for size in gpu_step.HARMON:
        model, tokenizer = gpu_step.harmon_shape(size, device="meta")
        sizes[size] = sum(p.numel() for p in model.parameters())
        assert gpu_step.image_resolution(model) == 512  # 32 x 32 latent tokens
        assert tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
    # benchmarks/results/harmon_params.md: 771.4M and 2561.2M in all
    assert round(sizes["harmon_0_5b"] / 1e5) == 7714 and round(sizes["harmon_1_5b"] / 1e5) == 25612
    (result,) = gpu_step.main(
        ["--tiny", "--tiny-arch", "harmon", "--steps", "1", "--warmup", "1", "--out", str(tmp_path)]
    )
    assert result["samples_per_second"] > 0 and result["trainable_parameters"] < result["parameters"]


@pytest.mark.slow
def test_trainer_overhead_runs(tmp_path):
    result = _load("trainer_overhead").main(["--steps", "1", "--out", str(tmp_path)])
    assert result["ratio"] > 0 and (tmp_path / "trainer_overhead.md").exists()


def test_harmon_derived_runs_at_its_smallest():
    (row,) = _load("harmon_derived").main(["--steps", "2", "--train-images", "16", "--held-out", "2",
                                           "--batch-size", "4", "--settings", "half_res", "--out", ""])  # fmt: skip
    assert row["condition px"] == 32 and math.isfinite(row["condition_gain"]) and row["last loss"] > 0
