"""The harmon adapter: the authors' freeze, prompt layout, masking and draws, image-to-text, derived condition."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Trainer

from reca_hf import RecACollator, RecATrainer
from reca_hf.adapters import LossNoise, get_adapter
from reca_hf.freeze import apply_freeze
from reca_hf.images import resolve_views
from reca_hf.models.harmon.modeling_harmon import mask_from_orders, truncated_normal_mask_ratio
from reca_hf.testing import tiny_umm


@pytest.fixture
def harmon():
    model, tokenizer = tiny_umm("harmon")
    return model, tokenizer, get_adapter(model, tokenizer)


def _batch(adapter, shapes, n=2, **collator):
    batch = RecACollator(adapter, cond_dropout_prob=0.0, **collator)([shapes[i] for i in range(n)])
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def test_declarations_are_the_authors(harmon):
    model, _, adapter = harmon
    assert (adapter.name, adapter.parameter_sharing, adapter.condition_relation) == ("harmon", "shared", "derived")
    assert adapter.generation_target.kind == "diffusion" and adapter.null_prompt == "Generate an image."
    assert adapter.default_cond_dropout_prob == 0.1 and adapter.target_fit == "stretch"
    views = adapter.default_views()
    assert views.condition_resolution == views.generation_resolution == 64  # tiny: 2 x MAR's 32-px tables
    assert views.condition_source == "target"
    assert type(adapter).native_generation_resolution == 512
    assert adapter.generation_resolution_errors(72) and not adapter.generation_resolution_errors(48)


def test_freeze_auto_trains_everything_but_the_vae_and_the_class_embedding(harmon):
    model, _, adapter = harmon
    frozen = set(apply_freeze(model, adapter, "auto"))
    expected = {name for name, _ in model.named_parameters() if name.startswith("vae.")} | {"mar.class_emb.weight"}
    assert frozen == expected
    assert model.llm.lm_head.weight.requires_grad  # tied to the embeddings: the authors train both


def test_the_prompt_is_the_authors_layout(harmon, shapes):
    _, tokenizer, adapter = harmon
    views = adapter.default_views()
    conditions, targets = zip(*(views.views(shapes[i]["image"]) for i in range(2)))
    batch = adapter.prepare(
        list(conditions), list(targets), ["Describe the image in every detail.", "Generate an image."]
    )
    slots = adapter.image_slots(64, 64)
    assert slots == 4 * 4 + 4
    image = tokenizer.convert_tokens_to_ids("<image>")
    for row, mask in zip(batch["input_ids"], batch["attention_mask"]):
        tokens = tokenizer.convert_ids_to_tokens(row[mask.bool()].tolist())
        assert tokens[:2] == ["<|im_start|>", "user"] and tokens[2 : 2 + slots] == ["<image>"] * slots
        assert tokens[-3:] == ["<|im_end|>", "<|im_start|>", "assistant"]
        assert int((row == image).sum()) == slots
    assert batch["attention_mask"][1, -1] == 0  # the shorter prompt is padded on the right
    assert adapter.instruction_text("Describe.") == "\nDescribe."
    assert adapter.instruction_text("Generate an image.") == "Generate an image."


def test_the_loss_is_the_models_with_the_documented_draws(harmon, shapes):
    """One CPU generator gives the ratio (truncated normal), the orders, then the diffusion draws; fixed levels
    replace each sample's timesteps; the condition equal to the target is encoded once."""
    model, _, adapter = harmon
    model.eval()
    batch = _batch(adapter, shapes)
    noise = LossNoise(seed=3, timesteps=(0.25, 0.75))
    generator = noise.generator()
    ratio = truncated_normal_mask_ratio(float(torch.rand((), generator=generator)), 0.7, 0.25)
    orders = torch.stack([torch.randperm(16, generator=generator) for _ in range(2)])
    mask = mask_from_orders(orders, math.ceil(16 * ratio))
    rows = model.config.diffusion_batch_mul * 2 * 16
    _, gaussian = model.mar.diffloss.draw(rows, "cpu", generator)
    timesteps = torch.tensor([250, 750]).repeat_interleave(16).repeat(model.config.diffusion_batch_mul)
    latents = model.encode_latents(batch["target_pixel_values"])
    expected = model.reconstruction_loss(
        latents, batch["input_ids"], batch["attention_mask"], mask, timesteps=timesteps, noise=gaussian,
        reduction="none",
    )  # fmt: skip
    assert torch.equal(adapter.loss(model, batch, reduction="none", noise=noise), expected)


