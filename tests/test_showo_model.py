"""ShowoModel and MagvitV2: the authors' step reproduced from golden values, the masks, sampling, save/load."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from reca_hf.models.showo import MagvitV2, MagvitV2Config, ShowoConfig, ShowoModel
from reca_hf.models.showo import prompting as P
from reca_hf.models.showo.tiny import build_tiny_showo, build_tiny_showo_clip

GOLDEN = Path(__file__).parent / "golden"


def _golden(name: str) -> dict:
    return json.loads((GOLDEN / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_showo(seed=0)


def _pixels():
    """The harness' inputs (see the golden notes): recon and image-to-text pixels in [-1, 1]."""
    g = torch.Generator().manual_seed(1234)
    recon = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    mmu = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    return recon, mmu


def _allowed(mask: torch.Tensor) -> list[list[str]]:
    return [["".join("1" if v else "0" for v in row) for row in sample] for sample in (mask[:, 0] == 0).tolist()]


def test_magvit_codes_and_pixels_match_the_authors(tiny):
    model, _ = tiny
    golden = _golden("showo_magvit")
    recon, _ = _pixels()
    codes = model.vq_model.encode(recon)
    assert codes.tolist() == golden["codes"]
    condition = F.interpolate(recon, size=(32, 32), mode="bilinear", align_corners=False)
    assert model.vq_model.encode(condition).tolist() == golden["condition_codes"]
    with torch.no_grad():
        decoded = model.vq_model.decode(codes)[:, :, ::8, ::8].flatten()
    torch.testing.assert_close(decoded, torch.tensor(golden["decoded_every_8th"]), rtol=0, atol=1e-5)


def test_lookup_free_codes_read_channel_zero_as_the_most_significant_bit():
    quantizer = MagvitV2(
        MagvitV2Config(
            ch=32,
            encoder_ch_mult=[1],
            decoder_ch_mult=[1],
            encoder_num_res_blocks=[1],
            decoder_num_res_blocks=[1],
            z_channels=4,
        )
    ).quantize
    latents = torch.tensor([0.5, -1.0, 0.0, 2.0]).view(1, 4, 1, 1)  # bits 1, 0, 0 (zero counts as 0), 1
    assert quantizer.codes(latents).tolist() == [[0b1001]]
    assert quantizer.latents(torch.tensor([[0b1001]])).flatten().tolist() == [1.0, -1.0, -1.0, 1.0]


def test_recon_step_matches_the_authors(tiny):
    """Sequence, 4-D masks, masked positions, logits, both losses and every gradient of the authors' VQ RecA step."""
    model, tokenizer = tiny
    golden = _golden("showo_recon_step")
    config = model.config
    n = config.num_vq_tokens
    recon, mmu_pixels = _pixels()
    target = model.image_ids(recon)
    condition = model.image_ids(F.interpolate(recon, size=(32, 32), mode="bilinear", align_corners=False))
    ids, labels, mask_prob = P.mask_image_tokens(
        target, config.mask_token_id, generator=torch.Generator().manual_seed(golden["seed"])
    )
    assert mask_prob.tolist() == pytest.approx(golden["mask_prob"], rel=1e-6)
    text = tokenizer(golden["prompt"], add_special_tokens=False)["input_ids"]
    input_ids, labels = P.recon_inputs(config, [text] * 2, condition, ids, labels)
    assert input_ids.tolist() == golden["recon_input_ids"]
    assert labels.tolist() == golden["recon_labels"]
    mask = P.recon_attention_mask(config, input_ids)
    assert _allowed(mask) == golden["recon_mask_allowed"]
    assert mask.min().item() == float(torch.iinfo(torch.int64).min)

    model.train()
    model.zero_grad()
    logits = model(input_ids, mask).logits
    loss_recon = P.recon_loss(logits, labels, n)
    target_logits = logits[:, -1 - n : -1, config.code_offset : config.code_offset + 8]
    torch.testing.assert_close(
        target_logits.flatten(), torch.tensor(golden["recon_target_logits_first_8_codes"]), rtol=0, atol=1e-5
    )
    assert logits[:, -1 - n : -1].double().abs().sum().item() == pytest.approx(
        golden["recon_target_logits_abs_sum"], rel=1e-6
    )
    assert loss_recon.item() == pytest.approx(golden["loss_recon"], rel=1e-5)

    mmu_ids, mmu_labels = P.mmu_inputs(
        config,
        model.image_ids(mmu_pixels),
        torch.tensor(golden["mmu_text_ids"]),
        torch.tensor(golden["mmu_text_labels"]),
    )
    assert mmu_ids.tolist() == golden["mmu_input_ids"]
    mmu_mask = P.mmu_attention_mask(config, mmu_ids)
    assert _allowed(mmu_mask) == golden["mmu_mask_allowed"]
    loss_mmu = P.mmu_loss(model(mmu_ids, mmu_mask).logits, mmu_labels)
    assert loss_mmu.item() == pytest.approx(golden["loss_mmu"], rel=1e-5)

    (loss_mmu + loss_recon).backward()  # the authors' step loss: 0 * t2i + mmu + recon
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert sorted(grads) == sorted(golden["grads"])
    for name, grad in grads.items():
        reference = golden["grads"][name]
        scale = 1e-4 * reference["abs_max"]
        assert grad.abs().max().item() == pytest.approx(reference["abs_max"], abs=scale), name
        torch.testing.assert_close(grad.flatten()[:4], torch.tensor(reference["first"]), rtol=0, atol=scale)
    model.eval()
    model.zero_grad()


