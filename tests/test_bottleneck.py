"""The information bottleneck: the shortcut guard, "auto" resolutions, blur, and Janus below its native size."""

import pytest
import torch

from reca_hf import RecACollator, RecAConfig, RecATrainer
from reca_hf.adapters import get_adapter
from reca_hf.checks import run_errors
from reca_hf.cli import validate
from reca_hf.testing import tiny_umm


def _rows(shapes, n=4):
    return [shapes[i] for i in range(n)]


def test_the_shortcut_is_refused_with_one_message_by_the_checks_validate_and_the_trainer(make_args, shapes, tmp_path):
    """The config only describes (it reads no model); the model-dependent checks name both fixes, alike everywhere."""
    fields = dict(model_name_or_path="tiny:emu3", condition_resolution=32, generation_resolution=32,
                  condition_bottleneck="none")  # fmt: skip
    config = RecAConfig(**fields, report_to="none")  # no error: nothing here says what tiny:emu3 is
    model, processor = tiny_umm("emu3")
    adapter = get_adapter(model, processor)
    (message,) = run_errors(config, adapter)
    assert "condition_resolution=32" in message and "copy" in message
    assert "condition_bottleneck='resize'" in message and "'blur'" in message and "allow_shortcut" in message
    recipe = tmp_path / "shortcut.yaml"
    recipe.write_text("dataset_name: synthetic_shapes\n" + "".join(f"{k}: {v}\n" for k, v in fields.items()))
    assert message in validate(str(recipe))
    with pytest.raises(ValueError) as error:
        RecATrainer(model, args=make_args(**fields), train_dataset=shapes, processing_class=processor)
    assert str(error.value) == message
    # Resizing to the target's own resolution is no bottleneck either.
    assert any("copy" in e for e in run_errors(RecAConfig(**{**fields, "condition_bottleneck": "resize"}), adapter))
    # Bottlenecked settings, and different-space adapters, pass.
    assert run_errors(RecAConfig(**{**fields, "condition_resolution": 16}), adapter) == []
    assert run_errors(RecAConfig(**{**fields, "condition_bottleneck": "blur"}), adapter) == []
    assert run_errors(RecAConfig(model_name_or_path="tiny:emu3"), adapter) == []  # "auto" is bottlenecked
    janus = get_adapter(*tiny_umm("janus"))
    assert run_errors(RecAConfig(**{**fields, "model_name_or_path": "tiny:janus"}), janus) == []


def test_trainer_refuses_the_shortcut_unless_allowed_which_warns(make_args, shapes):
    model, processor = tiny_umm("emu3")
    with pytest.raises(ValueError, match="copy"):  # also with a collator of the user's own
        RecATrainer(model, args=make_args(condition_resolution=32, condition_bottleneck="none"), train_dataset=shapes,
                    processing_class=processor, data_collator=lambda rows: rows)  # fmt: skip
    with pytest.warns(UserWarning, match="allow_shortcut=True"):
        trainer = RecATrainer(model, args=make_args(condition_resolution=32, condition_bottleneck="none",
                                                    allow_shortcut=True),
                              train_dataset=shapes, processing_class=processor)  # fmt: skip
    assert trainer.data_collator.views.condition_resolution == 32
    janus, janus_processor = tiny_umm("janus")
    RecATrainer(janus, args=make_args(condition_resolution=32, condition_bottleneck="none"), train_dataset=shapes,
                processing_class=janus_processor)  # fmt: skip


def test_auto_resolution_per_adapter():
    emu3 = get_adapter(*tiny_umm("emu3"))
    janus = get_adapter(*tiny_umm("janus"))
    assert emu3.shares_representation() and not janus.shares_representation()
    assert emu3.resolve_resolutions("auto", "auto") == (16, 32)  # same space: at most half the target side
    assert janus.resolve_resolutions("auto", "auto") == (32, 32)  # different spaces: the understanding floor


def test_blur_keeps_the_condition_token_count_and_removes_detail(shapes):
    model, processor = tiny_umm("emu3")
    adapter = get_adapter(model, processor)
    with pytest.warns(UserWarning, match="allow_shortcut"):
        plain = RecACollator(adapter, condition_resolution=32, condition_bottleneck="none", allow_shortcut=True)
    blurred = RecACollator(adapter, condition_resolution=32, condition_bottleneck="blur", blur_factor=4)
    resized = RecACollator(adapter, condition_resolution=16)
    a, b, c = (collator(_rows(shapes)) for collator in (plain, blurred, resized))
    assert torch.equal(a["condition_mask"].sum(-1), b["condition_mask"].sum(-1))
    assert int(c["condition_mask"].sum(-1)[0]) < int(a["condition_mask"].sum(-1)[0])
    assert a["condition_pixel_values"].shape == b["condition_pixel_values"].shape
    assert not torch.equal(a["condition_pixel_values"], b["condition_pixel_values"])
    assert torch.equal(a["target_pixel_values"], b["target_pixel_values"])


def test_janus_below_its_native_resolution_trains_and_reconstructs(make_args, tiny_janus, shapes):
    model, processor = tiny_janus
    trainer = RecATrainer(model, args=make_args(max_steps=2, condition_resolution=16), train_dataset=shapes,
                          processing_class=processor)  # fmt: skip
    batch = trainer.data_collator(_rows(shapes))
    assert int(batch["condition_mask"].sum(-1)[0]) == 4  # (16 / 8)^2 SigLIP patches instead of 16
    trainer.train()
    assert all(torch.isfinite(torch.tensor(log["reconstruction_loss"]))
               for log in trainer.state.log_history if "reconstruction_loss" in log)  # fmt: skip
    images = trainer.adapter.reconstruct([shapes[0]["image"]], views=trainer.data_collator.views, seed=0)
    assert images[0].size == (32, 32)