def test_a_fixed_mask_ratio_masks_that_share_and_training_draws_afresh(harmon, shapes):
    model, _, adapter = harmon
    mask, _ = adapter.draw_mask(model, 3, 16, LossNoise(seed=0, mask_ratio=0.5))
    assert mask.sum(1).tolist() == [8.0] * 3 and not torch.equal(mask[0], mask[1])  # one ratio, own orders
    ratios = {int(adapter.draw_mask(model, 1, 1024)[0].sum()) for _ in range(20)}
    assert min(ratios) >= math.ceil(0.7 * 1024) and len(ratios) > 1
    batch = _batch(adapter, shapes)
    torch.manual_seed(0)
    first = adapter.loss(model, batch)
    torch.manual_seed(0)
    assert torch.equal(adapter.loss(model, batch), first) and not torch.equal(adapter.loss(model, batch), first)


def test_a_half_resolution_condition_fills_fewer_slots(harmon, shapes):
    model, _, adapter = harmon
    views = resolve_views(adapter, 32)
    batch = _batch(adapter, shapes, condition_resolution=views.condition_resolution)
    assert batch["condition_pixel_values"].shape[-1] == 32
    assert int((batch["input_ids"][0] == model.config.image_token_id).sum()) == adapter.image_slots(32, 32) == 8
    noise = LossNoise(seed=0)
    assert torch.isfinite(adapter.loss(model, batch, noise=noise))
    same = _batch(adapter, shapes)
    assert not torch.equal(adapter.loss(model, batch, noise=noise), adapter.loss(model, same, noise=noise))


def test_image_to_text_scores_the_answer_and_its_end_with_the_text_head(harmon, shapes):
    model, tokenizer, adapter = harmon
    images = [adapter.default_views().square(shapes[i]["image"], 64, "pad") for i in range(2)]
    batch = adapter.prepare_image_to_text(images, ["what is it?", "describe it"], ["a red circle", "a square"])
    labelled = tokenizer.convert_ids_to_tokens(batch["labels"][0][batch["labels"][0] >= 0].tolist())
    assert labelled == ["a", "red", "circle", "<|im_end|>"]
    assert batch["attention_mask"][1, -1] == 0 and batch["labels"][1, -1] == -100  # right padding
    assert int((batch["input_ids"][0] == model.config.image_token_id).sum()) == adapter.image_slots(64, 64)
    latents = model.encode_latents(batch["condition_pixel_values"])
    expected = model.image_to_text_loss(batch["input_ids"], batch["attention_mask"], batch["labels"], latents)
    assert torch.equal(adapter.image_to_text_loss(model, batch), expected)
    assert adapter.supports("image_to_text") and not adapter.supports("text_to_image")


def test_the_optimizer_decays_what_the_authors_decay(make_args, shapes):
    """transformers' rule plus the adapter's no_weight_decay gives the authors' MAROptimWrapperConstructor set (no
    decay on 1-D tensors, biases and the diffusion head); an adapter declaring none keeps transformers' rule."""
    model, tokenizer = tiny_umm("harmon")
    trainer = RecATrainer(model, args=make_args(weight_decay=0.02, collapse_action="off"), train_dataset=shapes,
                          processing_class=tokenizer)  # fmt: skip
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    authors = {n for n in trainable if dict(model.named_parameters())[n].dim() > 1 and not n.endswith(".bias")}
    authors = {n for n in authors if "diffloss" not in n}
    assert set(trainer.get_decay_parameter_names(model)) & trainable == authors
    optimizer = trainer.create_optimizer()
    decayed = {id(p) for group in optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]}
    assert {n for n, p in model.named_parameters() if id(p) in decayed} == authors
    flow, flow_processor = tiny_umm("flow")
    plain = RecATrainer(flow, args=make_args(collapse_action="off"), train_dataset=shapes,
                        processing_class=flow_processor)  # fmt: skip
    assert plain.get_decay_parameter_names(flow) == Trainer.get_decay_parameter_names(plain, flow)
