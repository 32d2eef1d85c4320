"""Harmon's derived condition in miniature: the authors' setting against a half-resolution condition and against a
1.0 gradient scale, on the tiny Harmon, measured as the bottleneck ablation measures (the loss, the loss-based
condition-swap probe's ``condition_gain``, the collapse detector).

The authors give Harmon no resolution bottleneck: its condition is the target's own latents through the trainable
MAR encoder, whose gradient from the understanding path is scaled by 0.1. Three runs train the same tiny model on
the same 8 synthetic-shape images (reconstruction only, prompt dropout 0.1, the adapter's MAR masking and diffusion
loss; 1200 steps of 8 at a constant lr 1e-3), held out: 16 other images:

    authors      condition at the target's 64 px (4 x 4 tokens), gradient x 0.1
    half_res     condition at 32 px (2 x 2 tokens), gradient x 0.1
    grad_1       condition at 64 px, gradient x 1.0

The tiny VAE is random and its latents are small (std ~0.05 after the 0.2325 scaling), where the diffusion loss
barely needs any condition; each run rescales them to unit std (the VAE's ``scaling_factor``, measured on the
training images), as 0.2325 does for the real kl16 on real images. Few images, many steps: on more images the tiny
model never read its condition (every gain below 2e-5: 512 images for 300 steps; 64 images for 400 steps with a
128-wide 3-block diffusion head and a 64-wide decoder; 64 images for 1200 steps at lr 3e-3 with a 64-wide 3-layer
decoder and the LLM initialised at std 0.2). Its random LLM passes almost nothing of the condition on (at
initialisation a swapped condition moves the LLM's states at the generation tokens by 0.24%) and synthetic shapes
are easy to denoise without it; on 8 images it learns to read the condition of the images it trains on.

    python benchmarks/harmon_derived.py        # 3 runs x 1200 steps, seed 0 (~15 min on 2 shared cores)

Columns: ``condition_gain`` (``1 - own / swapped`` loss of the probe after training) on the held-out images, as the
detector reads it; ``train-image gain`` the same probe on the 8 training images; ``max probe gain`` the detector's
highest held-out reading (every 50 steps); ``last loss`` the mean of the last 4 logged training losses. Writes
``benchmarks/results/harmon_derived.{json,md}`` (``--out`` elsewhere, ``--out ''`` for none).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from reca_hf import RecAConfig, RecATrainer
from reca_hf.adapters import get_adapter
from reca_hf.callbacks import condition_swap_loss
from reca_hf.data import synthetic_shapes
from reca_hf.images import to_tensor
from reca_hf.testing import tiny_umm

RESULTS = Path(__file__).parent / "results"
COLUMNS = (
    "condition_gain: 1 - own / swapped loss of the condition-swap probe after training, on the held-out images (as the "
    "detector reads it); train-image gain: the same on the training images; max probe gain: the detector's highest "
    "held-out reading (every 50 steps); last loss: the mean of the last 4 logged training losses."
)
SETTINGS = {"authors": (64, 0.1), "half_res": (32, 0.1), "grad_1": (64, 1.0)}


def unit_scaling(model, adapter, images) -> float:
    """The VAE scaling factor that gives the training images' latents unit std."""
    views = adapter.default_views()
    pixels = to_tensor([views.target_view(image) for image in images], (0.5,) * 3, (0.5,) * 3)
    with torch.no_grad():
        std = float(model.encode_latents(pixels).std())
    return model.vae.config.scaling_factor / std


def run(
    name: str, *, steps: int, seed: int, train_images: int, held_out: int, batch_size: int, lr: float, output_dir: Path
):
    resolution, grad_scale = SETTINGS[name]
    model, tokenizer = tiny_umm("harmon", seed=seed)
    data = synthetic_shapes(train_images + held_out, size=64, seed=seed)
    train = data.select(range(train_images)).remove_columns("caption")
    held = data.select(range(train_images, train_images + held_out)).remove_columns("caption")
    model.vae.register_to_config(scaling_factor=unit_scaling(model, get_adapter(model, tokenizer), train["image"][:64]))
    args = RecAConfig(
        output_dir=str(output_dir / f"{name}-seed{seed}"), max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=lr, lr_scheduler_type="constant", weight_decay=0.0, logging_steps=25, save_strategy="no",
        report_to="none", dataloader_pin_memory=False, disable_tqdm=True, num_reconstruction_images=0,
        condition_resolution=resolution, collapse_probe_steps=100, seed=seed,
    )  # fmt: skip
    trainer = RecATrainer(model, args=args, train_dataset=train, eval_dataset=held, processing_class=tokenizer)
    trainer.adapter.grad_scale = grad_scale
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    losses = [log["reconstruction_loss"] for log in trainer.state.log_history if "reconstruction_loss" in log]
    probe = condition_swap_loss(trainer.adapter, model, list(held["image"]), trainer.views)
    seen = condition_swap_loss(trainer.adapter, model, list(train["image"][:held_out]), trainer.views)
    detector = trainer.collapse_detector
    return {
        "setting": name, "condition px": resolution, "grad scale": grad_scale, "first loss": losses[0],
        "last loss": sum(losses[-4:]) / len(losses[-4:]), "condition_gain": probe["condition_gain"],
        "train-image gain": seen["condition_gain"],
        "max probe gain": max((h.get("condition_gain", 0.0) for h in detector.history), default=0.0),
        "detector fired at": detector.fired_at_step, "seconds": seconds,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--train-images", type=int, default=8)
    parser.add_argument("--held-out", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", default=str(RESULTS), help="folder for harmon_derived.json/.md ('' for none)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        results = [
            run(name, steps=args.steps, seed=args.seed, train_images=args.train_images, held_out=args.held_out,
                batch_size=args.batch_size, lr=args.lr, output_dir=Path(folder))
            for name in args.settings
        ]  # fmt: skip
    columns = list(results[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in results:
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        command = "python benchmarks/harmon_derived.py " + " ".join(argv if argv is not None else sys.argv[1:])
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "harmon_derived.json").write_text(
            json.dumps({"command": command.strip(), "results": results}, indent=2) + "\n"
        )
        (folder / "harmon_derived.md").write_text(
            f"# Harmon's derived condition in miniature\n\nCommand: `{command.strip()}` (2 shared CPU cores).\n\n{table}\n\n"
            f"{COLUMNS}\n"
        )
    return results


if __name__ == "__main__":
    main()
