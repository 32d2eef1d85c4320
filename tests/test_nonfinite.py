"""Non-finite losses and gradients are never trained through silently (nonfinite_action), nor saved."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import TrainerCallback

from reca_hf import RecATrainer
from reca_hf.cli import main
from reca_hf.testing import tiny_umm
from reca_hf.trainer import NonFiniteLossError, NonFiniteWeightsError


def _trainer(make_args, shapes, **overrides):
    model, processor = tiny_umm("janus")
    values = dict(collapse_action="off", max_steps=4, logging_steps=1)
    return RecATrainer(model, args=make_args(**{**values, **overrides}), train_dataset=shapes,
                       processing_class=processor)  # fmt: skip


def _nan_loss_at(trainer, steps: set[int]) -> None:
    """Fault injection: the reconstruction loss is NaN while the trainer works on one of ``steps`` (1-based)."""
    loss = trainer.adapter.loss

    def faulty(model, batch, **kwargs):
        value = loss(model, batch, **kwargs)
        return value * float("nan") if trainer.state.global_step + 1 in steps else value

    trainer.adapter.loss = faulty


def _finite(module: torch.nn.Module) -> bool:
    return all(torch.isfinite(t).all() for t in module.state_dict().values() if t.is_floating_point())


class _Snapshot(TrainerCallback):
    """The weights and AdamW moments at the end of one step."""

    def __init__(self, step: int):
        self.step, self.weights, self.moments = step, None, None

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == self.step:
            self.weights = copy.deepcopy(model.state_dict())
            self.moments = copy.deepcopy(optimizer.state_dict()["state"])


def test_a_diverging_run_stops_before_the_step_and_keeps_the_last_good_checkpoint(make_args, shapes, tmp_path):
    trainer = _trainer(make_args, shapes, learning_rate=1e6, max_steps=8, save_strategy="steps", save_steps=1)
    with pytest.raises(NonFiniteLossError) as stopped:
        trainer.train()
    message = str(stopped.value)
    step = trainer.state.global_step + 1  # the step that was not taken
    assert f"stopped at step {step} before the optimizer step" in message
    assert "gradient norm is nan" in message and "lower learning_rate (now 1e+06" in message
    assert f"checkpoint-{step - 1}" in message
    assert _finite(trainer.model)  # the bad step was never applied
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("checkpoint-*"))[-1] == f"checkpoint-{step - 1}"
    for checkpoint in run.glob("checkpoint-*"):
        assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "model.safetensors").values())


def test_a_nan_task_loss_is_named_and_logged_as_nan(make_args, shapes, tmp_path):
    trainer = _trainer(make_args, shapes, nonfinite_action="skip")
    _nan_loss_at(trainer, {2})
    trainer.train()
    logs = {log["step"]: log for log in trainer.state.log_history if "loss" in log}
    assert math.isnan(logs[2]["loss"]) and math.isnan(logs[2]["reconstruction_loss"])  # never 0
    assert math.isfinite(logs[3]["loss"]) and math.isfinite(logs[4]["reconstruction_loss"])
    assert logs[2]["nonfinite_skipped_steps"] == 1
    trainer.save_state()
    trainer.create_model_card()
    run = json.loads((tmp_path / "run" / "reca_run.json").read_text())
    assert run["settings"]["non-finite steps skipped"] == 1
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    assert math.isnan(state["log_history"][1]["loss"])
    r, g, b = (
        np.asarray(Image.open(tmp_path / "run" / "training_loss.png").convert("RGB")).astype(int).transpose(2, 0, 1)
    )
    assert ((r > 245) & (g == b) & (g > 100) & (g < 160)).any()  # the step's red mark: not a gap in a clean curve

    stopping = _trainer(make_args, shapes)
    _nan_loss_at(stopping, {3})
    with pytest.raises(NonFiniteLossError, match=r"step 3 .*: reconstruction_loss not finite"):
        stopping.train()
    assert stopping.state.global_step == 2 and _finite(stopping.model)


def test_skip_leaves_weights_moments_and_schedule_exactly_as_they_were(make_args, shapes):
    snapshot = _Snapshot(step=2)
    trainer = _trainer(make_args, shapes, nonfinite_action="skip", max_nonfinite_steps=2, max_steps=8,
                       weight_decay=0.1, lr_scheduler_type="linear")  # fmt: skip
    trainer.add_callback(snapshot)
    _nan_loss_at(trainer, {3, 4, 5})
    with pytest.raises(NonFiniteLossError, match=r"step 5 .*more than max_nonfinite_steps=2"):
        trainer.train()
    assert trainer.state.global_step == 4
    for name, tensor in trainer.model.state_dict().items():  # weight decay alone would have changed them
        assert torch.equal(tensor, snapshot.weights[name]), name
    moments = trainer.optimizer.state_dict()["state"]
    for key, values in snapshot.moments.items():
        assert torch.equal(moments[key]["exp_avg"], values["exp_avg"])
    rates = [log["learning_rate"] for log in trainer.state.log_history if "learning_rate" in log]
    assert rates[1] > rates[2] == rates[3]  # the rate of each step: step 3, skipped, did not advance the schedule


def test_save_model_refuses_non_finite_weights(make_args, shapes, tmp_path):
    trainer = _trainer(make_args, shapes)
    with torch.no_grad():
        next(trainer.model.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match="NaN or inf values: 1 of"):
        trainer.save_model()
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_reca_train_with_a_huge_learning_rate_exits_naming_the_step_and_the_fix(tmp_path):
    with pytest.raises(SystemExit, match=r"^reca train: training stopped at step \d+ .*lower learning_rate") as failed:
        main(["train", "recipes/janus/tiny_demo.yaml", "--learning_rate", "1e6", "--warmup_steps", "0",
              "--max_steps", "20", "--output_dir", str(tmp_path / "run"), "--num_reconstruction_images", "0",
              "--collapse_action", "off", "--save_strategy", "no", "--max_train_samples", "16"])  # fmt: skip
    assert "nan" in str(failed.value)
    assert not (tmp_path / "run" / "model.safetensors").exists()
