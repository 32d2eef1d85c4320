"""Emu3 specifics: resolutions and token counts, the sequence and its labels, the loss, training, generation."""

import pytest
import torch
import torch.nn.functional as F

from reca_hf import RecACollator
from reca_hf.adapters import get_adapter
from reca_hf.images import ViewSpec
from reca_hf.testing import tiny_umm


@pytest.fixture
def emu3():
    """A fresh tiny Emu3 (seed 0), its processor and its adapter."""
    model, processor = tiny_umm("emu3")
    return model, processor, get_adapter(model, processor)


def _prepare(adapter, shapes, views, n=4):
    images = [shapes[i]["image"] for i in range(n)]
    instructions = ["Describe the image.", "", "What colour is the shape?", "Describe it."][:n]
    return adapter.prepare(
        [views.condition_view(im) for im in images], [views.target_view(im) for im in images], instructions
    )


def test_auto_resolutions_of_the_tiny_model_survive_save_and_load(emu3, tmp_path):
    model, processor, adapter = emu3
    assert adapter.resolve_resolutions("auto", "auto") == (16, 32)
    assert (adapter.min_condition_resolution, adapter.native_generation_resolution) == (32, 32)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = get_adapter(type(model).from_pretrained(tmp_path), type(processor).from_pretrained(tmp_path))
    assert reloaded.resolve_resolutions("auto", "auto") == (16, 32)
    assert get_adapter(model).resolve_resolutions("auto", "auto") == (16, 32)  # no processor: from the config


def test_emu3_gen_sized_config_fits_its_positions():
    from transformers import Emu3Config

    config = Emu3Config(text_config={"max_position_embeddings": 9216}, vocabulary_map={"<image>": 0})
    adapter = get_adapter(config)
    # 720 px is 90 rows of 90 ids and a row end (8190 positions): the condition gets what is left.
    assert adapter.resolve_resolutions("auto", "auto") == (232, 720)
    with pytest.raises(ValueError, match=r"10388 positions.*max_position_embeddings.*at most 232"):
        adapter.resolve_resolutions(360, "auto")


def test_resolution_errors_name_the_fix(emu3):
    _, _, adapter = emu3
    with pytest.raises(ValueError, match=r"condition_resolution=20: .*multiple of 8"):
        adapter.resolve_resolutions(20, "auto")
    with pytest.raises(ValueError, match=r"generation_resolution=1024: .*16512 tokens.*512 positions"):
        adapter.resolve_resolutions("auto", 1024)
    assert adapter.round_condition_resolution(23) == 16


def test_condition_token_count_and_layout(emu3, shapes):
    _, processor, adapter = emu3
    low = _prepare(adapter, shapes, ViewSpec(16, 32))
    high = _prepare(adapter, shapes, ViewSpec(32, 32, "none"))
    # 2x2 ids + a row end per row = 6 slots at 16 px; 4x4 + 4 = 20 at 32 px, as many as the target.
    assert low["condition_mask"].sum(-1).tolist() == [6] * 4 and high["condition_mask"].sum(-1).tolist() == [20] * 4
    assert low["target_mask"].sum(-1).tolist() == [20] * 4
    assert low["condition_pixel_values"].shape == (4, 3, 16, 16) and low["target_pixel_values"].shape == (4, 3, 32, 32)
    tokens = processor.tokenizer.convert_ids_to_tokens(low["input_ids"][0][low["attention_mask"][0].bool()])
    text = " ".join(tokens)
    condition = "<|image start|> 2 * 2 <|image token|> " + "<image> " * 6 + "<|extra_201|> <|image end|>"
    assert text.startswith("<|extra_203|> user : " + condition + " describe the image .")
    assert text.endswith("assistant : <|image start|> 4 * 4 <|image token|> " + " ".join(["<image>"] * 20))


def test_blur_keeps_the_condition_token_count(emu3, shapes):
    _, _, adapter = emu3
    blurred = _prepare(adapter, shapes, ViewSpec(32, 32, "blur", blur_factor=4))
    plain = _prepare(adapter, shapes, ViewSpec(32, 32, "none"))
    assert torch.equal(blurred["condition_mask"].sum(-1), plain["condition_mask"].sum(-1))
    assert not torch.equal(blurred["condition_pixel_values"], plain["condition_pixel_values"])


