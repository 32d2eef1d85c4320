"""`reca convert showo` on synthetic releases in the authors' layout (the tiny models' weights written as theirs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModel

from reca_hf.cli import main as reca
from reca_hf.conversion import CheckpointMismatchError, check_checkpoint
from reca_hf.models.showo import MagvitV2, ShowoConfig, ShowoModel
from reca_hf.models.showo.convert import (
    MAGVIT_KEY_MAP,
    SHOWO_KEY_MAP,
    _merge,
    llm_config_from_checkpoint,
    magvit_config_from_checkpoint,
    showo_config_from_release,
)
from reca_hf.models.showo.tiny import build_tiny_showo, build_tiny_showo_clip


def _release(model: ShowoModel, folder, *, sharded: bool = False) -> tuple:
    """The authors' layout: a Show-o folder (their config.json fields, pytorch_model.safetensors with showo.* and
    mm_projector.*) and a MAGVIT-v2 folder (pytorch_model.bin with encoder.*, decoder.*, quantize.*)."""
    config = model.config
    state = {k: v.clone() for k, v in model.state_dict().items()}
    showo = {k: v for k, v in state.items() if k.startswith(("showo.", "mm_projector."))}
    magvit = {k.removeprefix("vq_model."): v for k, v in state.items() if k.startswith("vq_model.")}
    showo_dir, magvit_dir = folder / "show-o", folder / "magvitv2"
    showo_dir.mkdir()
    magvit_dir.mkdir()
    authors_config = {
        "_class_name": "Showo",
        "w_clip_vit": config.w_clip_vit,
        "vocab_size": config.vocab_size,
        "llm_vocab_size": config.llm_vocab_size,
        "llm_model_path": "microsoft/phi-1_5",
        "codebook_size": config.codebook_size,
        "num_vq_tokens": config.num_vq_tokens,
        "mask_token_id": config.mask_token_id,
    }
    (showo_dir / "config.json").write_text(json.dumps(authors_config))
    if sharded:
        keys = sorted(showo)
        halves = {
            "pytorch_model-1.safetensors": keys[: len(keys) // 2],
            "pytorch_model-2.safetensors": keys[len(keys) // 2 :],
        }
        for name, part in halves.items():
            save_file({k: showo[k].contiguous() for k in part}, str(showo_dir / name))
        weight_map = {k: name for name, part in halves.items() for k in part}
        (showo_dir / "pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        save_file({k: v.contiguous() for k, v in showo.items()}, str(showo_dir / "pytorch_model.safetensors"))
    torch.save(magvit, magvit_dir / "pytorch_model.bin")
    (magvit_dir / "config.json").write_text(json.dumps({"_class_name": "MAGVITv2"}))
    return showo_dir, magvit_dir, showo, magvit


def _llm_config_file(model, folder):
    path = folder / "phi.json"
    path.write_text(json.dumps(model.config.llm_config.to_dict()))
    return path


def test_convert_the_vq_variant_reproduces_the_model(tmp_path):
    model, _ = build_tiny_showo(seed=0)
    showo_dir, magvit_dir, _, _ = _release(model, tmp_path, sharded=True)
    out = tmp_path / "converted"
    reca(["convert", "showo", str(showo_dir), str(out), "--magvit", str(magvit_dir), "--max-seq-length", "24",
          "--llm-config", str(_llm_config_file(model, tmp_path))])  # fmt: skip
    converted = AutoModel.from_pretrained(out)
    assert isinstance(converted, ShowoModel) and not converted.config.w_clip_vit
    assert converted.config.num_vq_tokens == model.config.num_vq_tokens
    for key, value in model.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key


def test_phi_shapes_and_heads_are_read_off_the_checkpoint(tmp_path):
    model, _ = build_tiny_showo(seed=0)
    state = model.state_dict()
    settings = llm_config_from_checkpoint(state)
    assert (settings["hidden_size"], settings["intermediate_size"], settings["num_hidden_layers"]) == (64, 128, 2)
    assert settings["num_attention_heads"] == 4  # 64 wide / a 16-wide q_layernorm
    assert settings["bos_token_id"] == settings["eos_token_id"] == 50256
    showo_dir, magvit_dir, _, _ = _release(model, tmp_path)
    out = tmp_path / "converted"
    reca(["convert", "showo", str(showo_dir), str(out), "--magvit", str(magvit_dir)])
    converted = AutoModel.from_pretrained(out)
    ids = torch.randint(0, 900, (1, 12))
    mask = torch.zeros(1, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(converted(ids, mask).logits, model(ids, mask).logits)


def test_convert_the_clip_variant_takes_the_tower_from_clip(tmp_path):
    model, _ = build_tiny_showo_clip(seed=0)
    showo_dir, magvit_dir, showo, _ = _release(model, tmp_path)
    assert any(key.startswith("mm_projector.2.") for key in showo)
    clip_dir = tmp_path / "clip"
    model.vision_tower.save_pretrained(clip_dir)
    out = tmp_path / "converted"
    with pytest.raises(SystemExit, match="pass --clip"):
        reca(["convert", "showo", str(showo_dir), str(out), "--magvit", str(magvit_dir)])
    reca(["convert", "showo", str(showo_dir), str(out), "--magvit", str(magvit_dir), "--clip", str(clip_dir)])
    converted = AutoModel.from_pretrained(out)
    assert converted.config.w_clip_vit
    for key, value in model.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key


def test_every_problem_is_named_in_one_error(tmp_path):
    model, _ = build_tiny_showo(seed=0)
    showo_dir, magvit_dir, showo, magvit = _release(model, tmp_path)
    showo["showo.model.layers.0.mlp.fc9.weight"] = showo.pop("showo.model.layers.0.mlp.fc2.weight")  # unknown+missing
    showo["showo.lm_head.bias"] = torch.zeros(3)  # mis-shaped
    save_file({k: v.contiguous() for k, v in showo.items()}, str(showo_dir / "pytorch_model.safetensors"))
    del magvit["decoder.conv_out.bias"]
    magvit["quantize.codebook"] = torch.zeros(2)
    torch.save(magvit, magvit_dir / "pytorch_model.bin")
    out = tmp_path / "converted"
    with pytest.raises(CheckpointMismatchError) as raised:
        reca(["--debug", "convert", "showo", str(showo_dir), str(out), "--magvit", str(magvit_dir)])
    message = str(raised.value)
    assert "showo.model.layers.0.mlp.fc9.weight" in message
    assert "quantize.codebook" in message and "magvitv2:" in message
    assert "'showo.model.layers.0.mlp.fc2.weight'" in message and "'vq_model.decoder.conv_out.bias'" in message
    assert "showo.lm_head.bias" in message and "has shape (3,)" in message
    assert not out.exists()


def test_magvit_alone_with_its_sizes_read_off_the_tensors(tmp_path):
    model, _ = build_tiny_showo(seed=0)
    _, magvit_dir, _, _ = _release(model, tmp_path)
    reca(["convert", "showo", str(magvit_dir), str(tmp_path / "out"), "--magvit-only"])
    magvit = AutoModel.from_pretrained(tmp_path / "out")
    assert isinstance(magvit, MagvitV2)
    tiny = model.config.vq_config
    assert magvit.config.encoder_num_res_blocks == tiny.encoder_num_res_blocks
    assert magvit.config.decoder_ch_mult == tiny.decoder_ch_mult and magvit.config.z_channels == tiny.z_channels
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    assert torch.equal(magvit.encode(pixels), model.vq_model.encode(pixels))
    with torch.no_grad():
        assert torch.equal(
            magvit.decode(model.vq_model.encode(pixels)), model.vq_model.decode(model.vq_model.encode(pixels))
        )


def test_the_key_map_is_the_identity_on_the_authors_names():
    rule, match = SHOWO_KEY_MAP.rename("showo.model.layers.3.self_attn.q_layernorm.weight")
    assert match.expand(rule.target) == "showo.model.layers.3.self_attn.q_layernorm.weight"
    assert SHOWO_KEY_MAP.rename("mm_projector.1.weight") is None  # the GELU has no weights


def test_the_real_releases_layout_maps_onto_the_real_configuration():
    """The authors' real-size key names and shapes (golden, from their modules on the meta device) pass the converter's
    key maps and checks against `ShowoModel`'s real configuration, whose sizes are read off those shapes."""
    golden = json.loads((Path(__file__).parent / "golden" / "showo_real_layout.json").read_text())
    magvit = {key: torch.empty(shape, device="meta") for key, shape in golden["magvitv2"].items()}
    for clip in (False, True):
        layout = golden["showo_vq"] | (golden["showo_clip_extra"] if clip else {})
        showo = {key: torch.empty(shape, device="meta") for key, shape in layout.items()}
        config = showo_config_from_release(
            {"w_clip_vit": clip, "num_vq_tokens": 1024},
            showo,
            magvit_config_from_checkpoint(magvit),
            vision_config=ShowoConfig(w_clip_vit=True).vision_config.to_dict() if clip else None,
        )
        assert config.vq_config.encoder_num_res_blocks == [4, 3, 4, 3, 4]
        assert config.vq_config.decoder_num_res_blocks == [4, 4, 3, 4, 3]
        assert config.llm_config.num_attention_heads == 32 and config.vocab_size == 58498
        with torch.device("meta"):
            model = ShowoModel(config)
        expected = {k: v for k, v in model.state_dict().items() if not k.startswith("vision_tower.")}
        mapped = _merge(
            ("show-o", SHOWO_KEY_MAP.map(showo)), ("magvitv2", MAGVIT_KEY_MAP.map(magvit, prefix="vq_model."))
        )
        check_checkpoint(mapped, expected, architecture="showo")
