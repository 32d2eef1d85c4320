"""BagelModel: the authors' step on golden values, the sequence layout, save/load, checkpointing, the converter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModel

from reca_hf.cli import main as reca
from reca_hf.conversion import CheckpointMismatchError
from reca_hf.models.bagel import BagelConfig, BagelModel
from reca_hf.models.bagel.convert import convert_bagel_folder, map_checkpoint, patch_linear_to_conv
from reca_hf.models.bagel.tiny import build_tiny_bagel

GOLDEN = json.loads((Path(__file__).parent / "golden" / "bagel_flow_step.json").read_text())
TRAINABLE = ("vae2llm", "llm2vae", "time_embedder")  # and every *_moe_gen tensor: the RecA trainable set


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_bagel(seed=0)


def _parity_inputs(tokenizer):
    """The inputs and draws of the parity run (see the golden file's note)."""
    g = torch.Generator().manual_seed(7)
    conds = [torch.rand(3, 28, 42, generator=g) * 2 - 1, torch.rand(3, 42, 28, generator=g) * 2 - 1]
    targets = [torch.rand(3, 16, 24, generator=g) * 2 - 1, torch.rand(3, 32, 16, generator=g) * 2 - 1]
    prompts = [tokenizer("reconstruct the image").input_ids, tokenizer("a photo of a red circle on the left").input_ids]
    d = torch.Generator().manual_seed(11)
    posterior = torch.randn(2, 4, 16, 12, generator=d)
    logits = torch.randn(2, generator=d)
    flow = torch.randn(56, 16, generator=d)
    return conds, targets, prompts, posterior, logits, flow


def _sampling_draws():
    """The context image's posterior noise and the initial noise of the sampling run (see the golden note)."""
    e = torch.Generator().manual_seed(13)
    return torch.randn(1, 4, 8, 12, generator=e), torch.randn(24, 16, generator=e)


def _contexts(model, tokenizer):
    """The authors' [image, text] contexts: image (VAE, then ViT) + prompt; images only; prompt only."""
    conds, targets, prompts, *_ = _parity_inputs(tokenizer)
    posterior, _ = _sampling_draws()
    context = model.extend_context(model.new_context(), vae_image=targets[0], posterior_noise=posterior)
    context = model.extend_context(context, vit_image=conds[0])
    with_prompt = model.extend_context(context, text_ids=prompts[0])
    prompt_only = model.extend_context(model.new_context(), text_ids=prompts[0])
    return with_prompt, context, prompt_only


def _recA_trainable(model: BagelModel) -> None:
    model.requires_grad_(False)
    for name, parameter in model.named_parameters():
        if "moe_gen" in name or name.split(".")[0] in TRAINABLE:
            parameter.requires_grad_(True)


def _step(model, tokenizer, drop_text: bool = False, freeze_und: bool = True):
    conds, targets, prompts, posterior, logits, flow = _parity_inputs(tokenizer)
    if drop_text:
        prompts[1] = None
    model.config.freeze_und = freeze_und
    vit = model.vit_embeddings(conds)
    latents = model.encode_latents(targets, noise=posterior)
    out = model.flow_loss(prompts, conds, latents, timestep_logits=logits, noise=flow)
    return vit, out


@pytest.mark.parametrize("case", ["full", "text_dropped"])
def test_the_authors_step_on_the_tiny_model(case):
    """Golden values from the authors' code on these weights: features, states, prediction, loss and gradients."""
    golden = GOLDEN[case]
    model, tokenizer = build_tiny_bagel(seed=0)
    model.train()
    _recA_trainable(model)
    vit, out = _step(model, tokenizer, drop_text=case == "text_dropped")
    out.loss.backward()
    close = dict(rtol=1e-5, atol=1e-6)
    assert out.loss.item() == pytest.approx(golden["loss"], rel=1e-5)
    torch.testing.assert_close(out.token_losses, torch.tensor(golden["token_losses"]), **close)
    torch.testing.assert_close(torch.cat(vit).sum(-1), torch.tensor(golden["vit_embeds_sum_per_token"]), **close)
    torch.testing.assert_close(out.hidden_states.norm(dim=-1), torch.tensor(golden["hidden_norm_per_token"]), **close)
    torch.testing.assert_close(out.prediction.norm(dim=-1), torch.tensor(golden["prediction_norm_per_token"]), **close)
    grads = {name: p.grad.norm().item() for name, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == golden["grad_norms"].keys()
    for name, expected in golden["grad_norms"].items():
        assert grads[name] == pytest.approx(expected, rel=1e-4), name


@pytest.mark.parametrize("renorm", ["global", "channel", "text_channel"])
def test_cfg_sampling_matches_the_authors(tiny, renorm):
    """Three Euler steps of the authors' sampler with text and image guidance, one outside the CFG interval."""
    model, tokenizer = tiny
    context, cfg_text_context, cfg_img_context = _contexts(model, tokenizer)
    assert (context.rope, cfg_text_context.rope, cfg_img_context.rope) == (7, 2, 5)
    latent = model.generate_latents(
        context, (4, 6), cfg_text_context=cfg_text_context, cfg_img_context=cfg_img_context, num_timesteps=4,
        timestep_shift=3.0, cfg_text_scale=4.0, cfg_img_scale=1.5, cfg_interval=(0.7, 1.0), cfg_renorm_min=0.0,
        cfg_renorm_type=renorm, noise=_sampling_draws()[1],
    )  # fmt: skip
    expected = torch.tensor(GOLDEN["cfg_sampling"][renorm])
    torch.testing.assert_close(model.patchify(latent), expected, rtol=1e-5, atol=1e-5)


def test_the_cached_velocity_equals_the_training_forward(tiny):
    """The KV-cached inference path and the padded training path give the same prediction for one layout."""
    model, tokenizer = tiny
    conds, _, prompts, *_ = _parity_inputs(tokenizer)
    context = model.extend_context(model.new_context(), vit_image=conds[0])
    context = model.extend_context(context, text_ids=prompts[0])
    x_t = torch.randn(24, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cached = model.velocity(context, x_t, 0.3, (4, 6))
        batch = model.pack_sequences([prompts[0]], [(2, 3)], [(4, 6)])
        embeds = model.latent_embeds(x_t, torch.full((24,), 0.3), [(4, 6)])
        states = model.language_states(
            batch["input_ids"], batch["gen_mask"], batch["position_ids"], batch["attention_mask"],
            vit_mask=batch["vit_mask"], vit_embeds=model.vit_embeddings(conds[:1]), latent_embeds=embeds,
        )  # fmt: skip
        full = model.llm2vae(states[batch["gen_mask"]])
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-6)


def test_generate_makes_an_image_and_needs_its_guidance_contexts(tiny):
    model, tokenizer = tiny
    conds, targets, prompts, *_ = _parity_inputs(tokenizer)
    image = model.generate(
        prompts[0], height=16, width=24, vit_image=conds[0], vae_image=targets[0], num_timesteps=3,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    assert image.shape == (3, 16, 24) and torch.isfinite(image).all()
    with pytest.raises(ValueError, match="cfg_text_scale=4.0 needs cfg_text_context"):
        model.generate_latents(model.new_context(), (2, 2), cfg_img_scale=1.0)
    with pytest.raises(ValueError, match="multiples of 4"):
        model.generate(prompts[0], height=18, width=24)


def test_freeze_und_cuts_the_gradient_through_the_special_tokens_of_the_vae_split(tiny):
    """Without the authors' freeze_und the first layer's generation expert gets another gradient: the two special
    tokens inside the VAE split (understanding tokens) carry one back from the next layer."""
    model, tokenizer = build_tiny_bagel(seed=0)
    model.train()
    grads = {}
    for freeze in (True, False):
        model.zero_grad()
        _step(model, tokenizer, freeze_und=freeze)[1].loss.backward()
        grads[freeze] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    first = "language_model.model.layers.0.self_attn.v_proj_moe_gen.bias"
    last = "language_model.model.layers.1.mlp_moe_gen.down_proj.weight"
    assert not torch.allclose(grads[True][first], grads[False][first], rtol=1e-3)
    torch.testing.assert_close(grads[True][last], grads[False][last])
    assert "language_model.model.layers.0.self_attn.q_proj.weight" not in grads[True]
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in grads[False]


def test_pack_sequences_writes_the_authors_layout(tiny):
    model, _ = tiny
    config = model.config
    batch = model.pack_sequences([[5, 6, 7], None], [(2, 3), (3, 2)], [(2, 3), (4, 2)])
    vs, ve, ims, ime = (config.vision_start_token_id, config.vision_end_token_id, config.im_start_token_id,
                        config.im_end_token_id)  # fmt: skip
    # sample 0: [vs vit*6 ve] [ims 5 6 7 ime] [vs vae*6 ve]; sample 1 (text dropped): [vs vit*6 ve] [vs vae*8 ve]
    assert batch["input_ids"][0].tolist() == [vs, *[0] * 6, ve, ims, 5, 6, 7, ime, vs, *[0] * 6, ve]
    assert batch["input_ids"][1, :18].tolist() == [vs, *[0] * 6, ve, vs, *[0] * 8, ve]
    assert batch["lengths"].tolist() == [21, 18]
    # RoPE: one id for the ViT split, counting through the text, one id for the VAE split; a dropped text adds none
    assert batch["position_ids"][0].tolist() == [0] * 8 + [1, 2, 3, 4, 5] + [6] * 8
    assert batch["position_ids"][1, :18].tolist() == [0] * 8 + [1] * 10
    # routing: only the VAE slots go to the generation expert, the special tokens around them do not
    assert batch["gen_mask"][0].tolist() == [False] * 14 + [True] * 6 + [False]
    assert batch["vit_mask"][0].tolist() == [False] + [True] * 6 + [False] * 14
    allowed = batch["attention_mask"][:, 0] == 0
    a = allowed[0]
    assert a[:8, :8].all() and not a[:8, 8:].any()  # the ViT split: full, sees nothing later
    assert a[8:13, :8].all() and torch.equal(a[8:13, 8:13], torch.ones(5, 5, dtype=torch.bool).tril())
    assert a[13:, :].all()  # the VAE split: sees everything before and all of itself
    assert not a[:13, 13:].any()  # ... and is seen by nobody else
    assert allowed[1, 18:, :18].sum() == 0 and allowed[1, 18:, 18:].equal(torch.eye(3, dtype=torch.bool))


def test_reductions_and_the_timestep_shift(tiny):
    model, tokenizer = tiny
    conds, targets, prompts, posterior, logits, flow = _parity_inputs(tokenizer)
    latents = model.encode_latents(targets, noise=posterior)
    kwargs = dict(timestep_logits=logits, noise=flow)
    with torch.no_grad():
        mean = model.flow_loss(prompts, conds, latents, **kwargs)
        per_sample = model.flow_loss(prompts, conds, latents, reduction="none", **kwargs).loss
        total = model.flow_loss(prompts, conds, latents, reduction="sum", **kwargs).loss
    counts = mean.tokens_per_sample.float()
    assert counts.tolist() == [24, 32]
    torch.testing.assert_close(total / counts.sum(), mean.loss)
    torch.testing.assert_close((per_sample * counts).sum() / counts.sum(), mean.loss)  # token-weighted, not per sample
    t = torch.sigmoid(logits)
    torch.testing.assert_close(model.timesteps_from_logits(logits), t)
    model.config.timestep_shift = 3.0
    torch.testing.assert_close(model.timesteps_from_logits(logits), 3 * t / (1 + 2 * t))
    model.config.timestep_shift = 1.0
    with pytest.raises(ValueError, match="VAE token slots"):
        model(**model.pack_sequences([None], [None], [(2, 2)]),
              latents=latents[:1])  # fmt: skip


def test_draws_come_from_the_generator(tiny):
    model, tokenizer = tiny
    conds, targets, prompts, *_ = _parity_inputs(tokenizer)
    with torch.no_grad():
        runs = []
        for _ in range(2):
            latents = model.encode_latents(targets, generator=torch.Generator().manual_seed(3))
            out = model.flow_loss(prompts, conds, latents, generator=torch.Generator().manual_seed(4))
            runs.append(out.loss)
    assert torch.equal(runs[0], runs[1])


def test_vae_targets_are_encoded_as_a_padded_pack(tiny):
    """As the authors: the pack's images are padded to the largest, encoded together, then cropped; alone, an
    image gets another latent."""
    model, tokenizer = tiny
    _, targets, *_ = _parity_inputs(tokenizer)
    noise = torch.zeros(2, 4, 16, 12)
    packed = model.encode_latents(targets, noise=noise)
    assert [tuple(z.shape) for z in packed] == [(4, 8, 12), (4, 16, 8)]
    alone = model.encode_latents(targets[:1], noise=noise[:1, :, :8, :12])
    assert not torch.allclose(packed[0], alone[0], atol=1e-4)
    tokens = model.patchify(packed[1])
    assert tokens.shape == (32, 16)
    torch.testing.assert_close(model.unpatchify(tokens, (8, 4)), packed[1])


def test_save_load_round_trip_gives_identical_outputs(tiny, tmp_path):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = AutoModel.from_pretrained(tmp_path).eval()  # model_type "bagel" is registered with the Auto classes
    assert isinstance(loaded, BagelModel)
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(loaded.get_buffer(name), buffer, rtol=0, atol=0)
    with torch.no_grad():
        before = _step(model, tokenizer)[1].token_losses
        after = _step(loaded, tokenizer)[1].token_losses
    assert torch.equal(before, after)
    assert loaded.config.vae_config == model.config.vae_config


def test_position_tables_are_frozen_buffers(tiny):
    model, _ = tiny
    names = {name for name, _ in model.named_parameters()}
    assert "vit_pos_embed.pos_embed" not in names and "latent_pos_embed.pos_embed" not in names
    assert "vit_pos_embed.pos_embed" in model.state_dict()
    table = model.latent_pos_embed.pos_embed  # DiT's: [sin(h), cos(h), sin(w), cos(w)] halves, row-major
    assert table.shape == (64, 64)
    assert torch.allclose(table[9, :16], torch.sin(torch.tensor(1.0) / 10000 ** (torch.arange(16) / 16)))


def test_gradient_checkpointing_keeps_the_gradients():
    model, tokenizer = build_tiny_bagel(seed=0)
    model.train()
    _recA_trainable(model)

    def grads():
        model.zero_grad()
        _step(model, tokenizer)[1].loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    with pytest.warns(FutureWarning):  # transformers 5 renamed it activation_checkpointing_enable
        model.gradient_checkpointing_enable()
    layers = model.language_model.model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    calls = []
    checkpoint = layers[0]._gradient_checkpointing_func
    for layer in layers:
        layer._gradient_checkpointing_func = lambda *a, **k: calls.append(1) or checkpoint(*a, **k)
    checkpointed = grads()
    assert len(calls) == len(layers)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-8)


def test_position_ids_past_the_table_are_refused(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match=r"9x2 token grid does not fit the 8x8 position table"):
        model.vit_embeddings([torch.zeros(3, 9 * 14, 28)])


def test_the_real_configuration_on_the_meta_device():
    with torch.device("meta"):
        model = BagelModel(BagelConfig())
    counts = {}
    for name, parameter in model.named_parameters():
        part = "generation" if "moe_gen" in name else name.split(".")[0]
        counts[part] = counts.get(part, 0) + parameter.numel()
    assert model.config.latent_downsample == 16
    assert len(model.language_model.model.layers) == 28 and len(model.vit_model.encoder.layers) == 26
    assert 6.5e9 < counts["generation"] < 6.6e9  # the generation experts (analytic: 6.53B)
    assert model.vit_model.embeddings.position_embedding.weight.shape == (4900, 1152)


# --- the converter ---


def _authors_layout(model: BagelModel) -> tuple[dict, dict]:
    """The model's weights in the authors' layout, by hand (not through the key map) so the test checks the map."""
    main, ae = {}, {}
    for key, value in model.state_dict().items():
        if key == "vit_model.embeddings.patch_embedding.weight":
            main["vit_model.vision_model.embeddings.patch_embedding.weight"] = value.permute(0, 2, 3, 1).flatten(1)
        elif key.startswith("vit_model."):
            main["vit_model.vision_model." + key[len("vit_model.") :]] = value
        elif key.startswith("time_embedder."):
            main[key.replace("linear_1", "mlp.0").replace("linear_2", "mlp.2")] = value
        elif key.startswith("vae."):
            ae[_flux_name(key[4:], levels=2)] = value[:, :, None, None] if _is_attention_weight(key) else value
        else:
            main[key] = value
    return main, ae


def _is_attention_weight(key: str) -> bool:
    return ".attentions.0.to_" in key and key.endswith("weight")


def _flux_name(key: str, levels: int) -> str:
    parts = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut").split(".")
    if parts[1] in ("down_blocks", "up_blocks"):
        level = int(parts[2]) if parts[1] == "down_blocks" else levels - 1 - int(parts[2])
        head = f"{parts[0]}.{'down' if parts[1] == 'down_blocks' else 'up'}.{level}"
        rest = ".".join(parts[3:])
        rest = rest.replace("resnets.", "block.").replace("downsamplers.0.conv", "downsample.conv")
        return f"{head}.{rest.replace('upsamplers.0.conv', 'upsample.conv')}"
    if parts[1] == "mid_block":
        rest = ".".join(parts[2:])
        rest = rest.replace("resnets.0", "block_1").replace("resnets.1", "block_2")
        rest = rest.replace("attentions.0.group_norm", "attn_1.norm").replace(
            "attentions.0.to_out.0", "attn_1.proj_out"
        )
        for name in "qkv":
            rest = rest.replace(f"attentions.0.to_{name}", f"attn_1.{name}")
        return f"{parts[0]}.mid.{rest}"
    return ".".join(parts)


def _authors_folder(model: BagelModel, tokenizer, folder: Path, main: dict, ae: dict) -> Path:
    """The authors' folder layout; the tokenizer gives the converter the special tokens' ids."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    llm = model.config.llm_config.to_dict() | {"layer_module": "Qwen2MoTDecoderLayer", "qk_norm": True}
    vit = model.config.vit_config.to_dict() | {"rope": False}
    vit["num_hidden_layers"] += 1  # the released config counts the layer the authors drop
    (folder / "llm_config.json").write_text(json.dumps(llm))
    (folder / "vit_config.json").write_text(json.dumps(vit))
    save_file({k: v.contiguous() for k, v in main.items()}, folder / "ema.safetensors")
    save_file({k: v.contiguous() for k, v in ae.items()}, folder / "ae.safetensors")
    return folder


def test_patch_embedding_reshape_matches_the_authors_linear_on_patches():
    conv = torch.nn.Conv2d(3, 8, 14, 14)
    linear_weight = conv.weight.permute(0, 2, 3, 1).flatten(1)  # the authors' convert_conv2d_to_linear
    image = torch.randn(3, 28, 42)
    patches = image.reshape(3, 2, 14, 3, 14).permute(1, 3, 2, 4, 0).reshape(6, 588)  # their patchify: (p, q, c)
    torch.testing.assert_close(patches @ linear_weight.T + conv.bias, conv(image[None])[0].flatten(1).T)
    assert torch.equal(patch_linear_to_conv(linear_weight), conv.weight.detach())


def test_convert_an_authors_folder_round_trips(tiny, tmp_path):
    model, tokenizer = tiny
    main, ae = _authors_layout(model)
    main["language_model.model.rotary_emb.inv_freq"] = torch.zeros(8)  # known, left out
    folder = _authors_folder(model, tokenizer, tmp_path / "authors", main, ae)
    converted = convert_bagel_folder(folder, tmp_path / "out")
    for key, value in model.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
    assert converted.config.max_latent_size == 8 and converted.config.vit_max_num_patch_per_side == 8
    assert converted.config.vit_config.num_hidden_layers == 2
    assert converted.config.im_start_token_id == model.config.im_start_token_id
    loaded = AutoModel.from_pretrained(tmp_path / "out")
    assert isinstance(loaded, BagelModel)
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_convert_names_every_problem_of_both_files_at_once(tiny, tmp_path):
    model, tokenizer = tiny
    main, ae = _authors_layout(model)
    main["connector.fc3.weight"] = torch.zeros(2)  # unknown
    del main["llm2vae.bias"]  # missing
    main["vae2llm.weight"] = main["vae2llm.weight"][:, :8]  # mis-shaped
    ae["encoder.mid.attn_2.q.weight"] = torch.zeros(2)  # unknown in the VAE file
    del ae["decoder.conv_out.bias"]  # missing from the VAE file
    folder = _authors_folder(model, tokenizer, tmp_path / "authors", main, ae)
    with pytest.raises(CheckpointMismatchError) as raised:
        convert_bagel_folder(folder, tmp_path / "out")
    error = raised.value
    assert "connector.fc3.weight" in error.unknown and "ae.safetensors:encoder.mid.attn_2.q.weight" in error.unknown
    assert {"llm2vae.bias", "vae.decoder.conv_out.bias"} <= set(error.missing)
    assert [m[0] for m in error.mis_shaped] == ["vae2llm.weight"]
    assert not (tmp_path / "out").exists()


def test_the_key_map_covers_the_tiny_model_exactly(tiny):
    model, _ = tiny
    main, ae = _authors_layout(model)
    mapped = map_checkpoint(main, ae)
    state = model.state_dict()
    assert not mapped.unknown and not mapped.duplicates and mapped.tensors.keys() == state.keys()
    assert all(torch.equal(mapped.tensors[k], state[k]) for k in state)


def test_reca_convert_bagel(tiny, tmp_path, capsys):
    model, tokenizer = tiny
    folder = _authors_folder(model, tokenizer, tmp_path / "authors", *_authors_layout(model))
    (folder / "ema.safetensors").rename(folder / "model_bf16.safetensors")
    reca(["convert", "bagel", str(folder), str(tmp_path / "out"), "--weights", "model_bf16.safetensors"])
    assert "wrote a BagelModel" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.safetensors").is_file()
    with pytest.raises(SystemExit, match="ema.safetensors is missing"):
        reca(["convert", "bagel", str(folder), str(tmp_path / "again")])


def test_the_step_and_sampling_run_in_bfloat16():
    model, tokenizer = build_tiny_bagel(seed=0)
    conds, targets, prompts, posterior, logits, flow = _parity_inputs(tokenizer)
    model = model.to(torch.bfloat16).train()
    model.config.freeze_und = True
    latents = model.encode_latents(targets, noise=posterior)
    out = model.flow_loss(prompts, conds, latents, timestep_logits=logits, noise=flow)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(GOLDEN["full"]["loss"], rel=1e-2)
    assert model.language_model.model.layers[0].mlp_moe_gen.up_proj.weight.grad.dtype == torch.bfloat16
    image = model.eval().generate(prompts[0], height=16, width=24, vit_image=conds[0], num_timesteps=2)
    assert image.dtype == torch.bfloat16 and torch.isfinite(image).all()


def test_a_converted_model_runs_as_the_original(tiny, tmp_path):
    model, tokenizer = tiny
    folder = _authors_folder(model, tokenizer, tmp_path / "authors", *_authors_layout(model))
    converted = convert_bagel_folder(folder, tmp_path / "out").eval()
    assert not any(t.is_meta for t in [*converted.parameters(), *converted.buffers()])
    assert not any(p.requires_grad for p in converted.vae.parameters())
    with torch.no_grad():
        torch.testing.assert_close(_step(converted, tokenizer)[1].loss, _step(model, tokenizer)[1].loss, rtol=0, atol=0)


def test_config_refuses_special_tokens_outside_the_vocabulary(tiny):
    config = tiny[0].config.to_dict()
    config["vision_end_token_id"] = 10**6
    with pytest.raises(ValueError, match=r"vision_end_token_id=1000000 is outside the LLM's vocabulary of 725"):
        BagelConfig(**config)