def test_maskgit_sampling_matches_the_authors(tiny):
    model, tokenizer = tiny
    golden = _golden("showo_maskgit")
    config = model.config
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in golden["prompts"]]
    image = torch.full((2, config.num_vq_tokens), config.mask_token_id)
    cond, uncond = P.t2i_inputs(config, prompts, image), P.t2i_inputs(config, [[], []], image)
    assert cond.tolist() == golden["input_ids"] and uncond.tolist() == golden["uncond_input_ids"]
    mask = P.t2i_attention_mask(config, torch.cat([cond, uncond]))
    for steps in (1, 3):
        input_ids = cond.clone()
        codes = model.t2i_generate(
            input_ids, mask, uncond, guidance_scale=2.0, timesteps=steps, generator=torch.Generator().manual_seed(7)
        )
        assert codes.tolist() == golden[f"steps_{steps}_codes"]
        assert input_ids.tolist() == golden[f"steps_{steps}_input_ids"]
    assert codes.min() >= 0 and codes.max() < config.codebook_size
    assert model.decode_image_ids(codes).shape == (2, 3, config.image_size, config.image_size)


def test_mask_image_tokens_takes_the_draws_from_the_caller():
    ids = torch.arange(100, 116).view(1, 16).repeat(2, 1)
    timesteps = torch.tensor([0.0, 0.999])  # everything masked; cos(pi/2 * 0.999) * 16 rounds to 0 -> at least one
    noise = torch.linspace(0, 1, 16).repeat(2, 1)
    inputs, labels, _ = P.mask_image_tokens(ids, 7, timesteps=timesteps, noise=noise)
    assert (inputs[0] == 7).all() and torch.equal(labels[0], ids[0])
    assert inputs[1].tolist() == [7] + list(range(101, 116))  # the smallest noise is masked
    assert labels[1, 1:].eq(P.IGNORE_INDEX).all()


def test_recon_loss_per_row_averages_each_rows_masked_slots():
    logits = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.full((2, 6), P.IGNORE_INDEX)
    labels[0, 1], labels[1, 2:4] = 3, torch.tensor([1, 2])
    per_row = P.recon_loss(logits, labels, num_vq_tokens=4, reduction="none")
    expected = [F.cross_entropy(logits[0, 1:2], labels[0, 1:2]), F.cross_entropy(logits[1, 2:4], labels[1, 2:4])]
    torch.testing.assert_close(per_row, torch.stack(expected))
    pooled = F.cross_entropy(torch.cat([logits[0, 1:2], logits[1, 2:4]]), torch.tensor([3, 1, 2]))
    torch.testing.assert_close(P.recon_loss(logits, labels, num_vq_tokens=4), pooled)
    with pytest.raises(ValueError, match="reduction='sum'"):
        P.recon_loss(logits, labels, 4, reduction="sum")


