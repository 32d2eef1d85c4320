"""The collapse detector's rule, its swap probe, and its wiring into the trainer."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import TrainerControl, TrainerState

from reca_hf import RecATrainer
from reca_hf.adapters import get_adapter
from reca_hf.callbacks import CollapseDetector, swap_probe
from reca_hf.images import ViewSpec
from reca_hf.testing import tiny_umm

COPYING = {"swap_copy_rate": 1.0, "swap_target_rate": 0.0}
HEALTHY = {"swap_copy_rate": 0.03, "swap_target_rate": 0.4}


def _run(detector, losses):
    """Drive the detector through the Trainer events it hooks: one logged loss per step, then that step's end.

    The probe's schedule is the detector's own (every ``probe_steps`` steps, and at once when the loss signal
    appears); returns the steps it probed at and the step it fired at.
    """
    state, control, probed = TrainerState(), TrainerControl(), []
    inner = detector.probe
    detector.probe = lambda model: probed.append(state.global_step) or inner(model)
    for step, loss in enumerate(losses, start=1):
        state.global_step = step
        detector.on_log(None, state, control, logs={"reconstruction_loss": loss})
        detector.on_step_end(None, state, control, model=None)
        if control.should_training_stop:
            break
    return probed, detector.fired_at_step


def _plateau_then(rng, tail, steps=40):
    return list(3.2 + 0.15 * rng.standard_normal(steps)) + list(tail)


def test_fires_on_a_collapsing_loss_with_a_copying_probe():
    rng = np.random.default_rng(0)
    losses = _plateau_then(rng, np.geomspace(3.0, 0.01, 15))
    detector = CollapseDetector(probe=lambda model: COPYING, uniform_loss=math.log(64), probe_steps=10)
    probed, fired = _run(detector, losses)
    assert fired is not None and 40 < fired <= len(losses)
    # Probed on schedule, and once more at the first log with the loss signal (not at the next tenth step).
    assert probed[:4] == [10, 20, 30, 40] and fired in probed and fired % 10 != 0
    assert losses[fired - 1] < 0.25 * 3.2 or losses[fired - 1] < 0.1 * math.log(64)
    assert detector.history[-1]["collapse_score"] == 1.0


def test_silent_on_a_noisy_plateau_even_if_the_probe_looks_bad():
    rng = np.random.default_rng(1)
    losses = list(3.2 + 0.4 * rng.standard_normal(300))
    detector = CollapseDetector(probe=lambda model: COPYING, uniform_loss=math.log(64), probe_steps=10)
    probed, fired = _run(detector, losses)
    assert fired is None and probed == list(range(10, 301, 10))
    assert not detector.loss_signal


def test_silent_on_a_memorising_run():
    """The training loss goes to zero, but held-out swaps are not copied: memorisation, not collapse."""
    rng = np.random.default_rng(2)
    losses = _plateau_then(rng, np.geomspace(3.0, 0.002, 60))
    detector = CollapseDetector(probe=lambda model: HEALTHY, uniform_loss=math.log(64), probe_steps=10)
    assert _run(detector, losses)[1] is None
    assert detector.loss_signal  # the loss alone would have been a false alarm


class _ScriptedAdapter:
    """Prepares each image as its own id and 'predicts' from the condition it is given or from its target."""

    default_instruction = ""

    def __init__(self, follows):
        self.follows = follows

    def prepare(self, conditions, targets, instructions):
        ids = lambda images: torch.tensor([[image.getpixel((0, 0))[0]] * 3 for image in images])  # noqa: E731
        return {"condition": ids(conditions), "target": ids(targets)}

    def target_logits(self, model, batch):
        predicted = batch["condition" if self.follows == "condition" else "target"]
        return torch.nn.functional.one_hot(predicted, 256).float(), batch["target"]


def test_swap_probe_counts_what_the_predictions_follow(shapes):
    views = ViewSpec(8, 8)
    images = [Image.new("RGB", (8, 8), (value, 0, 0)) for value in (10, 20, 30, 20)]  # images 1 and 3 agree
    model = torch.nn.Linear(1, 1)
    copying = swap_probe(_ScriptedAdapter("condition"), model, images, views)
    assert copying == {"swap_copy_rate": 1.0, "swap_target_rate": 0.0, "own_accuracy": 1.0}
    healthy = swap_probe(_ScriptedAdapter("target"), model, images, views)
    assert healthy == {"swap_copy_rate": 0.0, "swap_target_rate": 1.0, "own_accuracy": 1.0}
    with pytest.raises(ValueError, match="at least two"):
        swap_probe(_ScriptedAdapter("target"), model, images[:1], views)


def test_swap_probe_on_a_real_model_gives_back_every_training_flag(shapes):
    """The probe runs in eval mode, then each module gets its own flag back: a frozen image tokenizer kept in eval
    mode inside a training model stays so (a whole-model train() would switch a BatchNorm VQ to batch statistics)."""
    model, processor = tiny_umm("janus")
    adapter = get_adapter(model, processor)
    model.train()
    model.model.vqmodel.eval()
    result = swap_probe(adapter, model, [shapes[i]["image"] for i in range(4)], adapter.default_views())
    assert set(result) == {"swap_copy_rate", "swap_target_rate", "own_accuracy"}
    assert model.training and model.model.language_model.training and not model.model.vqmodel.training


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


def test_the_probe_rides_on_the_next_regular_log_instead_of_forcing_one(make_args, tiny_janus, shapes):
    model, processor = tiny_janus
    trainer = RecATrainer(model, args=make_args(max_steps=4, logging_steps=2, collapse_probe_steps=1,
                          collapse_probe_images=4), train_dataset=shapes, processing_class=processor)  # fmt: skip
    trainer.train()
    history = trainer.state.log_history
    assert [log["step"] for log in history if "loss" in log] == [2, 4]  # no extra one-step points in the loss curve
    assert len(trainer.collapse_detector.history) == 4  # probed at every step, logged with the next log
    assert all("collapse_score" in log for log in history if "loss" in log)
    assert not [log for log in history if "collapse_score" in log and "loss" not in log and "train_loss" not in log]


def test_a_derived_condition_warns_once_and_is_probed_twice_as_often(make_args, shapes, monkeypatch, caplog):
    """condition_relation "derived" (a trainable encoder over the target's own latents, as Harmon) is trained, with
    a WARNING naming the adapter and a collapse probe at half the interval; a separate condition keeps it."""
    import logging

    from reca_hf import RecATrainer
    from reca_hf.adapters import FlowLatentsAdapter, registry
    from reca_hf.testing import tiny_umm

    class DerivedFlow(FlowLatentsAdapter):
        name = "derived_flow"
        condition_relation = "derived"

    monkeypatch.setattr(registry, "_REGISTRY", {"derived_flow": DerivedFlow, **registry._REGISTRY})
    model, processor = tiny_umm("flow_latents")
    args = make_args(max_steps=1, collapse_probe_steps=10, collapse_probe_images=2)
    with caplog.at_level(logging.WARNING, logger="reca_hf"):
        trainer = RecATrainer(model, args=args, train_dataset=shapes, processing_class=processor)
    assert type(trainer.adapter) is DerivedFlow and trainer.collapse_detector.probe_steps == 5
    records = {id(r): r for r in caplog.records if "derives its condition" in r.getMessage()}  # one per handler
    assert len(records) == 1
    (record,) = records.values()
    message = record.getMessage()
    assert record.levelno == logging.WARNING and "derived_flow" in message and "every 5 steps instead of 10" in message
    caplog.clear()
    model, processor = tiny_umm("flow")
    with caplog.at_level(logging.WARNING, logger="reca_hf"):
        separate = RecATrainer(model, args=args, train_dataset=shapes, processing_class=processor)
    assert separate.collapse_detector.probe_steps == 10
    assert not [r for r in caplog.records if "derives its condition" in r.getMessage()]


def test_the_sharded_path_probes_and_draws_the_grid_through_the_wrapped_forward(make_args, tiny_janus, shapes,
                                                                               monkeypatch, tmp_path):  # fmt: skip
    """Under FSDP and DeepSpeed (simulated: RecATrainer.is_sharded) the detector and the grid stay on, and their
    forward passes go through RecATrainer.sharded_forward, inside the wrapped model's own forward (where FSDP
    gathers parameters): the grid is written and the probe readings logged as in a plain run."""
    monkeypatch.setattr(RecATrainer, "is_sharded", property(lambda self: True))
    model, processor = tiny_janus
    args = make_args(max_steps=2, collapse_probe_steps=2, collapse_probe_images=4, num_reconstruction_images=2,
                     reconstruction_kwargs={"guidance_scale": 1.0})  # fmt: skip
    trainer = RecATrainer(model, args=args, train_dataset=shapes, processing_class=processor)
    grid = next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "ReconstructionGridCallback")
    assert trainer.collapse_detector.sharded_forward == trainer.sharded_forward == grid.sharded_forward
    calls = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    trainer.train()
    # One probe and three grid passes (start, tokenizer round trip, end), each one call of the model with no inputs:
    # their work ran inside the model's own forward, as a sharded model needs.
    assert sum(1 for args, kwargs in calls if not args and not kwargs) == 4
    assert (tmp_path / "run" / "reconstructions.png").is_file()
    assert [log["step"] for log in trainer.state.log_history if "collapse_score" in log] == [2]


def test_the_detector_is_never_switched_off_silently(make_args, tiny_janus, shapes, caplog):
    model, processor = tiny_janus
    with caplog.at_level("WARNING", logger="reca_hf.trainer"):
        trainer = RecATrainer(model, args=make_args(collapse_probe_images=1), train_dataset=shapes,
                              processing_class=processor)  # fmt: skip
    assert trainer.collapse_detector is None
    assert "Collapse detector off: collapse_probe_images=1" in caplog.text and "at least two" in caplog.text
    detector = CollapseDetector(adapter=get_adapter(model, processor), views=trainer.views,
                                probe_images=[shapes[i]["image"] for i in range(2)], probe_steps=1)  # fmt: skip
    state, control = TrainerState(), TrainerControl()
    state.global_step = 1
    with caplog.at_level("WARNING", logger="reca_hf.callbacks"):
        detector.on_step_end(None, state, control, model=None)
        detector.on_step_end(None, state, control, model=None)
    skipped = [r for r in caplog.records if r.getMessage().startswith("Collapse probe skipped at step 1")]
    assert len({id(record) for record in skipped}) == 1 and detector.history == []  # said once, at WARNING


def test_a_loss_probe_reading_is_named_for_what_it_measures(tmp_path, monkeypatch):
    """A flow or diffusion model's probe reading rises as RecA works (the model uses its condition): it is logged,
    plotted and described as condition_gain, not as a collapse score that reads like an alarm (collapse_score, its
    older name, stays in the logs for the dashboards that read it)."""
    import contextlib

    import reca_hf.hub as hub

    detector = CollapseDetector(probe=lambda model: {}, uniform_loss=1.0)
    healthy = {"condition_gain": 0.36, "swap_own_loss": 0.64, "swap_other_loss": 1.0}
    assert not detector.observe_probe(200, healthy)
    assert detector.pop_metrics() == {"collapse_score": 0.36, **healthy}  # the older name kept for dashboards
    described = detector.describe()
    assert described["metric"] == "condition_gain" and "use of the condition" in described["label"]
    labels, plot = [], hub._step_plot

    @contextlib.contextmanager
    def recording(*args):
        with plot(*args) as axes:
            yield axes
            labels.extend(axes.get_legend_handles_labels()[1])

    monkeypatch.setattr(hub, "_step_plot", recording)
    assert hub.write_probe_plot([{"step": 200, **healthy}], tmp_path / "probe.png", described).is_file()
    assert labels[0] == "condition_gain: use of the condition (RecA raises it)"  # the line says what it measures
    token = CollapseDetector(probe=lambda model: HEALTHY)
    token.observe_probe(200, HEALTHY)
    assert token.pop_metrics()["collapse_score"] == 0.03 and "copying" in token.describe()["label"]
