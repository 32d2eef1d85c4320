"""The BAGEL architecture adapter: the model-level golden step through the adapter's glue, freeze and LoRA scopes,
the authors' view sizes, timesteps, and the global token count of a multi-process step."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from reca_hf.adapters import LossNoise, get_adapter
from reca_hf.callbacks import condition_swap_loss, image_grid
from reca_hf.freeze import apply_freeze, matches
from reca_hf.metering import TaskMeteringMixin
from reca_hf.models.bagel import BagelConfig
from reca_hf.models.bagel.adapter import BagelAdapter
from reca_hf.models.bagel.tiny import build_tiny_bagel
from reca_hf.tasks import RECONSTRUCTION

GOLDEN = json.loads((Path(__file__).parent / "golden" / "bagel_flow_step.json").read_text())
INSTRUCTIONS = ["reconstruct the image", "a photo of a red circle on the left"]


def _golden_batch(adapter, drop_text: bool):
    """The golden run's inputs (tests/test_bagel_model.py::_parity_inputs) as views through ``prepare``: the
    conditions and targets as 0..1 tensors, the prompts as instructions (sample 1's None when its text is dropped)."""
    g = torch.Generator().manual_seed(7)
    conds = [torch.rand(3, 28, 42, generator=g) * 2 - 1, torch.rand(3, 42, 28, generator=g) * 2 - 1]
    targets = [torch.rand(3, 16, 24, generator=g) * 2 - 1, torch.rand(3, 32, 16, generator=g) * 2 - 1]
    instructions = [INSTRUCTIONS[0], None if drop_text else INSTRUCTIONS[1]]
    unit = [(x + 1) / 2 for x in conds], [(x + 1) / 2 for x in targets]
    return adapter.prepare(*unit, instructions, dropped=[False, drop_text])


@pytest.mark.parametrize("case", ["full", "text_dropped"])
def test_the_adapter_reproduces_the_authors_step(case):
    """The adapter's prepare + freeze: auto + loss, with LossNoise(seed=11) (the golden's posterior noise, timestep
    logits and flow noise are drawn from one generator seeded 11, in the adapter's order), give the golden loss and
    the golden gradients of exactly the golden's trainable set."""
    golden = GOLDEN[case]
    model, tokenizer = build_tiny_bagel(seed=0)
    adapter = get_adapter(model, tokenizer)
    assert [adapter.prompt_ids(text) for text in INSTRUCTIONS] == [tokenizer(t).input_ids for t in INSTRUCTIONS]
    apply_freeze(model, adapter, "auto")
    assert model.config.freeze_und
    model.train()
    loss = adapter.loss(model, _golden_batch(adapter, case == "text_dropped"), noise=LossNoise(seed=11))
    assert loss.item() == pytest.approx(golden["loss"], rel=1e-5)
    loss.backward()
    grads = {name: p.grad.norm().item() for name, p in model.named_parameters() if p.grad is not None}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == grads.keys() == golden["grad_norms"].keys()
    for name, expected in golden["grad_norms"].items():
        assert grads[name] == pytest.approx(expected, rel=1e-4), name


def test_freeze_und_follows_what_trains():
    model, tokenizer = build_tiny_bagel(seed=0)
    adapter = get_adapter(model, tokenizer)
    apply_freeze(model, adapter, "none")
    assert model.config.freeze_und is False
    apply_freeze(model, adapter, "auto")
    assert model.config.freeze_und is True
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {
        "language_model", "vae2llm", "llm2vae", "time_embedder"}  # fmt: skip
    assert all("moe_gen" in n for n, p in model.named_parameters() if p.requires_grad and n.startswith("language"))


def test_lora_generation_targets_are_the_generation_experts_only():
    model, tokenizer = build_tiny_bagel(seed=0)
    adapter = get_adapter(model, tokenizer)
    linears = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    targeted = [name for name in linears if matches(name, adapter.lora_generation_targets)]
    per_layer = {"self_attn.q_proj_moe_gen", "self_attn.k_proj_moe_gen", "self_attn.v_proj_moe_gen",
                 "self_attn.o_proj_moe_gen", "mlp_moe_gen.gate_proj", "mlp_moe_gen.up_proj", "mlp_moe_gen.down_proj"}  # fmt: skip
    layers = model.config.llm_config.num_hidden_layers
    assert sorted(targeted) == sorted(f"language_model.model.layers.{i}.{p}" for i in range(layers) for p in per_layer)


def test_the_real_configuration_gives_the_authors_views():
    """On BAGEL-7B-MoT's configuration: condition 224 (long side, multiples of 14), target 1024 (long side <= 1024,
    short >= 512, multiples of 16), each image keeping its aspect."""
    adapter = BagelAdapter(BagelConfig())
    views = adapter.default_views()
    assert (views.condition_resolution, views.generation_resolution) == (224, 1024)
    assert (views.target_fit, views.condition_fit, views.condition_source) == ("keep", "keep", "image")
    condition, target = views.views(Image.new("RGB", (800, 600)))
    assert condition.size == (224, 168) and target.size == (800, 608)
    condition, target = views.views(Image.new("RGB", (3000, 1000)))
    assert condition.size == (224, 70) and target.size == (1024, 336)
    assert adapter.generation_resolution_errors(1040) == [
        "must be at most 1024 (the latent position table covers 64 of 16 px)"]  # fmt: skip
    assert adapter.condition_resolution_errors(230) == ["must be a multiple of 14 (the ViT patch)"]


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_fixed_noise_levels_are_the_final_timesteps(shift):
    model, tokenizer = build_tiny_bagel(seed=0)
    model.config.timestep_shift = shift
    adapter = get_adapter(model, tokenizer)
    levels = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(model.timesteps_from_logits(adapter.timestep_logits(levels)), levels)


def test_the_per_sample_losses_weigh_as_their_tokens():
    model, tokenizer = build_tiny_bagel(seed=0)
    adapter = get_adapter(model, tokenizer)
    batch = _golden_batch(adapter, drop_text=False)  # 24 and 32 VAE tokens
    assert adapter.loss_tokens(batch) == 56
    noise = LossNoise(seed=11)
    per_sample = adapter.loss(model, batch, reduction="none", noise=noise)
    assert per_sample.mean().item() == pytest.approx(adapter.loss(model, batch, noise=noise).item(), rel=1e-6)
    assert per_sample.mean().item() == pytest.approx(GOLDEN["full"]["loss"], rel=1e-5)
    own = torch.tensor(GOLDEN["full"]["token_losses"])
    expected = torch.stack([own[:24].sum(), own[24:].sum()]) * 2 / 56
    torch.testing.assert_close(per_sample.detach(), expected, rtol=1e-5, atol=1e-6)


def test_several_processes_divide_by_the_global_token_count():
    """Two processes with 56 and 32 VAE tokens: what each trains on, averaged over the processes (DDP's gradient
    mean), is the mean over all 88 tokens, as the authors' `mse.sum() * world / global_tokens`."""
    model, tokenizer = build_tiny_bagel(seed=0)
    adapter = get_adapter(model, tokenizer)
    batches = [_golden_batch(adapter, drop_text=False), adapter.prepare(
        [torch.rand(3, 28, 28)] * 2, [torch.rand(3, 16, 16)] * 2, ["a", "b"])]  # fmt: skip
    tokens = [adapter.loss_tokens(b) for b in batches]
    assert tokens == [56, 32]
    counts = torch.tensor([[2.0, tokens[0]], [2.0, tokens[1]]])
    local_losses = [torch.tensor(0.8), torch.tensor(1.4)]  # each process's own token-weighted mean
    trained = []
    for rank, batch in enumerate(batches):
        trainer = SimpleNamespace(
            adapter=adapter,
            args=SimpleNamespace(task_loss_reduction="sample_mean"),
            accelerator=SimpleNamespace(num_processes=2, device=torch.device("cpu"), gather=lambda _: counts),
        )
        trainer._token_share = TaskMeteringMixin._token_share.__get__(trainer)
        share, factor = TaskMeteringMixin._loss_token_share(trainer, {RECONSTRUCTION: batch}, "train")
        trained.append(local_losses[rank] * share * factor)
    global_mean = (local_losses[0] * 56 + local_losses[1] * 32) / 88
    assert (sum(trained) / 2).item() == pytest.approx(global_mean.item(), rel=1e-6)


def test_the_probe_and_the_grid_take_images_of_different_shapes():
    """The condition-swap probe swaps conditions of different sizes between samples; reconstructions keep each
    condition's aspect at the target bounds, and the grid letterboxes them."""
    model, tokenizer = build_tiny_bagel(seed=0)
    adapter = get_adapter(model, tokenizer)
    views = adapter.default_views()
    images = [Image.effect_noise(size, 50).convert("RGB") for size in ((96, 48), (40, 80), (64, 64))]
    reading = condition_swap_loss(adapter, model, images, views)
    assert all(math.isfinite(value) for value in reading.values())
    adapter.num_inference_steps = 2
    reconstructions = adapter.reconstruct(images, seed=0)
    assert [image.size for image in reconstructions] == [(32, 16), (16, 32), (32, 32)]
    assert image_grid({"input": [views.target_view(i) for i in images], "step 0": reconstructions}).size == (192, 302)
