"""The continuous-target contract on the tiny flow-matching UMM: per-sample losses, fixed noise, the
loss-based condition-swap probe, and training through RecATrainer."""

import pytest
import torch

from reca_hf import RecACollator, RecATrainer
from reca_hf.adapters import GenerationTarget, LossNoise, get_adapter
from reca_hf.callbacks import CollapseDetector, condition_swap_loss
from reca_hf.images import ViewSpec
from reca_hf.models.tiny_flow import TinyFlowModel
from reca_hf.testing import tiny_umm


def _batch(arch, shapes, n=4, **collator):
    model, processor = tiny_umm(arch)
    adapter = get_adapter(model, processor)
    batch = RecACollator(adapter, cond_dropout_prob=0.0, **collator)([shapes[i] for i in range(n)])
    return model, adapter, {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("arch", ["flow", "janus", "emu3"])
def test_per_sample_losses_average_to_the_mean_loss(arch, shapes):
    model, adapter, batch = _batch(arch, shapes)
    noise = LossNoise(seed=3)
    per_sample = adapter.loss(model, batch, reduction="none", noise=noise)
    assert per_sample.shape == (4,)
    assert torch.allclose(per_sample.mean(), adapter.loss(model, batch, noise=noise), atol=1e-5)


def test_the_same_noise_gives_bitwise_equal_flow_losses_and_other_noise_does_not(shapes):
    model, adapter, batch = _batch("flow", shapes)
    first = adapter.loss(model, batch, reduction="none", noise=LossNoise(seed=7, timesteps=(0.3, 0.8)))
    again = adapter.loss(model, batch, reduction="none", noise=LossNoise(seed=7, timesteps=(0.3, 0.8)))
    assert torch.equal(first, again)
    assert not torch.equal(first, adapter.loss(model, batch, reduction="none", noise=LossNoise(seed=8)))
    assert not torch.equal(adapter.loss(model, batch), adapter.loss(model, batch))  # training draws afresh


def test_fixed_noise_levels_follow_the_samples(shapes):
    model, adapter, batch = _batch("flow", shapes)
    low = adapter.loss(model, batch, reduction="none", noise=LossNoise(seed=0, timesteps=(0.05,)))
    high = adapter.loss(model, batch, reduction="none", noise=LossNoise(seed=0, timesteps=(0.95,)))
    mixed = adapter.loss(model, batch, reduction="none", noise=LossNoise(seed=0, timesteps=(0.05, 0.95)))
    assert torch.allclose(mixed[0::2], low[0::2]) and torch.allclose(mixed[1::2], high[1::2])


def test_contract_values_are_checked():
    with pytest.raises(ValueError, match="kind='pixels'"):
        GenerationTarget("pixels")
    with pytest.raises(ValueError, match="no codebook_size"):
        GenerationTarget("flow", codebook_size=16)
    with pytest.raises(ValueError, match="timesteps"):
        LossNoise(0, timesteps=(1.5,))
    with pytest.raises(ValueError, match="mask_ratio"):
        LossNoise(0, mask_ratio=0.0)


def test_generation_targets_describe_each_adapter(tiny_janus):
    assert get_adapter(*tiny_janus).generation_target == GenerationTarget("autoregressive_tokens", codebook_size=64)
    assert get_adapter(*tiny_umm("flow")).generation_target == GenerationTarget("flow")


class _Copier(TinyFlowModel):
    """Reads the target off its condition: with the right condition the velocity is exact."""

    def encoder_states(self, input_ids, attention_mask, condition_pixel_values=None, condition_mask=None):
        return self.latents(condition_pixel_values)

    def velocity(self, noisy_latents, sigmas, states):
        return (noisy_latents - states) / sigmas.view(-1, 1, 1, 1)


class _Ignorer(TinyFlowModel):
    """Never looks at its condition."""

    def velocity(self, noisy_latents, sigmas, states):
        return noisy_latents


@pytest.mark.parametrize(("model_class", "low", "high"), [(_Copier, 0.99, 1.0), (_Ignorer, 0.0, 0.0)])
def test_the_loss_probe_separates_a_copying_model_from_one_that_ignores_its_condition(model_class, low, high, shapes):
    model, processor = tiny_umm("flow_latents")
    model = model_class(model.config).eval()
    adapter = get_adapter(model, processor)
    views = ViewSpec(32, 32)  # the condition is the target's own latents: copyable
    reading = condition_swap_loss(adapter, model, [shapes[i]["image"] for i in range(4)], views)
    assert low - 1e-6 <= reading["condition_gain"] <= high + 1e-6
    assert reading["swap_other_loss"] > 0


def test_the_detector_fires_on_a_copying_flow_model_only_with_the_loss_signal(shapes):
    model, processor = tiny_umm("flow_latents")
    model = _Copier(model.config).eval()
    adapter = get_adapter(model, processor)
    detector = CollapseDetector(adapter, ViewSpec(32, 32), [shapes[i]["image"] for i in range(4)])
    assert detector.uniform_loss is None  # continuous: the reference is the first logged loss
    detector.observe_loss(10, 1.0)
    assert not detector.observe_probe(10, detector.probe(model))  # copying, but the loss has not fallen
    assert not detector.observe_loss(20, 0.5) and detector.observe_loss(30, 0.05)
    assert detector.observe_probe(30, detector.probe(model)) and detector.fired_at_step == 30
    assert detector.history[-1]["condition_gain"] > 0.99


def test_the_flow_model_trains_through_the_trainer_with_its_detector(make_args, shapes):
    model, processor = tiny_umm("flow")
    args = make_args(max_steps=6, learning_rate=2e-3, collapse_probe_steps=3, collapse_probe_images=4)
    trainer = RecATrainer(model, args=args, train_dataset=shapes, processing_class=processor)
    trainer.train()
    losses = [log["reconstruction_loss"] for log in trainer.state.log_history if "reconstruction_loss" in log]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    readings = [log for log in trainer.state.log_history if "condition_gain" in log]
    assert readings and trainer.collapse_detector.fired_at_step is None


def test_activation_checkpointing_reaches_the_diffusers_transformer_with_the_same_gradients(shapes):
    model, adapter, batch = _batch("flow", shapes)
    noise = LossNoise(seed=1)
    model.train()
    adapter.loss(model, batch, noise=noise).backward()
    expected = model.transformer.proj_out.weight.grad.clone()
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert model.transformer.gradient_checkpointing
    adapter.loss(model, batch, noise=noise).backward()
    assert torch.allclose(model.transformer.proj_out.weight.grad, expected, atol=1e-6)


def test_the_same_space_variant_hands_its_condition_slots_to_the_transformer_on_its_grid(shapes):
    """flow_latents (aligned_condition): the states carry the queries and then one state per condition slot, the
    slots' grid reaches the transformer (another condition changes the velocity), and CFG still runs when the
    unconditional branch has no slots."""
    with pytest.warns(UserWarning, match="allow_shortcut=True"):
        model, adapter, batch = _batch("flow_latents", shapes, condition_resolution=32, allow_shortcut=True)
    states = model.encoder_states(batch["input_ids"], batch["attention_mask"], batch["condition_pixel_values"],
                                  batch["condition_mask"])  # fmt: skip
    assert states.shape[1] == model.config.num_queries + 64  # 8x8 latent slots at 32 px
    unconditional = model.encoder_states(batch["input_ids"][:, -4:], batch["attention_mask"][:, -4:])
    assert unconditional.shape[1] == model.config.num_queries
    noisy, sigmas = torch.randn(4, 4, 8, 8), torch.full((4,), 0.75)
    swapped = model.encoder_states(batch["input_ids"], batch["attention_mask"],
                                   batch["condition_pixel_values"].roll(1, 0), batch["condition_mask"])  # fmt: skip
    swapped_slots = torch.cat([states[:, : model.config.num_queries], swapped[:, model.config.num_queries :]], 1)
    with torch.no_grad():
        assert not torch.allclose(model.velocity(noisy, sigmas, states), model.velocity(noisy, sigmas, swapped_slots))
    images = [shapes[i]["image"] for i in range(2)]
    assert len(adapter.reconstruct(images, model=model, views=ViewSpec(32, 32), guidance_scale=2.0, seed=0)) == 2
    config = model.config
    config.transformer_config = {**config.transformer_config, "in_channels": 4}
    with pytest.raises(ValueError, match="in_channels must be 8"):
        TinyFlowModel(config)
