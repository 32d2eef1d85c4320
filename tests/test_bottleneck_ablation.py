"""The guide's claim in miniature (slow): without a bottleneck a same-space model copies, and only then
does the collapse detector fire, for token targets and (--kind flow) for continuous ones. Runs
benchmarks/bottleneck_ablation.py."""

import csv
import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "bottleneck_ablation.py"


@pytest.mark.slow
def test_only_the_unbottlenecked_condition_collapses_and_is_detected(tmp_path):
    spec = importlib.util.spec_from_file_location("bottleneck_ablation", SCRIPT)
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    with pytest.warns(UserWarning, match="allow_shortcut=True"):
        rows = ablation.main(["--steps", "300", "--seeds", "0", "--output-dir", str(tmp_path)])
    by_condition = {row["condition"]: row for row in rows}
    floor = 0.1 * math.log(64)

    copying = by_condition["a_no_bottleneck"]
    assert copying["final_train_loss"] < floor and copying["final_held_out_loss"] < floor
    assert copying["swap_copy_rate"] > 0.8 and copying["detector_fired_at_step"] != ""

    for name in ("b_resize", "c_blur", "d_control_other_image"):
        row = by_condition[name]
        assert row["final_train_loss"] > 1.5 and row["final_held_out_loss"] > 1.5, row
        assert row["swap_copy_rate"] < 0.5 and row["detector_fired_at_step"] == "", row

    with open(tmp_path / "losses.csv") as handle:
        assert {r["condition"] for r in csv.DictReader(handle)} == set(by_condition)
    assert (tmp_path / "summary.csv").is_file() and (tmp_path / "bottleneck_ablation.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.xfail(
    reason="Known, not yet recalibrated: on this machine the copying model's loss reaches the detector's loss signal "
    "only at the last logged step of this 250-step run (final loss 0.4601, condition_gain 0.929; the same figures at "
    "1 and 2 threads, on main and on every branch), so the detector has no probe left to fire on; the documented "
    "400-step ablation copies (loss 0.26-0.30, condition_gain 0.96) but its other conditions then sit below this "
    "test's 1.5 bound. Both budgets need recalibrating together.",
    strict=False,
)
def test_only_the_same_space_flow_condition_copies_and_the_loss_probe_detects_it(tmp_path):
    """The continuous probe's calibration: a flow model whose condition is the target's own latents copies (its
    loss falls far below the others', its condition_gain crosses GAIN_THRESHOLD and nears 1, the detector fires);
    resized, blurred and another image's conditions stay below the threshold and are never flagged."""
    from reca_hf.callbacks import GAIN_THRESHOLD

    spec = importlib.util.spec_from_file_location("bottleneck_ablation", SCRIPT)
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    argv = ["--kind", "flow", "--steps", "250", "--seeds", "0", "--train-images", "512", "--held-out", "32",
            "--eval-every", "25", "--output-dir", str(tmp_path)]  # fmt: skip
    with pytest.warns(UserWarning, match="allow_shortcut=True"):
        rows = ablation.main(argv)
    by_condition = {row["condition"]: row for row in rows}
    others = [by_condition[name] for name in ("b_resize", "c_blur", "d_control_other_image")]

    copying = by_condition["a_no_bottleneck"]
    assert copying["final_train_loss"] < 0.5 * min(row["final_train_loss"] for row in others), rows
    assert copying["condition_gain"] > max(GAIN_THRESHOLD, 0.9) and copying["detector_fired_at_step"] != "", copying

    for row in others:
        assert row["max_probe_gain"] < GAIN_THRESHOLD - 0.2 and row["detector_fired_at_step"] == "", row
    assert by_condition["d_control_other_image"]["condition_gain"] < 0.1  # another image's condition: ignored

    with open(tmp_path / "probes.csv") as handle:
        assert {r["condition"] for r in csv.DictReader(handle)} == set(by_condition)
    assert (tmp_path / "summary.csv").is_file() and (tmp_path / "bottleneck_ablation.png").stat().st_size > 10_000
