"""The shared architecture-adapter battery, parametrised over the registry's tiny builders, plus Janus specifics.

Every architecture registered with ``register_adapter(tiny=...)`` runs each test marked by ``ARCHS``: prepare ->
loss -> backward under ``freeze="auto"``, per-sample losses and fixed noise, prompt dropout's ``dropped=``,
save/reload, LoRA save/reload, the collapse probe, ``reconstruct``, a short ``RecATrainer`` run with resume, and
the card. A new architecture joins by registering its tiny builder.
"""

import json
import math
import warnings

import pytest
import torch
from PIL import Image

from reca_hf import RecACollator, RecATrainer, load_reca_adapter
from reca_hf.adapters import (
    JanusAdapter,
    LossNoise,
    UMMAdapter,
    get_adapter,
    register_adapter,
    registered_adapters,
    registry,
    tiny_builders,
)
from reca_hf.callbacks import CollapseDetector, has_target_logits
from reca_hf.cli import validate
from reca_hf.freeze import apply_freeze, parameter_table
from reca_hf.hub import render_run_card
from reca_hf.testing import tiny_umm

ARCHS = sorted(tiny_builders())  # every architecture registered with a tiny builder runs the battery


def _tensors(batch):
    """The model inputs of a collated batch: its tensors, and its lists of tensors or token ids (views of different
    sizes, BAGEL's prompts); not the instruction strings."""
    return {
        k: v for k, v in batch.items() if isinstance(v, torch.Tensor) or (isinstance(v, list) and k != "instructions")
    }


def _batch(arch, shapes, n=4):
    model, processor = tiny_umm(arch)
    adapter = get_adapter(model, processor)
    batch = RecACollator(adapter, cond_dropout_prob=0.0)([shapes[i] for i in range(n)])
    return model, processor, adapter, _tensors(batch)


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
    # No weight decay: a step then moves exactly the parameters with a gradient (decay would move the others too).
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    adapter.loss(model, batch).backward()
    optimizer.step()
    moved = set()
    for name, parameter in model.named_parameters():
        if name in frozen:
            assert parameter.grad is None and torch.equal(parameter, before[name]), name
            continue
        has_gradient = parameter.grad is not None and bool(parameter.grad.abs().sum() > 0)
        assert torch.equal(parameter, before[name]) != has_gradient, name  # off the loss's path: unchanged
        if has_gradient:
            moved.add(name)
    assert moved, "one step moved no parameter"
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
    size = adapter.native_generation_resolution
    assert [im.size for im in images] == [(size, size)] * 2
    low_resolution = adapter.round_condition_resolution(16)  # a size the condition encoder takes
    low = adapter.reconstruct(
        [shapes[0]["image"]], views=RecACollator(adapter, condition_resolution=low_resolution).views
    )
    assert low[0].size == (size, size)


@pytest.mark.parametrize("arch", ARCHS)
def test_text_to_image_is_seeded_batched_and_guided(arch):
    model, processor = tiny_umm(arch)
    adapter = get_adapter(model, processor)
    size = adapter.native_generation_resolution
    steps = {} if adapter.generation_target.is_tokens else {"num_inference_steps": 2}
    first = adapter.text_to_image(["a red circle", "a blue square"], seed=0, num_images_per_prompt=2, **steps)
    again = adapter.text_to_image(["a red circle", "a blue square"], seed=0, num_images_per_prompt=2, **steps)
    assert [im.size for im in first] == [(size, size)] * 4
    assert [im.tobytes() for im in first] == [im.tobytes() for im in again]
    other = adapter.text_to_image(["a red circle", "a blue square"], seed=1, num_images_per_prompt=2, **steps)
    assert [im.tobytes() for im in first] != [im.tobytes() for im in other]
    plain = adapter.text_to_image(["a red circle", "a blue square"], seed=0, guidance_scale=1.0, **steps)
    guided = adapter.text_to_image(["a red circle", "a blue square"], seed=0, guidance_scale=30.0, **steps)
    assert [im.tobytes() for im in plain] != [im.tobytes() for im in guided]


