"""Golden values: the first losses of a fixed-seed tiny Janus run.

They change when the tiny model, the prompts, the collator or the loss change on purpose. To regenerate:

    RECA_REGENERATE_GOLDEN=1 python -m pytest tests/test_golden.py

then commit tests/golden/janus_losses.json with a note on why they moved.
"""

import json
import os
from pathlib import Path

import pytest

from reca_hf import RecATrainer
from reca_hf.data import synthetic_shapes
from reca_hf.testing import tiny_umm

GOLDEN = Path(__file__).parent / "golden" / "janus_losses.json"


def test_first_losses_match_the_golden_values(make_args):
    model, processor = tiny_umm("janus", seed=0)
    args = make_args(max_steps=5, learning_rate=1e-3, lr_scheduler_type="constant", seed=0)
    trainer = RecATrainer(
        model, args=args, train_dataset=synthetic_shapes(16, size=32, seed=0), processing_class=processor
    )
    trainer.train()
    losses = [log["reconstruction_loss"] for log in trainer.state.log_history if "reconstruction_loss" in log]
    if os.environ.get("RECA_REGENERATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"janus": losses}, indent=2) + "\n")
    assert losses == pytest.approx(json.loads(GOLDEN.read_text())["janus"], abs=1e-4)
