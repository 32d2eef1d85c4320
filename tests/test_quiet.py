"""Quiet by default: reca_hf's log lines under its own name, no pin_memory warning on the CPU, PEFT's note on a base
config it cannot read once per run, and an error that starts on its own line even when a progress bar was running."""

import logging
import warnings

import pytest

from reca_hf import RecATrainer
from reca_hf.testing import tiny_umm


def test_reca_log_lines_carry_reca_hfs_name(make_args, shapes, capfd):
    model, processor = tiny_umm("janus")
    RecATrainer(model, args=make_args(collapse_action="off"), train_dataset=shapes, processing_class=processor)
    logging.getLogger("reca_hf.trainer").warning("a line of reca_hf's own")
    err = capfd.readouterr().err
    assert "[reca_hf] a line of reca_hf's own" in err and "[transformers] a line of reca_hf's own" not in err
    handlers = [h for h in logging.getLogger("reca_hf").handlers if h.get_name() == "reca_hf"]
    assert len(handlers) == 1  # once, however many trainers were built


def test_no_pin_memory_warning_on_the_cpu(make_args, shapes):
    model, processor = tiny_umm("janus")
    args = make_args(collapse_action="off", max_steps=1, dataloader_pin_memory=True)
    trainer = RecATrainer(model, args=args, train_dataset=shapes, processing_class=processor)
    assert trainer.args.dataloader_pin_memory is False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "pin_memory" in str(w.message)]


def test_an_error_closes_the_progress_bars_first():
    from tqdm.auto import tqdm

    from reca_hf.cli import main

    bar = tqdm(total=10)
    bar.update(3)
    with pytest.raises(SystemExit, match="reca: "):
        main(["train", "--model_name_or_path", "tiny:nosuch", "--dataset_name", "synthetic_shapes", "--report_to",
              "none", "--output_dir", "/tmp/reca-quiet-test"])  # fmt: skip
    assert bar.disable or bar not in getattr(tqdm, "_instances", ())


def test_peft_says_it_cannot_read_the_base_config_once_per_run(make_args, shapes):
    """PEFT notes at every save of an adapter whose base config it cannot read (here a 'tiny:' spec) that it
    assumes an unchanged vocabulary: two checkpoints and the final save said it three times, now once."""
    args = make_args(collapse_action="off", max_steps=4, use_peft=True, save_strategy="steps", save_steps=2)
    trainer = RecATrainer("tiny:janus", args=args, train_dataset=shapes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
        trainer.save_model()
    notes = [w for w in caught if "Could not find a config file in tiny:janus" in str(w.message)]
    assert len(notes) == 1
