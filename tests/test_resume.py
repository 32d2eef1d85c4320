"""Resuming: resume_from_checkpoint true|latest|PATH, resume_from_hub, and run totals that cover the whole run."""

from __future__ import annotations

import json
import time

import pytest
from transformers import TrainerCallback

from reca_hf import RecATrainer
from reca_hf.cli import main
from reca_hf.tasks import RECONSTRUCTION
from reca_hf.testing import tiny_umm

REPO = "loopback-user/tiny-resume"


class _Slow(TrainerCallback):
    """Each step takes at least ``seconds`` of wall time."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(self.seconds)


def _trainer(make_args, shapes, callbacks=None, **overrides):
    model, processor = tiny_umm("janus")
    values = dict(collapse_action="off", logging_steps=1, save_strategy="steps", save_steps=2)
    return RecATrainer(model, args=make_args(**{**values, **overrides}), train_dataset=shapes,
                       processing_class=processor, callbacks=callbacks)  # fmt: skip


def test_a_resumed_run_counts_samples_and_wall_time_of_both_parts(make_args, shapes, tmp_path):
    first = _trainer(make_args, shapes, max_steps=2, callbacks=[_Slow(0.5)])
    first.train()
    saved = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())
    first_seconds = saved["stateful_callbacks"]["RunTotals"]["attributes"]["seconds"]
    assert first_seconds >= 1.0 and first.task_counts[RECONSTRUCTION] == 8

    second = _trainer(make_args, shapes, max_steps=4)
    start = time.time()
    second.train(resume_from_checkpoint="latest")
    second_part = time.time() - start
    assert second.state.global_step == 4 and [log["step"] for log in second.state.log_history if "loss" in log] == [
        1, 2, 3, 4,
    ]  # fmt: skip
    assert second.task_counts[RECONSTRUCTION] == 16  # 4 steps x 4 samples, not only the resumed 2
    settings = second.run_settings()
    assert settings["task mix"] == "reconstruction 100% (16 samples)"
    wall = float(settings["wall time"].removesuffix(" s"))
    assert wall >= round(first_seconds + 0.9 * second_part) - 1 and second.run_totals.elapsed() >= first_seconds


def test_resume_from_checkpoint_true_latest_and_path_and_a_clear_error_without_one(make_args, shapes, tmp_path):
    run = tmp_path / "run"
    for value in ("true", "latest", True):
        trainer = _trainer(make_args, shapes, max_steps=1)
        with pytest.raises(ValueError, match=r"holds no checkpoint-N folder to resume from"):
            trainer.train(resume_from_checkpoint=value)
    with pytest.raises(ValueError, match=r"no such folder"):
        _trainer(make_args, shapes, max_steps=1).train(resume_from_checkpoint=str(run / "checkpoint-7"))
    _trainer(make_args, shapes, max_steps=2).train()
    resumed = _trainer(make_args, shapes, max_steps=3, save_strategy="no")
    resumed.train(resume_from_checkpoint=str(run / "checkpoint-2"))
    assert resumed.state.global_step == 3 and resumed.task_counts[RECONSTRUCTION] == 12


def test_reca_train_resume_from_checkpoint_true(tmp_path, capsys):
    flags = ["--model_name_or_path", "tiny:janus", "--dataset_name", "synthetic_shapes", "--max_train_samples", "8",
             "--output_dir", str(tmp_path / "run"), "--report_to", "none", "--num_reconstruction_images", "0",
             "--collapse_action", "off", "--save_strategy", "steps", "--save_steps", "1", "--logging_steps", "1",
             "--per_device_train_batch_size", "4"]  # fmt: skip
    with pytest.raises(SystemExit, match="holds no checkpoint-N folder"):
        main(["train", *flags, "--max_steps", "1", "--resume_from_checkpoint", "true"])
    main(["train", *flags, "--max_steps", "1"])
    main(["train", *flags, "--max_steps", "2", "--resume_from_checkpoint", "true"])
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and [log["step"] for log in state["log_history"] if "loss" in log] == [1, 2]
    run = json.loads((tmp_path / "run" / "reca_run.json").read_text())
    assert run["settings"]["task mix"] == "reconstruction 100% (8 samples)"


def test_resume_from_hub_downloads_the_pushed_checkpoint_and_continues(hub, make_args, shapes, tmp_path):
    pushed = _trainer(make_args, shapes, max_steps=2, push_to_hub=True, hub_model_id=REPO, hub_strategy="checkpoint")
    pushed.train()
    pushed._finish_current_push()
    assert "last-checkpoint/trainer_state.json" in hub.files(REPO)

    elsewhere = tmp_path / "elsewhere"
    resumed = _trainer(make_args, shapes, max_steps=4, output_dir=str(elsewhere), resume_from_hub=REPO)
    resumed.train()
    assert (elsewhere / "_resume_from_hub" / "last-checkpoint" / "model.safetensors").is_file()
    assert resumed.state.global_step == 4 and resumed.task_counts[RECONSTRUCTION] == 16
    assert [log["step"] for log in resumed.state.log_history if "loss" in log] == [1, 2, 3, 4]

    with pytest.raises(ValueError, match="holds no last-checkpoint/ or checkpoint-N/ folder"):
        hub.add_repo("loopback-user/empty", {"README.md": b"hello"})
        _trainer(make_args, shapes, max_steps=1, output_dir=str(tmp_path / "x"),
                 resume_from_hub="loopback-user/empty").train()  # fmt: skip


def test_latest_passes_over_a_checkpoint_a_full_disk_left_incomplete(make_args, shapes, tmp_path, caplog):
    """A save cut short (here: checkpoint-4 with its config but no weights, as a full disk leaves it) is not
    'latest': the run resumes from the complete checkpoint before it and says which folder it passed over."""
    import logging

    _trainer(make_args, shapes, max_steps=2).train()
    broken = tmp_path / "run" / "checkpoint-4"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    resumed = _trainer(make_args, shapes, max_steps=3, save_strategy="no")
    with caplog.at_level(logging.WARNING, logger="reca_hf"):
        resumed.train(resume_from_checkpoint="latest")
    assert resumed.state.global_step == 3 and resumed.task_counts[RECONSTRUCTION] == 12
    assert "checkpoint-4 is incomplete" in caplog.text
    (tmp_path / "run" / "checkpoint-2" / "trainer_state.json").unlink()  # now neither is complete
    with pytest.raises(ValueError, match=r"holds no checkpoint-N folder to resume from \(a complete one"):
        _trainer(make_args, shapes, max_steps=3).train(resume_from_checkpoint="latest")