def test_an_adapter_without_a_text_to_image_sampler_says_so():
    from reca_hf.adapters.flow import FlowAdapter

    class NoSampler(FlowAdapter):
        sample_text_codes = UMMAdapter.sample_text_codes

    model, processor = tiny_umm("flow")
    adapter = NoSampler(model.config, processor, model=model)
    assert not adapter.supports_text_to_image_sampling() and adapter.generation_snippet("x/y") is None
    with pytest.raises(NotImplementedError, match="no text-to-image sampler"):
        adapter.text_to_image(["a red circle"])


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


@pytest.mark.parametrize("arch", ARCHS)
def test_a_trained_lora_adapter_saves_and_reloads_to_the_same_loss(arch, make_args, shapes, tmp_path):
    model, processor = tiny_umm(arch)
    adapter = get_adapter(model, processor)
    mode = "generation" if adapter.lora_generation_targets else "generation+llm"
    args = make_args(use_peft=True, lora_target_modules=mode, collapse_action="off", max_steps=1, learning_rate=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on a base model it cannot look up offline
        trainer = RecATrainer(model, args=args, train_dataset=shapes, processing_class=processor)
        trainer.train()
        trainer.save_model()
        reloaded = load_reca_adapter(tmp_path / "run", tiny_umm(arch)[0])
    batch = _tensors(trainer.data_collator([shapes[i] for i in range(4)]))
    noise = LossNoise(seed=0)
    trainer.model.eval(), reloaded.eval()
    expected = adapter.loss(trainer.model, batch, noise=noise)
    assert torch.allclose(adapter.loss(reloaded, batch, noise=noise), expected, atol=1e-6)
    base_model = tiny_umm(arch)[0].eval()
    assert not torch.allclose(adapter.loss(base_model, batch, noise=noise), expected, atol=1e-6)  # LoRA trained


@pytest.mark.parametrize("arch", ARCHS)
def test_per_sample_losses_average_to_the_mean_and_fixed_noise_repeats_bitwise(arch, shapes):
    model, _, adapter, batch = _batch(arch, shapes)
    model.eval()
    noise = LossNoise(seed=5, timesteps=(0.3, 0.8))
    per_sample = adapter.loss(model, batch, reduction="none", noise=noise)
    assert per_sample.shape == (4,) and torch.isfinite(per_sample).all()
    assert torch.allclose(per_sample.mean(), adapter.loss(model, batch, noise=noise), atol=1e-5)
    assert torch.equal(adapter.loss(model, batch, reduction="none", noise=noise), per_sample)


@pytest.mark.parametrize("arch", ARCHS)
def test_prepare_takes_the_dropped_rows_and_a_left_out_instruction(arch, shapes):
    """Prompt dropout's inputs: ``dropped=`` and a None instruction (a null prompt of None) in any row."""
    model, processor = tiny_umm(arch)
    adapter = get_adapter(model, processor)
    views = adapter.default_views()
    pictures = [shapes[i]["image"] for i in range(2)]
    conditions, targets = zip(*(views.views(p) for p in pictures))
    batch = adapter.prepare(list(conditions), list(targets), [None, "Describe the image."], dropped=[True, False])
    assert adapter.batch_size(batch) == 2 and torch.isfinite(adapter.loss(model, _tensors(batch)))
    if adapter.supports("text_to_image"):
        squares = [views.square(p, views.generation_resolution) for p in pictures]
        t2i = adapter.prepare_text_to_image([None, "a red circle"], squares, dropped=[True, False])
        assert torch.isfinite(adapter.text_to_image_loss(model, _tensors(t2i)))


@pytest.mark.parametrize("arch", ARCHS)
def test_the_collapse_probe_reads_the_model_and_gives_back_its_training_flags(arch, shapes):
    """The detector's default probe for this target kind; with every image alike a swap changes nothing."""
    model, processor = tiny_umm(arch)
    adapter = get_adapter(model, processor)
    views = adapter.default_views()
    images = [shapes[i]["image"] for i in range(3)]
    model.train()
    detector = CollapseDetector(adapter, views, images)
    reading = detector.probe(model)
    assert model.training
    token = has_target_logits(adapter)
    keys = {"swap_copy_rate", "swap_target_rate", "own_accuracy"} if token else {"condition_gain", "swap_own_loss",
                                                                                 "swap_other_loss"}  # fmt: skip
    assert set(reading) == keys and all(math.isfinite(v) for v in reading.values())
    detector.observe_probe(0, reading)
    assert 0.0 <= detector.history[-1]["collapse_score"] <= 1.0  # the name dashboards read, for both probes
    if not token:  # a loss probe's reading under the name of what it measures
        assert detector.history[-1]["collapse_score"] == max(detector.history[-1]["condition_gain"], 0.0)
    alike = CollapseDetector(adapter, views, [images[0]] * 2).probe(model)
    if token:
        assert alike["swap_copy_rate"] == alike["swap_target_rate"] == 0.0  # no token differs: nothing to count
    else:
        assert alike["condition_gain"] == 0.0 and alike["swap_own_loss"] == alike["swap_other_loss"] > 0


def _run(arch, make_args, shapes, max_steps, resume=None):
    model, processor = tiny_umm(arch)
    args = make_args(max_steps=max_steps, save_strategy="steps", save_steps=2, learning_rate=1e-3,
                     lr_scheduler_type="constant", collapse_action="off", per_device_train_batch_size=2)  # fmt: skip
    trainer = RecATrainer(model, args=args, train_dataset=shapes, processing_class=processor)
    trainer.train(resume_from_checkpoint=resume)
    losses = [log["reconstruction_loss"] for log in trainer.state.log_history if "reconstruction_loss" in log]
    return trainer, losses


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_a_short_run_resumes_with_the_same_losses(arch, make_args, shapes, tmp_path):
    """Four steps straight, and two resumed from the checkpoint at step 2, log the same losses (the Trainer
    restores the random state, so stochastic losses draw the same noise); a checkpoint loads as a model too."""
    first, straight = _run(arch, make_args, shapes, 4)
    saved = type(first.model).from_pretrained(tmp_path / "run" / "checkpoint-4").state_dict()
    assert all(torch.equal(saved[k], v) for k, v in first.model.state_dict().items())
    trainer, resumed = _run(arch, make_args, shapes, 4, resume=str(tmp_path / "run" / "checkpoint-2"))
    assert len(straight) == 4 and trainer.state.global_step == 4
    assert resumed == pytest.approx(straight, abs=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_card_states_the_run(arch, make_args, shapes, tmp_path):
    trainer, _ = _run(arch, make_args, shapes, 1)
    trainer.save_model()
    out = tmp_path / "run"
    run = json.loads((out / "reca_run.json").read_text())
    card = (out / "README.md").read_text()
    assert card == str(render_run_card(out)) and run["architecture"] == arch
    views = trainer.views
    for value in (arch, f"target {views.target_fit}, condition {views.condition_fit}", views.condition_resize):
        assert value in card, value
    assert run["settings"]["prompt dropout"] == trainer.cond_dropout_prob == trainer.adapter.default_cond_dropout_prob
    assert run["reca"]["generation_resolution"] == views.generation_resolution


def test_an_architecture_registered_with_its_tiny_builder_is_reachable_as_tiny(monkeypatch, tmp_path):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_TINY_BUILDERS", dict(registry._TINY_BUILDERS))
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

    declared = {attr: getattr(JanusAdapter, attr) for attr in UMMAdapter._REQUIRED}
    with pytest.raises(TypeError, match=r"does not implement decode_codes, loss, prepare, sample_codes"):
        type("NoMethods", (UMMAdapter,), declared)
    with pytest.raises(TypeError, match="implements image_to_text_loss but not prepare_image_to_text"):
        type("HalfTask", (registered_adapters()["flow"],), {"image_to_text_loss": lambda self, model, batch: None})

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


def test_the_0_1_names_warn_and_still_answer():
    from reca_hf import callbacks
    from reca_hf.adapters.helpers import eval_mode

    adapter = get_adapter(*tiny_umm("janus"))
    with pytest.warns(FutureWarning, match="use min_condition_resolution"):
        assert adapter.condition_resolution_floor == adapter.min_condition_resolution
    with pytest.warns(FutureWarning, match="use native_generation_resolution"):
        assert adapter.generation_resolution_native == adapter.native_generation_resolution
    with pytest.warns(FutureWarning, match="use eval_mode"):
        assert callbacks.evaluating is eval_mode
