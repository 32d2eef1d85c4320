"""The shared key-map helper of the converters: every problem of a checkpoint in one error."""

from __future__ import annotations

import pytest
import torch

from reca_hf.conversion import (
    CheckpointMismatchError,
    KeyMap,
    KeyRule,
    check_checkpoint,
    load_checked,
    value_differences,
)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 3)
        self.qkv = torch.nn.ModuleDict({name: torch.nn.Linear(3, 3, bias=False) for name in "qkv"})
        self.norm = torch.nn.LayerNorm(3)


KEYS = KeyMap(
    "tiny",
    [
        KeyRule(r"model\.proj\.(weight|bias)", r"proj.\1"),
        KeyRule(r"model\.attn\.qkv\.weight", ("qkv.q.weight", "qkv.k.weight", "qkv.v.weight"), lambda w: w.chunk(3)),
        KeyRule(r"model\.ln\.(weight|bias)", r"norm.\1"),
        KeyRule(r"model\.class_emb\.weight", None, why="unused by the model"),
    ],
)


def _checkpoint():
    return {
        "model.proj.weight": torch.randn(3, 4),
        "model.proj.bias": torch.randn(3),
        "model.attn.qkv.weight": torch.randn(9, 3),
        "model.ln.weight": torch.randn(3),
        "model.ln.bias": torch.randn(3),
        "model.class_emb.weight": torch.randn(10, 3),
    }


def test_a_complete_checkpoint_maps_splits_and_loads():
    model = Tiny()
    checkpoint = _checkpoint()
    mapped = KEYS.map(checkpoint)
    assert mapped.skipped == ["model.class_emb.weight"] and not mapped.unknown
    load_checked(model, mapped, architecture="tiny")
    assert torch.equal(model.proj.weight, checkpoint["model.proj.weight"])
    assert torch.equal(model.qkv["k"].weight, checkpoint["model.attn.qkv.weight"][3:6])
    assert mapped.sources["qkv.v.weight"] == "model.attn.qkv.weight"


def test_unknown_missing_and_mis_shaped_keys_are_reported_together():
    checkpoint = _checkpoint()
    del checkpoint["model.ln.bias"]  # missing
    checkpoint["model.extra.weight"] = torch.zeros(1)  # unknown
    checkpoint["model.proj.weight"] = torch.zeros(3, 5)  # mis-shaped
    before = {k: v.clone() for k, v in Tiny().state_dict().items()}
    model = Tiny()
    model.load_state_dict(before)
    with pytest.raises(CheckpointMismatchError) as caught:
        load_checked(model, KEYS.map(checkpoint), architecture="tiny", hint="Is it a tiny checkpoint?")
    error = caught.value
    assert error.unknown == ["model.extra.weight"]
    assert error.missing == ["norm.bias"]
    assert error.mis_shaped == [("proj.weight", "model.proj.weight", (3, 5), (3, 4))]
    message = str(error)
    for text in ("model.extra.weight", "norm.bias", "(3, 5)", "(3, 4)", "nothing was written", "Is it a tiny"):
        assert text in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing loaded


def test_keys_the_model_lacks_and_double_mappings_are_refused():
    mapped = KEYS.map({"model.proj.weight": torch.zeros(3, 4)}, prefix="inner.")
    with pytest.raises(CheckpointMismatchError, match=r"model\.proj\.weight \(as inner\.proj\.weight\)"):
        check_checkpoint(mapped, Tiny().state_dict(), architecture="tiny", required=())
    twice = KeyMap("tiny", [(r"a|b", "proj.bias")]).map({"a": torch.zeros(3), "b": torch.zeros(3)})
    with pytest.raises(CheckpointMismatchError, match="several checkpoint keys") as caught:
        check_checkpoint(twice, Tiny().state_dict(), architecture="tiny", required=())
    assert caught.value.duplicates == {"proj.bias": ["a", "b"]}


def test_required_limits_what_must_come_from_the_checkpoint():
    mapped = KEYS.map({"model.proj.weight": torch.zeros(3, 4), "model.proj.bias": torch.zeros(3)})
    check_checkpoint(mapped, Tiny().state_dict(), architecture="tiny", required=lambda key: key.startswith("proj."))
    with pytest.raises(CheckpointMismatchError, match="norm.weight"):
        check_checkpoint(mapped, Tiny().state_dict(), architecture="tiny", required=lambda key: key != "qkv.q.weight")


def test_value_differences_name_the_largest_first_and_pass_a_bfloat16_copy():
    reference = Tiny().state_dict()
    checkpoint = {
        "model.proj.weight": reference["proj.weight"].bfloat16(),  # rounding only: passes
        "model.proj.bias": reference["proj.bias"].clone(),
        "model.attn.qkv.weight": torch.cat([reference[f"qkv.{n}.weight"] for n in "qkv"]),
        "model.ln.weight": reference["norm.weight"] + 0.05,
        "model.ln.bias": reference["norm.bias"] - 0.5,
    }
    mapped = KEYS.map(checkpoint)
    differing = value_differences(mapped, reference)
    assert [(key, source) for key, source, _ in differing] == [("norm.bias", "model.ln.bias"),
                                                               ("norm.weight", "model.ln.weight")]  # fmt: skip
    assert [diff for *_, diff in differing] == pytest.approx([0.5, 0.05])
    assert value_differences(mapped, reference, keys=lambda key: key != "norm.bias") == differing[1:]
    with pytest.raises(CheckpointMismatchError, match=r"differ from the reference weights \(largest first\): "
                       r"'model.ln.bias' -> 'norm.bias' differs by up to 0.5") as caught:  # fmt: skip
        check_checkpoint(mapped, reference, architecture="tiny", differing=differing)
    assert caught.value.differing == differing
