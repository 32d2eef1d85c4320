"""HarmonModel: save/load, the authors' initialisation, the diffusion loss's draws, masks, sampling, the converter."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModel

from reca_hf.cli import main as reca
from reca_hf.conversion import CheckpointMismatchError
from reca_hf.models.harmon import HarmonConfig, HarmonModel
from reca_hf.models.harmon.convert import (
    KL16_KEY_MAP,
    authors_state_dicts,
    convert_harmon_checkpoint,
    harmon_config_from_checkpoint,
    vae_config_from_checkpoint,
)
from reca_hf.models.harmon.modeling_harmon import mask_from_orders, truncated_normal_mask_ratio
from reca_hf.models.harmon.tiny import TINY_IMAGE_SIZE, build_tiny_harmon


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_harmon(seed=0)


def _batch(model, tokenizer, size: int = 2):
    g = torch.Generator().manual_seed(7)
    pixels = torch.rand(size, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=g) * 2 - 1
    latents = model.encode_latents(pixels)
    slots = model.image_slots(*latents.shape[1:3])
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image> " * slots + "a red circle"}], add_generation_prompt=True, tokenize=False
    )
    encoded = tokenizer([text] * size, return_tensors="pt")
    orders = torch.stack([torch.randperm(16, generator=g) for _ in range(size)])
    return latents, encoded.input_ids, encoded.attention_mask, mask_from_orders(orders, 12)


def _prompt(tokenizer, text: str):
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer([chat], return_tensors="pt")


def test_save_load_round_trip_gives_identical_outputs(tiny, tmp_path):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = AutoModel.from_pretrained(tmp_path).eval()  # model_type "harmon" is registered with the Auto classes
    assert isinstance(loaded, HarmonModel)
    latents, ids, attention, mask = _batch(model, tokenizer)
    with torch.no_grad():
        before = model.reconstruction_loss(latents, ids, attention, mask, generator=torch.Generator().manual_seed(3))
        after = loaded.reconstruction_loss(latents, ids, attention, mask, generator=torch.Generator().manual_seed(3))
    assert torch.equal(before, after)
    assert loaded.config.vae_config == model.config.vae_config


def test_new_parts_get_the_authors_initialisation():
    model, _ = build_tiny_harmon(seed=0)
    fresh = HarmonModel(model.config)
    net = fresh.mar.diffloss.net
    for linear in (
        net.final_layer.linear,
        net.final_layer.adaLN_modulation[-1],
        net.res_blocks[0].adaLN_modulation[-1],
    ):
        assert not linear.weight.any() and not linear.bias.any()
    assert not fresh.mar.encoder_blocks[0].attn.qkv.bias.any()  # xavier weights, zero biases
    assert abs(fresh.mar.encoder_pos_embed_learned.std().item() - 0.02) < 0.005
    bound = 1 / math.sqrt(32)  # PyTorch's default Linear init for proj_in
    assert 0.9 * bound < fresh.proj_in[0].weight.abs().max() <= bound


def test_the_vae_is_frozen_and_stays_in_eval_mode(tiny):
    model, _ = tiny
    model.train()
    assert model.mar.training and not any(m.training for m in model.vae.modules())
    assert not any(p.requires_grad for p in model.vae.parameters())
    model.eval()


def test_latents_are_the_scaled_posterior_mode_and_decode_back(tiny):
    model, _ = tiny
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    latents = model.encode_latents(pixels)
    mode = model.vae.encode(pixels).latent_dist.mode()
    assert latents.shape == (1, 4, 4, 16)
    torch.testing.assert_close(latents, (mode * 0.2325).permute(0, 2, 3, 1))
    assert model.decode_latents(latents).shape == (1, 3, 64, 64)


def test_diffusion_loss_draws_timesteps_then_noise_and_takes_them_from_the_caller(tiny):
    model, tokenizer = tiny
    latents, ids, attention, mask = _batch(model, tokenizer)
    with torch.no_grad():
        drawn = model.reconstruction_loss(latents, ids, attention, mask, generator=torch.Generator().manual_seed(5))
        g = torch.Generator().manual_seed(5)
        rows = model.config.diffusion_batch_mul * 2 * 16
        timesteps = torch.randint(0, 1000, (rows,), generator=g)
        noise = torch.randn(rows, 16, generator=g)
        given = model.reconstruction_loss(latents, ids, attention, mask, timesteps=timesteps, noise=noise)
        per_sample = model.reconstruction_loss(
            latents, ids, attention, mask, timesteps=timesteps, noise=noise, reduction="none"
        )
    assert torch.equal(drawn, given)
    torch.testing.assert_close(per_sample.mean(), given)  # equal masked counts: the token mean is the sample mean
    with pytest.raises(ValueError, match=r"must be \(64,\)"):
        model.reconstruction_loss(latents, ids, attention, mask, timesteps=timesteps[:3], noise=noise)


def test_mask_ratio_is_the_authors_truncated_normal():
    assert truncated_normal_mask_ratio(0.0) == pytest.approx(0.7)
    assert truncated_normal_mask_ratio(1.0) == pytest.approx(1.0)
    ratios = [truncated_normal_mask_ratio(u / 10) for u in range(11)]
    assert ratios == sorted(ratios)
    stats = pytest.importorskip("scipy.stats")
    authors = stats.truncnorm((0.7 - 1.0) / 0.25, 0, loc=1.0, scale=0.25)
    assert truncated_normal_mask_ratio(0.3) == pytest.approx(authors.ppf(0.3), rel=1e-9)


def test_the_encoder_refuses_rows_with_different_mask_counts(tiny):
    model, _ = tiny
    latents = torch.zeros(2, 4, 4, 16)
    mask = torch.zeros(2, 16)
    mask[0, :3] = 1
    with pytest.raises(ValueError, match=r"visible .* per row; every row must mask the same number"):
        model.visual_features(latents, mask)


def test_embed_prompt_refuses_a_feature_count_that_misses_the_slots(tiny):
    model, tokenizer = tiny
    latents, ids, _, _ = _batch(model, tokenizer)
    _, features = model.visual_features(latents)
    with pytest.raises(ValueError, match="image tokens .* put image_slots"):
        model.embed_prompt(ids, features[:, :-1])


def test_gradient_checkpointing_gives_the_same_gradients():
    model, tokenizer = build_tiny_harmon(seed=0)
    latents, ids, attention, mask = _batch(model, tokenizer)
    grads = []
    for checkpointing in (False, True):
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.mar.encoder_blocks[0].gradient_checkpointing
        model.zero_grad()
        model.reconstruction_loss(latents, ids, attention, mask, generator=torch.Generator().manual_seed(1)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)
    model.activation_checkpointing_disable()


def test_generate_makes_images_with_the_mar_schedule(tiny):
    model, tokenizer = tiny
    prompt = _prompt(tokenizer, "generate an image : a red circle")
    null = _prompt(tokenizer, "generate an image .")
    kwargs = {"height": 64, "num_iter": 4, "cfg": 3.0, "temperature": 0.9}
    first = model.generate(prompt.input_ids, prompt.attention_mask, null.input_ids, null.attention_mask,
                           generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs)  # fmt: skip
    again = model.generate(prompt.input_ids, prompt.attention_mask, null.input_ids, null.attention_mask,
                           generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs)  # fmt: skip
    assert first.shape == (1, 3, 64, 64) and torch.isfinite(first).all()
    assert torch.equal(first, again)
    images = model.generate(prompt.input_ids, prompt.attention_mask, height=64, num_iter=2, cfg=1.0)
    assert images[0].size == (64, 64)
    with pytest.raises(ValueError, match="needs negative_input_ids"):
        model.generate(prompt.input_ids, prompt.attention_mask, cfg=3.0)


def test_kl16_key_map_files_the_encoder_attention_as_attention():
    mapped = KL16_KEY_MAP.map(
        {
            "encoder.down.4.attn.1.proj_out.weight": torch.zeros(8, 8, 1, 1),
            "encoder.down.4.attn.0.norm.bias": torch.zeros(8),
            "decoder.up.0.block.2.nin_shortcut.weight": torch.zeros(8, 8, 1, 1),
            "decoder.up.4.upsample.conv.bias": torch.zeros(8),
            "loss.discriminator.main.0.weight": torch.zeros(1),
        }
    )
    assert mapped.tensors["vae.encoder.down_blocks.4.attentions.1.to_out.0.weight"].shape == (8, 8)
    assert "vae.encoder.down_blocks.4.attentions.0.group_norm.bias" in mapped.tensors
    assert mapped.tensors["vae.decoder.up_blocks.4.resnets.2.conv_shortcut.weight"].shape == (8, 8, 1, 1)
    assert "vae.decoder.up_blocks.0.upsamplers.0.conv.bias" in mapped.tensors
    assert mapped.skipped == ["loss.discriminator.main.0.weight"] and not mapped.unknown


@pytest.fixture(scope="module")
def released(tiny, tmp_path_factory):
    """The tiny model as the authors publish it: a .pth, a kl16.ckpt, and a Qwen folder (config and tokenizer)."""
    model, tokenizer = tiny
    folder = tmp_path_factory.mktemp("released")
    pth, kl16 = authors_state_dicts(model)
    torch.save(pth, folder / "harmon_tiny.pth")
    torch.save({"model": kl16}, folder / "kl16.ckpt")
    model.llm.config.save_pretrained(folder / "qwen")
    tokenizer.save_pretrained(folder / "qwen")
    return folder, pth, kl16


def test_reca_convert_harmon_rebuilds_the_model(tiny, released, tmp_path):
    model, _ = tiny
    folder, _, _ = released
    args = ["convert", "harmon", str(folder / "harmon_tiny.pth"), str(tmp_path / "out"), "--vae"]
    reca([*args, str(folder / "kl16.ckpt"), "--llm", str(folder / "qwen"), "--mar-heads", "2"])
    converted = AutoModel.from_pretrained(tmp_path / "out")
    expected = model.state_dict()
    assert converted.state_dict().keys() == expected.keys()
    assert all(torch.equal(converted.state_dict()[k], v) for k, v in expected.items())
    assert converted.config.image_token_id == model.config.image_token_id
    assert (tmp_path / "out" / "tokenizer.json").exists()


def test_the_converter_names_every_problem_of_both_files_at_once(released, tmp_path):
    folder, pth, kl16 = released
    pth = dict(pth)
    del pth["mar.z_proj_ln.weight"]
    pth["mar.unused"] = torch.zeros(1)
    pth["proj_out.2.weight"] = torch.zeros(5, 5)
    kl16 = dict(kl16)
    kl16["encoder.down.4.attn.0.q.weight"] = torch.zeros(7, 7, 1, 1)
    kl16["encoder.mystery"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as error:
        convert_harmon_checkpoint(pth, kl16, tmp_path / "out", llm=str(folder / "qwen"), mar_heads=2)
    message = str(error.value)
    for fragment in ("mar.unused", "kl16.ckpt:encoder.mystery", "mar.z_proj_ln.weight", "proj_out.2.weight",
                     "vae.encoder.down_blocks.4.attentions.0.to_q.weight"):  # fmt: skip
        assert fragment in message
    assert not (tmp_path / "out").exists()


def test_a_pth_holding_the_vae_converts_alone_and_refuses_a_second_copy(tiny, released, tmp_path):
    model, _ = tiny
    folder, pth, kl16 = released
    combined = pth | {f"vae.{k}": v for k, v in kl16.items()}
    converted = convert_harmon_checkpoint(combined, None, tmp_path / "a", llm=str(folder / "qwen"), mar_heads=2)
    assert torch.equal(converted.vae.decoder.conv_out.weight, model.vae.decoder.conv_out.weight)
    with pytest.raises(CheckpointMismatchError, match="mapped from several checkpoint keys"):
        convert_harmon_checkpoint(combined, kl16, tmp_path / "b", llm=str(folder / "qwen"), mar_heads=2)


@pytest.mark.parametrize("size", ["harmon_0_5b", "harmon_1_5b"])
def test_the_real_configurations_are_read_back_from_their_shapes(size):
    config = getattr(HarmonConfig, size)()
    with torch.device("meta"):
        model = HarmonModel(config)
    pth, kl16 = authors_state_dicts(model)
    vae_config = vae_config_from_checkpoint(kl16)
    read = harmon_config_from_checkpoint(pth, vae_config)
    assert vae_config["block_out_channels"] == [128, 128, 256, 256, 512]
    assert vae_config["down_block_types"][-1] == "AttnDownEncoderBlock2D"
    fields = ("encoder_embed_dim", "encoder_depth", "encoder_num_heads", "decoder_depth", "buffer_size", "img_size",
              "diffloss_d", "diffloss_w", "mlp_ratio", "class_num")  # fmt: skip
    assert {f: getattr(read, f) for f in fields} == {f: getattr(config, f) for f in fields}
    assert read.llm_config.num_hidden_layers == config.llm_config.num_hidden_layers


def test_a_tied_lm_head_may_be_absent_but_not_different(tiny, released, tmp_path):
    model, _ = tiny
    folder, pth, kl16 = released
    without = {k: v for k, v in pth.items() if k != "llm.lm_head.weight"}
    converted = convert_harmon_checkpoint(without, kl16, tmp_path / "a", llm=str(folder / "qwen"), mar_heads=2)
    assert torch.equal(converted.llm.lm_head.weight, model.llm.get_input_embeddings().weight)
    different = pth | {"llm.lm_head.weight": pth["llm.lm_head.weight"] + 1}
    with pytest.raises(CheckpointMismatchError, match="ties llm.lm_head.weight .* tie_word_embeddings false"):
        convert_harmon_checkpoint(different, kl16, tmp_path / "b", llm=str(folder / "qwen"), mar_heads=2)
