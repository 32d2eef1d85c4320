"""Run by tests/test_distributed.py on 2 CPU processes (accelerate launch, multi_cpu, gloo): RecATrainer runs with
the tiny flow model and a collapse detector whose default loss probe (condition_swap_loss, through the model) is
made to fire at its first probe (uniform_loss 1000 puts the loss signal on at the first log; a gain threshold of -1
is met by any model). Mode ``rank0``: the plain DDP path (rank 0 probes, every rank acts on its reading). Mode
``every_rank``: the sharded path, every rank probing through RecATrainer.sharded_forward (here through the DDP
wrapper's forward, since accelerate shards nothing on CPUs). For each mode given, each rank writes what it saw to ``OUT/<mode><N>.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from accelerate import PartialState

from reca_hf import RecAConfig, RecATrainer
from reca_hf.adapters import get_adapter
from reca_hf.callbacks import CollapseDetector
from reca_hf.data import synthetic_shapes
from reca_hf.testing import tiny_umm


def main(out: Path, mode: str) -> None:
    model, processor = tiny_umm("flow")
    adapter = get_adapter(model, processor)
    shapes = synthetic_shapes(16, size=32, seed=0)
    detector = CollapseDetector(adapter, adapter.default_views(), synthetic_shapes(4, size=32, seed=5)["image"],
                                action="stop", probe_steps=1000, uniform_loss=1000.0, gain_threshold=-1.0)  # fmt: skip
    probed = []
    probe = detector.probe
    detector.probe = lambda model: probed.append(1) or probe(model)  # count this rank's own probe runs
    args = RecAConfig(output_dir=str(out / mode), per_device_train_batch_size=2, max_steps=6, logging_steps=1,
                      save_strategy="no", report_to=[], num_reconstruction_images=0, disable_tqdm=True,
                      learning_rate=1e-3, seed=0)  # fmt: skip
    trainer = RecATrainer(model, args=args, train_dataset=shapes, processing_class=processor, callbacks=[detector])
    if mode == "every_rank":
        detector.sharded_forward = trainer.sharded_forward
    trainer.train()
    logged = [log for log in trainer.state.log_history if "condition_gain" in log]
    record = {"fired_at_step": detector.fired_at_step, "global_step": trainer.state.global_step,
              "own_probes": len(probed), "history": detector.history, "logged": logged,
              "processes": trainer.accelerator.num_processes}  # fmt: skip
    rank = trainer.accelerator.process_index
    (out / f"{mode}{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    for mode in sys.argv[2:]:
        main(Path(sys.argv[1]), mode)
    # An orderly end: a process group left to the interpreter's exit can abort a rank while gloo's threads are torn
    # down ("terminate called without an active exception", seen once in about six runs of the two trainers here).
    PartialState().wait_for_everyone()
    PartialState().destroy_process_group()