def test_recon_mask_handles_a_text_that_fills_the_budget(tiny):
    model, _ = tiny
    config = model.config
    text = [list(range(1, config.max_seq_length))]  # bos + text + eos = max_seq_length + 1: no pads
    image = torch.full((1, config.num_vq_tokens), config.mask_token_id)
    input_ids, _ = P.recon_inputs(config, text, image[:, :4], image, image)
    assert (input_ids != config.special_token_id("[PAD]")).all()
    allowed = P.recon_attention_mask(config, input_ids)[0, 0] == 0
    assert allowed[-2].all()  # a target row sees everything
    assert allowed.any(dim=1).all()


def test_save_and_load_round_trip(tiny, tmp_path):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()  # model_type "showo" is registered with the Auto classes
    assert isinstance(loaded, ShowoModel)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert loaded.config.llm_config.qk_layernorm and loaded.config.vocab_size == model.config.vocab_size
    vq_dir = tmp_path / "magvit"
    model.vq_model.save_pretrained(vq_dir)
    magvit = AutoModel.from_pretrained(vq_dir)
    assert isinstance(magvit, MagvitV2)
    recon, _ = _pixels()
    assert torch.equal(magvit.encode(recon), model.vq_model.encode(recon))


def test_clip_variant_features_projection_and_mask(tmp_path):
    model, tokenizer = build_tiny_showo_clip(seed=0)
    config = model.config
    pixels = torch.rand(1, 3, 336, 336) * 2 - 1
    features = model.clip_features(pixels)
    assert features.shape == (1, 576, config.vision_config.hidden_size)
    text = tokenizer("USER: \n a red circle ASSISTANT:", add_special_tokens=False)["input_ids"]
    target = model.image_ids(torch.rand(1, 3, 64, 64) * 2 - 1)
    ids, labels = P.clip_recon_inputs(config, [text], target, target)
    embeds = model.embed_with_features(ids, features)
    assert embeds.shape[1] == config.clip_text_length + 576 + config.num_vq_tokens + 2
    mask = P.clip_recon_attention_mask(config, ids, 576)
    allowed = mask[0, 0] == 0
    n = config.num_vq_tokens
    assert allowed[0, 2 : 2 + 576].all()  # <|mmu|> already sees every CLIP feature
    assert allowed[-1 - n : -1, -1 - n : -1].all()  # the target codes see each other
    pads = torch.cat([ids[0, :2], torch.full((576,), -100), ids[0, 2:]]) == config.special_token_id("[PAD]")
    assert not allowed[:, pads].any()
    logits = model(inputs_embeds=embeds, attention_mask=mask).logits
    padded = torch.cat([labels[:, :2], torch.full((1, 576), P.IGNORE_INDEX), labels[:, 2:]], dim=1)
    assert torch.isfinite(P.recon_loss(logits, padded, n))
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert loaded.config.w_clip_vit and torch.equal(loaded.mm_projector[0].weight, model.mm_projector[0].weight)
    with pytest.raises(ValueError, match="shorten the prompt"):
        P.clip_recon_inputs(config, [list(range(1, 130))], target, target)


def _digest(mask: torch.Tensor) -> str:
    return hashlib.sha256((mask[:, 0] == 0).to(torch.uint8).numpy().tobytes()).hexdigest()