def test_labels_cover_exactly_the_target_ids_and_row_ends(emu3, shapes):
    model, _, adapter = emu3
    batch = _prepare(adapter, shapes, adapter.default_views())
    inputs = adapter.model_inputs(model, batch)
    labelled = inputs["labels"] != -100
    assert torch.equal(labelled, batch["target_mask"])
    expected = model.model.get_image_tokens(batch["target_pixel_values"], [(32, 32)] * 4).long().view(4, -1)
    assert torch.equal(inputs["labels"][labelled].view(4, -1), expected)
    row_ends = inputs["labels"][labelled].view(4, 4, 5)[..., -1]
    assert (row_ends == model.vocabulary_mapping.eol_token_id).all()
    condition = model.model.get_image_tokens(batch["condition_pixel_values"], [(16, 16)] * 4).long().view(4, -1)
    assert torch.equal(inputs["input_ids"][batch["condition_mask"]].view(4, -1), condition)


def test_loss_is_emu3s_own_and_a_cross_entropy_over_the_target(emu3, shapes):
    model, _, adapter = emu3
    batch = _prepare(adapter, shapes, adapter.default_views())
    loss = adapter.loss(model, batch)
    inputs = adapter.model_inputs(model, batch)
    assert torch.allclose(model(**inputs).loss, loss, atol=1e-6)
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    predicts_target = batch["target_mask"][:, 1:]  # the position before each target token predicts it
    by_hand = F.cross_entropy(logits[:, :-1][predicts_target], inputs["input_ids"][:, 1:][predicts_target])
    assert torch.allclose(by_hand, loss, atol=1e-6)


def test_target_logits_are_over_the_codebook_at_the_vq_ids(emu3, shapes):
    model, _, adapter = emu3
    batch = _prepare(adapter, shapes, adapter.default_views())
    logits, codes = adapter.target_logits(model, batch)
    assert logits.shape == (4, 16, 64) and torch.equal(
        codes, adapter.image_codes(model, batch["target_pixel_values"]).flatten(1)
    )
    assert adapter.codebook_size == 64


def test_training_lowers_the_loss_and_leaves_the_vq_statistics_alone(emu3, shapes):
    model, _, adapter = emu3
    collator = RecACollator(adapter, cond_dropout_prob=0.0)
    batch = {k: v for k, v in collator([shapes[i] for i in range(4)]).items() if isinstance(v, torch.Tensor)}
    vq_buffers = {name: b.clone() for name, b in model.model.vqmodel.named_buffers()}
    model.train()
    optimizer = torch.optim.AdamW([p for n, p in model.named_parameters() if "vqmodel" not in n], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = adapter.loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    # The Trainer's model.train() switches the VQ's BatchNorm to training; encoding must not update it.
    assert model.model.vqmodel.training
    assert all(torch.equal(b, vq_buffers[name]) for name, b in model.model.vqmodel.named_buffers())


def test_reconstruct_and_round_trip_sizes(emu3, shapes):
    model, _, adapter = emu3
    images = [shapes[0]["image"], shapes[1]["image"]]
    guided = adapter.reconstruct(images, seed=0)
    assert [im.size for im in guided] == [(32, 32)] * 2
    assert [im.tobytes() for im in adapter.reconstruct(images, seed=0)] == [im.tobytes() for im in guided]
    # 16 px in and out (blurred): the tiny VQ's 32 channels in 32 GroupNorm groups need 2x2 ids at least.
    greedy = adapter.reconstruct(images[:1], views=ViewSpec(16, 16, "blur"), guidance_scale=1.0, do_sample=False)
    assert greedy[0].size == (16, 16)
    assert [im.size for im in adapter.round_trip(images)] == [(32, 32)] * 2
    assert not model.training


def test_prepare_refuses_sizes_the_vq_cannot_tokenize(emu3, shapes):
    _, _, adapter = emu3
    with pytest.raises(ValueError, match=r"condition images of 20x20 px: .*multiple of 8"):
        _prepare(adapter, shapes, ViewSpec(20, 32))
    with pytest.raises(ValueError, match=r"target images of 36x36 px: .*multiple of 8"):
        _prepare(adapter, shapes, ViewSpec(16, 36))
