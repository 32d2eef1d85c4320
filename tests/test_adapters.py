"""The shared architecture-adapter battery, parametrised over the registry's tiny builders, plus Janus specifics."""

import json
import warnings

import pytest
import torch
from PIL import Image

from reca_hf import RecACollator, RecATrainer
from reca_hf.adapters import (
    JanusAdapter,
    LossNoise,
    UMMAdapter,
    base,
    get_adapter,
    register_adapter,
    registered_adapters,
    tiny_builders,
)
from reca_hf.cli import validate
from reca_hf.freeze import apply_freeze, parameter_table
from reca_hf.testing import tiny_umm

ARCHS = sorted(tiny_builders())  # every architecture registered with a tiny builder runs the battery


def _batch(arch, shapes, n=4):
    model, processor = tiny_umm(arch)
    adapter = get_adapter(model, processor)
    batch = RecACollator(adapter, cond_dropout_prob=0.0)([shapes[i] for i in range(n)])
    return model, processor, adapter, {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_is_a_finite_scalar(arch, shapes):
    model, _, adapter, batch = _batch(arch, shapes)
    loss = adapter.loss(model, batch)
    assert loss.dim() == 0 and torch.isfinite(loss)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_step_changes_only_trainable_parameters(arch, shapes):
    model, _, adapter, batch = _batch(arch, shapes)
    frozen = set(apply_freeze(model, adapter, "auto"))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    adapter.loss(model, batch).backward()
    optimizer.step()
    for name, parameter in model.named_parameters():
        if name in frozen:
            assert parameter.grad is None and torch.equal(parameter, before[name]), name
        elif parameter.grad is not None and parameter.grad.abs().sum() > 0:
            assert not torch.equal(parameter, before[name]), name
    groups = parameter_table(model, adapter)
    # The generation path trains: its own modules, or the shared ones where it has none (Emu3's image
    # tokens live in the shared embedding table and head).
    trained = "generation" if adapter.generation_modules else "shared"
    assert groups[trained]["trainable"] > 0 and groups["tokenizers"]["trainable"] == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_gives_the_same_loss(arch, shapes, tmp_path):
    model, processor, adapter, batch = _batch(arch, shapes)
    model.eval()
    noise = LossNoise(seed=0)  # the same draws for a stochastic (diffusion, flow) loss
    expected = adapter.loss(model, batch, noise=noise)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert torch.allclose(get_adapter(reloaded).loss(reloaded, batch, noise=noise), expected, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_reconstruct_returns_images_at_the_generation_resolution(arch, shapes):
    model, processor = tiny_umm(arch)
    adapter = get_adapter(model, processor)
    images = adapter.reconstruct([shapes[0]["image"], shapes[1]["image"]], seed=0)
    size = adapter.generation_resolution_native
    assert [im.size for im in images] == [(size, size)] * 2
    low = adapter.reconstruct([shapes[0]["image"]], views=RecACollator(adapter, condition_resolution=16).views)
    assert low[0].size == (size, size)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_lora_run_writes_its_side_files_from_one_record(arch, make_args, shapes, tmp_path):
    """reca_run.json is the record; reca_parameters.json and reca_adapter.json say the same facts."""
    model, processor = tiny_umm(arch)
    adapter = get_adapter(model, processor)
    mode = "generation" if adapter.lora_generation_targets else "generation+llm"
    args = make_args(use_peft=True, lora_target_modules=mode, collapse_action="off")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on a base model it cannot look up offline
        trainer = RecATrainer(model, args=args, train_dataset=shapes, processing_class=processor)
        trainer.save_model()
    out = tmp_path / "run"
    run = json.loads((out / "reca_run.json").read_text())
    assert run["architecture"] == arch and run["parameter_table"] == trainer.parameter_table
    views = trainer.views
    assert (
        run["reca"]["condition_resolution"]
        == views.condition_resolution
        == trainer.data_collator.views.condition_resolution
    )
    assert run["settings"]["generation resolution"] == views.generation_resolution
    assert json.loads((out / "reca_parameters.json").read_text()) == run["parameter_table"]
    side = json.loads((out / "reca_adapter.json").read_text())
    assert side == {"reca_hf_version": run["reca_hf_version"], "adapter": arch, **run["lora"], **run["reca"]}
    scoped = mode == "generation+llm" and adapter.understanding_entry is not None
    assert side["lora_target_modules"] == mode and side["generation_scoped"] is scoped


def test_an_architecture_registered_with_its_tiny_builder_is_reachable_as_tiny(monkeypatch, tmp_path):
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    monkeypatch.setattr(base, "_TINY_BUILDERS", dict(base._TINY_BUILDERS))
    seeds = []

    def build(seed):
        seeds.append(seed)
        return tiny_umm("janus", seed)

    @register_adapter(tiny=build)
    class MiniJanus(JanusAdapter):
        name = "mini_janus"
        model_types = ("mini_janus",)

    assert tiny_builders()["mini_janus"] is build
    model, _ = tiny_umm("mini_janus", seed=3)
    assert seeds == [3] and model.config.model_type == "janus"
    recipe = tmp_path / "mini.yaml"
    recipe.write_text("model_name_or_path: tiny:mini_janus\ndataset_name: synthetic_shapes\n")
    assert validate(str(recipe)) == [] and seeds == [3, 0]
    with pytest.raises(ValueError, match="unknown arch 'nope'; available: .*mini_janus"):
        tiny_umm("nope")


def test_registry_refuses_bad_adapters_and_lists_supported_types():
    with pytest.raises(ValueError, match="already registered"):

        @register_adapter
        class Duplicate(registered_adapters()["janus"]):
            pass

    with pytest.raises(TypeError, match="does not declare"):

        class Incomplete(UMMAdapter):
            name = "incomplete"

    class Config:
        model_type = "chameleon"

    with pytest.raises(ValueError, match=r"Supported model types: .*janus"):
        get_adapter(Config())


def test_janus_pro_1b_dimensions_from_the_config_alone():
    from transformers import JanusConfig, JanusForConditionalGeneration

    config = JanusConfig(
        text_config={"model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24,
                     "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 102400},
        vision_config={"hidden_size": 1024, "image_size": 384, "patch_size": 16, "projection_dim": 2048},
        vq_config={"projection_dim": 2048, "image_token_embed_dim": 2048},
    )  # fmt: skip
    with torch.device("meta"):
        model = JanusForConditionalGeneration(config)
    _, processor = tiny_umm("janus")
    processor.image_processor.background_color = (127, 127, 127)
    adapter = get_adapter(model, processor)
    assert adapter.resolve_resolutions("auto", "auto") == (384, 384)
    assert (adapter.min_condition_resolution, adapter.native_generation_resolution) == (384, 384)
    tiny = get_adapter(tiny_umm("janus")[0])
    assert (tiny.min_condition_resolution, tiny.native_generation_resolution) == (32, 32)
    assert adapter.num_condition_tokens(384) == 576 and adapter.num_target_tokens == 576
    batch = RecACollator(adapter)([{"image": Image.new("RGB", (1024, 768), (10, 20, 30))}])
    assert batch["condition_pixel_values"].shape == (1, 3, 384, 384)
    assert batch["target_pixel_values"].shape == (1, 3, 384, 384)
    assert int(batch["condition_mask"].sum()) == 576
    with pytest.raises(ValueError, match=r"generation_resolution=512.*384"):
        adapter.resolve_resolutions("auto", 512)
    with pytest.raises(ValueError, match=r"condition_resolution=200.*multiple of 16"):
        adapter.resolve_resolutions(200, "auto")
