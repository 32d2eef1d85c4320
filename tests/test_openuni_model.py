"""OpenUniModel: save/load, the released-checkpoint converter, the authors' flow loss, checkpointing, sampling."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModel

from reca_hf.cli import main as reca
from reca_hf.models.openuni import OpenUniConfig, OpenUniModel
from reca_hf.models.openuni.convert import OPENUNI_KEY_MAP, connector_heads
from reca_hf.models.openuni.tiny import TINY_IMAGE_SIZE, tiny_openuni


@pytest.fixture(scope="module")
def tiny():
    return tiny_openuni(seed=0)


def _batch(processor, size: int = 2):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + "<img>"
    images = [Image.new("RGB", (40, 40), colour) for colour in ("red", "blue")[:size]]
    encoded = processor(images=images, text=[text] * size, return_tensors="pt")
    pixels = torch.Generator().manual_seed(7)
    target = torch.rand(size, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=pixels) * 2 - 1
    return encoded.input_ids, encoded.attention_mask, target


def _encoder_states(model, processor):
    input_ids, attention_mask, pixels = _batch(processor)
    features = model.semantic_features(pixels)
    return model.encoder_states(model.query_states(input_ids, attention_mask, features)), pixels


def test_processor_writes_the_authors_layout(tiny):
    _, processor = tiny
    input_ids, _, _ = _batch(processor, size=1)
    tokens = processor.tokenizer.convert_ids_to_tokens(input_ids[0].tolist())
    n = tiny[0].config.internvl_config.image_seq_length
    assert tokens[:3] == ["<|im_start|>", "user", "<img>"]
    assert tokens[3 : 3 + n] == ["<IMG_CONTEXT>"] * n
    assert tokens[3 + n :] == ["</img>", "describe", "the", "image", "<|im_end|>", "<|im_start|>", "assistant", "<img>"]


def test_save_load_round_trip_gives_identical_outputs(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = AutoModel.from_pretrained(tmp_path).eval()  # model_type "openuni" is registered with the Auto classes
    assert isinstance(loaded, OpenUniModel)
    input_ids, attention_mask, pixels = _batch(processor)
    with torch.no_grad():
        before = model(input_ids, attention_mask, pixels, generator=torch.Generator().manual_seed(3), reduction="none")
        after = loaded(input_ids, attention_mask, pixels, generator=torch.Generator().manual_seed(3), reduction="none")
    assert torch.equal(before, after)
    assert loaded.config.to_dict()["transformer_config"] == model.config.to_dict()["transformer_config"]


def test_new_parts_get_the_authors_initialisation(tiny):
    model, _ = tiny
    queries = model.meta_queries.weight
    assert abs(queries.std().item() - 64**-0.5) < 0.02  # normal with std 1/sqrt(llm width)
    for layer in model.connector.layers:
        assert all(not proj.bias.any() for proj in (layer.self_attn.q_proj, layer.self_attn.out_proj))
        assert torch.equal(layer.layer_norm1.weight, torch.ones(64))
        assert layer.mlp.fc1.bias.abs().max() < 1e-4  # normal with std 1e-6
    bound = 64**-0.5  # PyTorch's default Linear init keeps the projector inside +-1/sqrt(fan_in)
    assert model.projector.weight.abs().max() <= bound and model.projector.weight.abs().max() > 0.9 * bound


def test_train_mode_leaves_the_autoencoder_in_eval_mode():
    model, _ = tiny_openuni(seed=0)
    model.train()
    assert model.transformer.training and model.connector.training
    assert not any(module.training for module in model.vae.modules())


def test_config_refuses_a_connector_narrower_than_the_llm(tiny):
    config = tiny[0].config.to_dict()
    config["connector_config"]["hidden_size"] = 32
    with pytest.raises(ValueError, match=r"connector_config.hidden_size is 32 .* set connector_config.hidden_size=64"):
        OpenUniConfig(**{k: config[k] for k in ("internvl_config", "connector_config")})


def test_query_states_refuse_a_feature_count_that_misses_the_slots(tiny):
    model, processor = tiny
    input_ids, attention_mask, pixels = _batch(processor)
    features = model.semantic_features(pixels)
    with pytest.raises(ValueError, match="image-context tokens"):
        model.query_states(input_ids, attention_mask, features[:, :-1])


def test_flow_loss_is_reproducible_and_matches_the_authors_formula(tiny):
    model, processor = tiny
    states, pixels = _encoder_states(model, processor)
    latents = model.encode_latents(pixels)
    with torch.no_grad():
        first = model.flow_loss(latents, states, generator=torch.Generator().manual_seed(11), reduction="none")
        second = model.flow_loss(latents, states, generator=torch.Generator().manual_seed(11), reduction="none")
        mean = model.flow_loss(latents, states, generator=torch.Generator().manual_seed(11))
        # The authors' diff_loss by hand: noise, then u; t on the 1000-step grid, sigma = t / 1000 (shift 1).
        draws = torch.Generator().manual_seed(11)
        noise = torch.randn(latents.shape, generator=draws)
        u = torch.rand(latents.shape[0], generator=draws)
        t = 1000.0 - (u * 1000).long().float()
        sigma = (t / 1000).view(-1, 1, 1, 1)
        noisy = (1 - sigma) * latents + sigma * noise
        prediction = model.transformer(noisy, encoder_hidden_states=states, timestep=t, return_dict=False)[0]
        expected = ((prediction - (noise - latents)) ** 2).flatten(1).mean(1)
    assert torch.equal(first, second)
    assert first.shape == (latents.shape[0],)
    torch.testing.assert_close(first, expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(mean, first.mean())


def test_flow_loss_takes_timesteps_and_noise_from_the_caller(tiny):
    model, processor = tiny
    states, pixels = _encoder_states(model, processor)
    latents = model.encode_latents(pixels)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))
    timesteps = torch.tensor([1000.0, 500.0])
    with torch.no_grad():
        loss = model.flow_loss(latents, states, noise=noise, timesteps=timesteps, reduction="none")
        sigma = torch.tensor([1.0, 0.5]).view(-1, 1, 1, 1)
        prediction = model.transformer(
            (1 - sigma) * latents + sigma * noise, encoder_hidden_states=states, timestep=timesteps, return_dict=False
        )[0]
    torch.testing.assert_close(loss, ((prediction - (noise - latents)) ** 2).flatten(1).mean(1))
    with pytest.raises(ValueError, match=r"timesteps \[500.5\] are not on the training schedule"):
        model.flow_loss(latents, states, noise=noise, timesteps=torch.tensor([1000.0, 500.5]))


def test_loss_matches_the_authors_code_on_the_tiny_model(tiny):
    """The golden value is the authors' own loss chain on these weights (see the JSON's note for how)."""
    golden = json.loads((Path(__file__).parent / "golden" / "openuni_flow_loss.json").read_text())
    model, processor = tiny
    states, pixels = _encoder_states(model, processor)
    latents = model.encode_latents(pixels)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(golden["noise_seed"]))
    timesteps = model.train_scheduler.timesteps[(torch.tensor(golden["u"]) * 1000).long()]
    with torch.no_grad():
        loss = model.flow_loss(latents, states, noise=noise, timesteps=timesteps)
    assert loss.item() == pytest.approx(golden["authors_diff_loss"], rel=1e-5)


def _transformer_grads(model, processor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    input_ids, attention_mask, pixels = _batch(processor)
    model(input_ids, attention_mask, pixels, generator=torch.Generator().manual_seed(2)).backward()
    return {name: p.grad.clone() for name, p in model.transformer.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_reaches_sana_and_keeps_the_gradients():
    model, processor = tiny_openuni(seed=0)
    model.train()
    plain = _transformer_grads(model, processor)
    with pytest.warns(FutureWarning):  # transformers 5 renamed it activation_checkpointing_enable
        model.gradient_checkpointing_enable()
    assert model.transformer.gradient_checkpointing
    assert all(layer.gradient_checkpointing for layer in model.connector.layers)
    calls = []
    checkpoint = model.transformer._gradient_checkpointing_func
    model.transformer._gradient_checkpointing_func = lambda *a, **k: calls.append(1) or checkpoint(*a, **k)
    checkpointed = _transformer_grads(model, processor)
    assert len(calls) == len(model.transformer.transformer_blocks)
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_generate_returns_images_of_the_generation_size(tiny):
    model, processor = tiny
    states, _ = _encoder_states(model, processor)
    images = model.generate(states, states.flip(0), num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert [image.size for image in images] == [(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)] * 2
    with pytest.raises(ValueError, match="needs negative_encoder_states"):
        model.generate(states, num_inference_steps=1)


# --- the released-checkpoint converter ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def public_parts(tmp_path_factory, tiny):
    """The tiny model's parts saved as the public checkpoints would be: InternVL-hf, a SANA pipeline, DC-AE."""
    from diffusers import DPMSolverMultistepScheduler

    model, processor = tiny
    root = tmp_path_factory.mktemp("public")
    model.lmm.save_pretrained(root / "internvl")
    processor.tokenizer.save_pretrained(root / "internvl")
    model.transformer.save_pretrained(root / "sana" / "transformer")
    DPMSolverMultistepScheduler.from_config(model.config.scheduler_config).save_pretrained(root / "sana" / "scheduler")
    model.vae.save_pretrained(root / "dcae")
    return root


