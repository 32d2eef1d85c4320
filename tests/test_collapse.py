"""The collapse detector's rule, its swap probe, and its wiring into the trainer."""

import math

import numpy as np
import pytest

from reca_hf import RecACollator, RecATrainer
from reca_hf.adapters import get_adapter
from reca_hf.callbacks import CollapseDetector, swap_probe
from reca_hf.testing import tiny_umm

COPYING = {"swap_copy_rate": 1.0, "swap_target_rate": 0.0}
HEALTHY = {"swap_copy_rate": 0.03, "swap_target_rate": 0.4}


def _run(detector, losses, probe_result, probe_every=10):
    """Feed logged losses (one per step) and probe every ``probe_every`` steps or when the loss signal appears."""
    for step, loss in enumerate(losses, start=1):
        detector.observe_loss(step, loss)
        if detector._probe_due or step % probe_every == 0:
            detector._probe_due = False
            detector.observe_probe(step, probe_result)
    return detector.fired_at_step


def _plateau_then(rng, tail, steps=40):
    return list(3.2 + 0.15 * rng.standard_normal(steps)) + list(tail)


def test_fires_on_a_collapsing_loss_with_a_copying_probe():
    rng = np.random.default_rng(0)
    losses = _plateau_then(rng, np.geomspace(3.0, 0.01, 15))
    detector = CollapseDetector(probe=lambda model: COPYING, uniform_loss=math.log(64))
    fired = _run(detector, losses, COPYING)
    assert fired is not None and 40 < fired <= len(losses)
    assert losses[fired - 1] < 0.25 * 3.2 or losses[fired - 1] < 0.1 * math.log(64)
    assert detector.history[-1]["collapse_score"] == 1.0


def test_silent_on_a_noisy_plateau_even_if_the_probe_looks_bad():
    rng = np.random.default_rng(1)
    losses = list(3.2 + 0.4 * rng.standard_normal(300))
    detector = CollapseDetector(probe=lambda model: COPYING, uniform_loss=math.log(64))
    assert _run(detector, losses, COPYING) is None
    assert not detector.loss_signal


def test_silent_on_a_memorising_run():
    """The training loss goes to zero, but held-out swaps are not copied: memorisation, not collapse."""
    rng = np.random.default_rng(2)
    losses = _plateau_then(rng, np.geomspace(3.0, 0.002, 60))
    detector = CollapseDetector(probe=lambda model: HEALTHY, uniform_loss=math.log(64))
    assert _run(detector, losses, HEALTHY) is None
    assert detector.loss_signal  # the loss alone would have been a false alarm


def test_swap_probe_on_a_real_model_counts_only_differing_tokens(shapes):
    model, processor = tiny_umm("janus")
    adapter = get_adapter(model, processor)
    views = RecACollator(adapter).views
    result = swap_probe(adapter, model, [shapes[i]["image"] for i in range(4)], views)
    assert set(result) == {"swap_copy_rate", "swap_target_rate", "own_accuracy"}
    assert all(0.0 <= value <= 1.0 for value in result.values())
    assert result["swap_copy_rate"] + result["swap_target_rate"] <= 1.0
    with pytest.raises(ValueError, match="at least two"):
        swap_probe(adapter, model, [shapes[0]["image"]], views)


def test_trainer_logs_the_probe_by_default(make_args, tiny_janus, shapes):
    model, processor = tiny_janus
    trainer = RecATrainer(model, args=make_args(max_steps=4, collapse_probe_steps=2, collapse_probe_images=4),
                          train_dataset=shapes, processing_class=processor)  # fmt: skip
    assert isinstance(trainer.collapse_detector, CollapseDetector)
    trainer.train()
    probed = [log for log in trainer.state.log_history if "collapse_score" in log]
    assert [log["step"] for log in probed] == [2, 4]
    assert all({"swap_copy_rate", "swap_target_rate"} <= set(log) for log in probed)
    assert trainer.collapse_detector.fired_at_step is None
    off = RecATrainer(tiny_umm("janus")[0], args=make_args(collapse_action="off"), train_dataset=shapes,
                      processing_class=processor)  # fmt: skip
    assert off.collapse_detector is None


def test_collapse_action_stop_saves_a_checkpoint_and_ends_training(make_args, tiny_janus, shapes, tmp_path, caplog):
    model, processor = tiny_janus
    detector = CollapseDetector(probe=lambda model: COPYING, uniform_loss=1000.0, action="stop", probe_steps=1000)
    trainer = RecATrainer(model, args=make_args(max_steps=20, save_strategy="no"), train_dataset=shapes,
                          processing_class=processor, callbacks=[detector])  # fmt: skip
    assert trainer.collapse_detector is detector
    with caplog.at_level("WARNING", logger="reca_hf.callbacks"):
        trainer.train()
    # The loss signal (below 0.1 x 1000) appears at the first log (step 1); the probe runs at the next step end.
    assert detector.fired_at_step == 2 and trainer.state.global_step == 2
    assert (tmp_path / "run" / "checkpoint-2").is_dir()
    assert "collapse detected at step 2" in caplog.text and "condition_resolution" in caplog.text


def test_detector_argument_errors():
    with pytest.raises(ValueError, match="action"):
        CollapseDetector(probe=lambda model: COPYING, action="explode")
    with pytest.raises(ValueError, match="probe_images"):
        CollapseDetector()
