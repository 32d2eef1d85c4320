"""Did understanding hold? Reconstruction alone versus reconstruction mixed 1:1 with image-to-text.

Janus shares one language model between understanding and generation. Two runs train the same tiny
random Janus for the same steps on synthetic shapes through `RecATrainer`:

    reconstruction only        task_ratios {"reconstruction": 1}
    reconstruction + i2t 1:1   task_ratios {"reconstruction": 1, "image_to_text": 1} (captions of other shapes)

Each run evaluates held-out image-caption pairs before training (step 0) and at the end, so the drift of
the image-to-text loss is one subtraction away. A random tiny model starts with no understanding to lose,
so the "before" loss is that of an untrained text head; what the comparison shows is whether the run
moves the shared model's captioning toward or away from the held-out captions.

    python benchmarks/understanding_drift.py                 # 2 runs x 300 steps (~1-2 min on 2 cores)
    python benchmarks/understanding_drift.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from reca_hf import RecAConfig, RecATrainer
from reca_hf.data import synthetic_shapes
from reca_hf.testing import tiny_umm

MIXES = {
    "reconstruction only": {"reconstruction": 1},
    "reconstruction + i2t 1:1": {"reconstruction": 1, "image_to_text": 1},
}


def run(mix: str, *, steps: int, seed: int, output_dir: Path) -> dict:
    model, processor = tiny_umm("janus", seed=seed)
    images = synthetic_shapes(256, size=32, seed=seed).remove_columns("caption")
    captions = synthetic_shapes(256, size=32, seed=seed + 1000)  # other shapes, with captions
    held_out = synthetic_shapes(64, size=32, seed=seed + 2000)
    args = RecAConfig(
        output_dir=str(output_dir / f"{len(MIXES[mix])}-{seed}"),
        max_steps=steps,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=32,
        learning_rate=2e-3,
        lr_scheduler_type="constant",
        logging_steps=25,
        eval_strategy="steps",
        eval_steps=steps,
        save_strategy="no",
        report_to="none",
        dataloader_pin_memory=False,
        disable_tqdm=True,
        num_reconstruction_images=0,
        collapse_action="off",
        task_ratios=MIXES[mix],
        seed=seed,
    )
    i2t = captions if "image_to_text" in MIXES[mix] else None
    trainer = RecATrainer(model, args=args, train_dataset=images, i2t_dataset=i2t, eval_dataset=held_out,
                          processing_class=processor)  # fmt: skip
    start = time.time()
    trainer.train()
    evals = [log for log in trainer.state.log_history if "eval_image_to_text_loss" in log]
    before, after = evals[0], evals[-1]
    return {
        "mix": mix,
        "seed": seed,
        "steps": steps,
        "i2t_before": before["eval_image_to_text_loss"],
        "i2t_after": after["eval_image_to_text_loss"],
        "reconstruction_before": before["eval_reconstruction_loss"],
        "reconstruction_after": after["eval_reconstruction_loss"],
        "seconds": time.time() - start,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    options = parser.parse_args(argv)
    rows = []
    logging.getLogger("reca_hf.trainer").setLevel(logging.ERROR)  # the shared-LLM warning is the point here
    with tempfile.TemporaryDirectory() as scratch:
        for seed in options.seeds:
            for mix in MIXES:
                rows.append(run(mix, steps=options.steps, seed=seed, output_dir=Path(scratch)))
    print("| mix | seed | steps | held-out i2t loss before | after | change | held-out reconstruction before | after |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mix']} | {r['seed']} | {r['steps']} | {r['i2t_before']:.3f} | {r['i2t_after']:.3f} | "
              f"{r['i2t_after'] - r['i2t_before']:+.3f} | {r['reconstruction_before']:.3f} | "
              f"{r['reconstruction_after']:.3f} |")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