def test_clip_recon_step_matches_the_authors():
    """The CLIP variant's recon and image-to-text rows, masks, losses and gradients against the authors' step."""
    model, tokenizer = build_tiny_showo_clip(seed=0)
    golden = _golden("showo_clip_step")
    config = model.config
    n = config.num_vq_tokens
    recon, mmu_pixels = _pixels()

    def features(pixels):  # the authors' condition: the [-1, 1] tensor resized to 336, no CLIP normalisation
        return model.clip_features(F.interpolate(pixels, size=(336, 336), mode="bilinear", align_corners=False))

    condition = features(recon)
    torch.testing.assert_close(
        condition[:, :4, :2].flatten(), torch.tensor(golden["features_first_8"]), rtol=0, atol=1e-5
    )
    ids, labels, _ = P.mask_image_tokens(
        model.image_ids(recon), config.mask_token_id, generator=torch.Generator().manual_seed(golden["seed"])
    )
    text = tokenizer(golden["prompt"], add_special_tokens=False)["input_ids"]
    input_ids, labels = P.clip_recon_inputs(config, [text] * 2, ids, labels)
    assert input_ids.tolist() == golden["recon_ids_without_features"]
    slots = condition.shape[1]
    labels = torch.cat([labels[:, :2], torch.full((2, slots), P.IGNORE_INDEX), labels[:, 2:]], dim=1)
    assert labels.tolist() == golden["recon_labels"]
    mask = P.clip_recon_attention_mask(config, input_ids, slots)
    assert _digest(mask) == golden["recon_mask_sha256"]

    model.train()
    with torch.no_grad():  # the authors build the recon embeddings without gradient
        embeds = model.embed_with_features(input_ids, condition)
    logits = model(inputs_embeds=embeds, attention_mask=mask).logits
    torch.testing.assert_close(
        logits[:, -1 - n : -1, config.code_offset : config.code_offset + 8].flatten(),
        torch.tensor(golden["recon_target_logits_first_8_codes"]),
        rtol=0,
        atol=1e-5,
    )
    loss_recon = P.recon_loss(logits, labels, n)
    assert loss_recon.item() == pytest.approx(golden["loss_recon"], rel=1e-5)

    system = golden["system_ids"]
    mmu_ids, mmu_labels = P.clip_mmu_inputs(
        config, torch.tensor(golden["mmu_text_ids"]), torch.tensor(golden["mmu_text_labels"]), system
    )
    at = 2 + len(system)
    mmu_embeds = model.embed_with_features(mmu_ids, features(mmu_pixels), at=at)
    mmu_labels = torch.cat([mmu_labels[:, :at], torch.full((2, slots), P.IGNORE_INDEX), mmu_labels[:, at:]], dim=1)
    mmu_mask = P.clip_mmu_attention_mask(mmu_embeds.shape[1], 2, slots, len(system))
    assert _digest(mmu_mask) == golden["mmu_mask_sha256"]
    loss_mmu = P.mmu_loss(model(inputs_embeds=mmu_embeds, attention_mask=mmu_mask).logits, mmu_labels)
    assert loss_mmu.item() == pytest.approx(golden["loss_mmu"], rel=1e-5)

    (loss_mmu + loss_recon).backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert sorted(grads) == sorted(golden["grads"])  # the projector and embeddings only through image-to-text
    for name, grad in grads.items():
        reference = golden["grads"][name]
        scale = 1e-4 * reference["abs_max"]
        assert grad.abs().max().item() == pytest.approx(reference["abs_max"], abs=scale), name
        torch.testing.assert_close(grad.flatten()[:4], torch.tensor(reference["first"]), rtol=0, atol=scale)


def test_config_refuses_inconsistent_sizes():
    with pytest.raises(ValueError, match="codebook_size=4096 but vq_config has z_channels=13"):
        ShowoConfig(codebook_size=4096)
    with pytest.raises(ValueError, match="num_new_special_tokens=9"):
        ShowoConfig(num_new_special_tokens=9)
    with pytest.raises(ValueError, match="multiple of 32"):
        MagvitV2Config(ch=16)
    with pytest.raises(ValueError, match="encoder_num_res_blocks has 2"):
        MagvitV2Config(encoder_num_res_blocks=[1, 1])


def test_t2i_generate_refuses_an_unconditional_prompt_of_another_length(tiny):
    model, _ = tiny
    config = model.config
    image = torch.full((1, config.num_vq_tokens), config.mask_token_id)
    cond = P.t2i_inputs(config, [[5, 6]], image)
    uncond = cond[:, 1:]
    mask = P.t2i_attention_mask(config, cond)
    with pytest.raises(ValueError, match="pad the unconditional prompt to the same length"):
        model.t2i_generate(cond, mask, uncond, timesteps=1)


def test_the_package_exports_and_auto_classes():
    import reca_hf.models as models

    assert models.ShowoModel is ShowoModel and models.MagvitV2Config is MagvitV2Config
    assert AutoModel._model_mapping[ShowoConfig] is ShowoModel


def test_forward_refuses_a_2d_mask(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="4-D"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4))