def _remote_layout(lmm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' InternVL state dict in the authors' remote-code layout (``lmm.*`` of their checkpoints): the
    inverse of the converter's rules, written out by hand so that the test checks the rules, not itself."""
    vit, layer = "lmm.model.vision_tower.", re.compile(r"lmm\.model\.vision_tower\.encoder\.layer\.(\d+)\.(.+)")
    names = {"lambda_1": "ls1", "lambda_2": "ls2", "attention.projection_layer": "attn.proj"}
    names |= {"layernorm_before": "norm1", "layernorm_after": "norm2", "mlp": "mlp"}
    remote = {}
    for key, value in lmm_state.items():
        if match := layer.fullmatch(key):
            index, rest = match.groups()
            if rest.startswith(("attention.q_proj", "attention.k_proj", "attention.v_proj")):
                if rest.startswith("attention.q_proj"):
                    suffix = rest.rsplit(".", 1)[1]
                    parts = [lmm_state[f"{vit}encoder.layer.{index}.attention.{n}_proj.{suffix}"] for n in "qkv"]
                    remote[f"lmm.vision_model.encoder.layers.{index}.attn.qkv.{suffix}"] = torch.cat(parts)
                continue
            head = next(n for n in names if rest.startswith(n))
            remote[f"lmm.vision_model.encoder.layers.{index}.{names[head]}{rest[len(head) :]}"] = value
        elif key.startswith(vit + "embeddings."):
            rest = key[len(vit + "embeddings.") :]
            rest = {"cls_token": "class_embedding", "position_embeddings": "position_embedding"}.get(rest, rest)
            remote["lmm.vision_model.embeddings." + rest.replace("patch_embeddings.projection", "patch_embedding")] = (
                value
            )
        elif key.startswith("lmm.model.multi_modal_projector."):
            rest = key.rsplit(".", 2)
            index = {"layer_norm": 0, "linear_1": 1, "linear_2": 3}[rest[1]]
            remote[f"lmm.mlp1.{index}.{rest[2]}"] = value
        elif key.startswith("lmm.model.language_model."):
            remote["lmm.language_model.model." + key[len("lmm.model.language_model.") :]] = value
        else:
            assert key == "lmm.lm_head.weight", key
            remote["lmm.language_model.lm_head.weight"] = value
    return remote


@pytest.fixture(scope="module")
def released(tiny):
    """A state dict with the authors' key names: queries, connector, projector and SANA from a differently seeded
    model (so values are traceable), and the public InternVL's weights in the remote-code layout."""
    model, _ = tiny
    other, _ = tiny_openuni(seed=1)
    state = {"meta_queries": other.meta_queries.weight.detach().clone()}
    for part in ("connector", "projector", "transformer"):
        state |= {f"{part}.{k}": v.clone() for k, v in getattr(other, part).state_dict().items()}
    lmm = {f"lmm.{k}": v.clone() for k, v in model.lmm.state_dict().items()}
    return state | _remote_layout(lmm)


def _convert(public_parts, state, tmp_path, *flags: str) -> str:
    torch.save(state, tmp_path / "openuni.pth")
    out = tmp_path / "converted"
    argv = [str(tmp_path / "openuni.pth"), str(out), "--internvl", str(public_parts / "internvl")]
    argv += ["--sana", str(public_parts / "sana"), "--dc-ae", str(public_parts / "dcae"), *flags]
    reca(["convert", "openuni", *argv])  # the `reca convert openuni` command
    return out


def test_converter_puts_each_checkpoint_key_where_the_key_map_says(public_parts, released, tiny, tmp_path):
    model, _ = tiny
    converted = OpenUniModel.from_pretrained(_convert(public_parts, released, tmp_path, "--connector-heads", "4"))
    assert torch.equal(converted.meta_queries.weight, released["meta_queries"])
    for key, value in converted.state_dict().items():
        part = key.split(".", 1)[0]
        if part in ("connector", "projector", "transformer"):
            assert torch.equal(value, released[key]), key
        elif part in ("lmm", "vae"):
            assert torch.equal(value, model.state_dict()[key]), key
    assert converted.config.connector_config.num_attention_heads == 4
    assert converted.config.image_size == TINY_IMAGE_SIZE
    assert converted.config.scheduler_config["flow_shift"] == 3.0


def test_the_lmm_rules_are_transformers_internvl_conversion(released, tiny):
    """The remote-code lmm.* keys (qkv fused) map onto every InternVL key of the model, tensor for tensor."""
    model, _ = tiny
    mapped = OPENUNI_KEY_MAP.map({k: v for k, v in released.items() if k.startswith("lmm.")})
    assert not mapped.unknown and not mapped.duplicates
    lmm = {k: v for k, v in model.state_dict().items() if k.startswith("lmm.")}
    assert mapped.tensors.keys() == lmm.keys()
    assert all(torch.equal(mapped.tensors[k], v) for k, v in lmm.items())
    assert mapped.sources["lmm.model.vision_tower.encoder.layer.1.attention.k_proj.weight"] == (
        "lmm.vision_model.encoder.layers.1.attn.qkv.weight"
    )


def test_an_unknown_a_missing_and_a_mis_shaped_key_are_named_in_one_error(public_parts, released, tmp_path):
    state = dict(released, **{"connector.position_embedding.weight": torch.zeros(8, 64)})  # unknown
    del state["connector.layers.1.mlp.fc2.bias"]  # missing
    state["projector.weight"] = torch.zeros(32, 63)  # mis-shaped: the converter's message, not torch's
    with pytest.raises(SystemExit) as caught:
        _convert(public_parts, state, tmp_path)
    message = str(caught.value)
    assert "CheckpointMismatchError" in message and "size mismatch" not in message
    assert "1 checkpoint key(s) no rule of the key map knows: 'connector.position_embedding.weight'" in message
    assert "1 model key(s) the checkpoint does not provide: 'connector.layers.1.mlp.fc2.bias'" in message
    assert "'projector.weight' -> 'projector.weight' has shape (32, 63), the model expects (32, 64)" in message
    assert not (tmp_path / "converted").exists()


@pytest.mark.parametrize("dropped", ["connector.layers.1.mlp.fc2.bias", "connector.layers.0.mlp.fc1.weight"])
def test_converter_refuses_a_missing_key(public_parts, released, tmp_path, dropped):
    state = {k: v for k, v in released.items() if k != dropped}
    with pytest.raises(SystemExit, match=rf"does not provide: '{re.escape(dropped)}'"):
        _convert(public_parts, state, tmp_path)


def test_converter_refuses_a_partial_transformer(public_parts, released, tmp_path):
    state = {k: v for k, v in released.items() if k != "transformer.proj_out.bias"}
    with pytest.raises(SystemExit, match=r"'transformer.proj_out.bias'"):
        _convert(public_parts, state, tmp_path)


def test_unknown_and_missing_lmm_keys_are_named(public_parts, released, tmp_path):
    state = {k: v for k, v in released.items() if k != "lmm.mlp1.3.bias"}
    state["lmm.vision_model.encoder.layers.0.attn.rope.weight"] = torch.zeros(4)
    with pytest.raises(SystemExit) as caught:
        _convert(public_parts, state, tmp_path)
    message = str(caught.value)
    assert "'lmm.vision_model.encoder.layers.0.attn.rope.weight'" in message
    assert "does not provide: 'lmm.model.multi_modal_projector.linear_2.bias'" in message


def test_lmm_weights_that_differ_from_internvl_are_refused_unless_accepted(public_parts, released, tmp_path):
    state = dict(released)
    state["lmm.mlp1.1.weight"] = released["lmm.mlp1.1.weight"] + 0.19
    state["lmm.vision_model.encoder.layers.1.attn.qkv.weight"] = released[
        "lmm.vision_model.encoder.layers.1.attn.qkv.weight"
    ] * (1 + 1e-3)  # a bfloat16-sized rounding passes
    with pytest.raises(SystemExit) as caught:
        _convert(public_parts, state, tmp_path, "--connector-heads", "4")
    message = str(caught.value)
    assert re.search(r"1 tensor\(s\) differ .*'lmm.mlp1.1.weight' -> 'lmm.model.multi_modal_projector.linear_1.weight"
                     r"' differs by up to 0.19", message)  # fmt: skip
    assert "--accept-lmm-mismatch" in message and "qkv" not in message
    out = _convert(public_parts, state, tmp_path, "--connector-heads", "4", "--accept-lmm-mismatch")
    converted = OpenUniModel.from_pretrained(out)
    assert torch.equal(converted.lmm.model.multi_modal_projector.linear_1.weight, state["lmm.mlp1.1.weight"])


def test_the_connector_head_count_is_never_zero(public_parts, released, tiny, tmp_path):
    """64-wide heads where 64 divides the width (the authors' 14 and 24), else the InternVL LLM's; an impossible
    --connector-heads is refused by name."""
    internvl = tiny[0].config.internvl_config  # its LLM: 4 heads
    assert [connector_heads(width, internvl) for width in (896, 1536, 64, 32)] == [14, 24, 1, 4]
    with pytest.raises(ValueError, match="set --connector-heads"):
        connector_heads(30, internvl)
    for heads in (0, 5):
        with pytest.raises(ValueError, match=f"--connector-heads {heads} cannot split the connector's width 64"):
            connector_heads(64, internvl, heads)
    converted = OpenUniModel.from_pretrained(_convert(public_parts, released, tmp_path))
    assert converted.config.connector_config.num_attention_heads == 1
    with pytest.raises(SystemExit, match="--connector-heads 5 cannot split"):
        _convert(public_parts, released, tmp_path, "--connector-heads", "5")
