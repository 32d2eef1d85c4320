"""Why the bottleneck: RecA's copy-and-paste collapse, reproduced in miniature on a tiny random Emu3 (token
targets), on a tiny flow-matching UMM (continuous targets, ``--kind flow``) and on a tiny Show-o (masked tokens,
``--kind showo``: the guide's own collapse example).

Emu3 reads its condition and writes its target in one representation (VQ ids of one codebook). Four
runs train the same tiny model on the same synthetic shapes for the same steps, through `RecATrainer`:

    a  condition at the target resolution, no bottleneck (the guard opted out with allow_shortcut=True)
    b  condition resized to half the side (the default, condition_resolution="auto")
    c  condition blurred: downscaled 4x and upscaled back (same token count, less information)
    d  control: every condition is another image's (at full resolution: no information about the target)

Expected (the RecA authors' warning): (a) falls toward zero within a few hundred steps and, given another
image's condition, predicts that image's codes (it copies); (b), (c) and (d) stay near their plateau;
the collapse detector fires on (a) only.

``--kind flow`` runs the same four conditions on ``tiny_umm("flow_latents")``: its condition is the target's own
autoencoder latents (8x8x4 at 32 px), read by the language model and handed to the SANA transformer both
through the learnable queries and on its latent grid. Its loss is the flow-matching velocity error, so the
copy is read by the loss-based probe, ``condition_swap_loss``: ``condition_gain = 1 - own / swapped`` on
held-out images. This run calibrates the detector's ``GAIN_THRESHOLD``: (a) must cross it, the others not.

``--kind showo`` runs them on ``tiny_umm("showo")`` (VQ variant, 64-px targets: 16 MAGVIT-v2 codes from 256):
condition and target are codes of one tokenizer in one vocabulary, as Emu3's, but the target is predicted by
masked-token prediction (bidirectional over the target), so the token probe reads an all-masked target. The
condition views are made the authors' way, from the target tensor (bilinear; the blur 4x down and back up).
Both probes are reported: the token probe's copy rate and the loss-based probe's condition gain.
``--single-instruction`` trains with the probes' instruction only: Show-o's instruction sits between condition
and target, so varied instructions move the condition's offset from the target, and the copy then takes the
tiny model about 1300 steps to find instead of about 150.

Writes to --output-dir: losses.csv (train and held-out loss per logged step), summary.csv (final losses,
the detector's firing step, the final swap-probe reading; showo also as summary.json and summary.md),
probes.csv (flow: every detector probe, its step and gain) and bottleneck_ablation.png (the curves, the firing
step marked; flow and showo: the detector's probe readings).

    python benchmarks/bottleneck_ablation.py                  # 4 runs x 400 steps, seed 0 (~2-4 min on 2 cores)
    python benchmarks/bottleneck_ablation.py --seeds 0 1 2    # the figures in docs/method.md
    python benchmarks/bottleneck_ablation.py --kind flow --seeds 0 1 2   # the flow figures (~3-4 min a seed)
    python benchmarks/bottleneck_ablation.py --kind showo --single-instruction --steps 300 --lr 3e-3 \
        --eval-every 50 --held-out 32 --seeds 0 1 2           # the Show-o figures (~12 min a seed on 2 cores)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import math
import tempfile
import time
from pathlib import Path

import torch

from reca_hf import RecACollator, RecAConfig, RecATrainer
from reca_hf.adapters import get_adapter
from reca_hf.callbacks import condition_swap_loss, swap_probe
from reca_hf.data import synthetic_shapes
from reca_hf.testing import tiny_umm


def conditions(side: int) -> dict[str, dict]:
    """The four settings for targets of ``side`` px (the conditions a, c and d at the target's own side)."""
    return {
        "a_no_bottleneck": {"condition_resolution": side, "condition_bottleneck": "none", "allow_shortcut": True},
        "b_resize": {"condition_resolution": "auto", "condition_bottleneck": "resize"},
        "c_blur": {"condition_resolution": side, "condition_bottleneck": "blur", "blur_factor": 4},
        "d_control_other_image": {"condition_resolution": side, "condition_bottleneck": "none", "allow_shortcut": True},
    }


CONDITIONS = conditions(32)
CONTROL = "d_control_other_image"
ARCH = {"tokens": "emu3", "flow": "flow_latents", "showo": "showo"}
SIDE = {"tokens": 32, "flow": 32, "showo": 64}  # each tiny model's generation resolution
TITLE = {"tokens": "Tiny Emu3", "flow": "Tiny flow UMM", "showo": "Tiny Show-o"}


class OtherImageCollator(RecACollator):
    """The control: each example's condition view is the next example's (within the batch)."""

    def _reconstruction(self, examples):
        batch = super()._reconstruction(examples)
        batch["condition_pixel_values"] = batch["condition_pixel_values"].roll(1, dims=0)
        return batch


def run(name: str, *, steps: int, seed: int, train_images: int, held_out: int, batch_size: int, lr: float,
        eval_every: int, output_dir: Path, kind: str = "tokens", single_instruction: bool = False) -> dict:  # fmt: skip
    """Train one condition; returns its loss curves, the detector's firing step and probe readings, and the
    final swap probe (token agreement, or for ``kind="flow"`` the loss-based condition gain)."""
    side = SIDE[kind]
    settings = conditions(side)[name]
    model, processor = tiny_umm(ARCH[kind], seed=seed)
    data = synthetic_shapes(train_images + held_out, size=side, seed=seed)
    train = data.select(range(train_images)).remove_columns("caption")
    held = data.select(range(train_images, train_images + held_out)).remove_columns("caption")
    prompt_templates = "default"
    if single_instruction:  # the probes' instruction, and only it: the condition sits at one offset from the target
        prompt_templates = output_dir / f"{name}-seed{seed}-instruction.json"
        prompt_templates.parent.mkdir(parents=True, exist_ok=True)
        prompt_templates.write_text(json.dumps([get_adapter(model, processor).default_instruction]))
    args = RecAConfig(
        output_dir=str(output_dir / f"{name}-seed{seed}"),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=held_out,
        learning_rate=lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        logging_steps=10,
        eval_strategy="steps",
        eval_steps=eval_every,
        save_strategy="no",
        report_to="none",
        dataloader_pin_memory=False,
        disable_tqdm=True,
        num_reconstruction_images=0,
        cond_dropout_prob=0.0,
        prompt_templates=str(prompt_templates),
        collapse_probe_steps=eval_every,
        seed=seed,
        cpu_threads=0,  # the thread count the caller set (OMP_NUM_THREADS), as before cpu_threads existed
        **settings,
    )
    collator = None
    if name == CONTROL:
        collator = OtherImageCollator(
            get_adapter(model, processor), condition_resolution=side, condition_bottleneck="none",
            cond_dropout_prob=0.0, seed=seed, allow_shortcut=True,
        )  # fmt: skip
    trainer = RecATrainer(model, args=args, data_collator=collator, train_dataset=train, eval_dataset=held,
                          processing_class=processor)  # fmt: skip
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    history = trainer.state.log_history
    train_curve = [(log["step"], log["reconstruction_loss"]) for log in history if "reconstruction_loss" in log]
    held_curve = [
        (log["step"], log["eval_reconstruction_loss"]) for log in history if "eval_reconstruction_loss" in log
    ]
    views = trainer.data_collator.views
    images = list(held["image"])
    probe = {} if kind == "flow" else swap_probe(trainer.adapter, model, images, views)
    if kind != "tokens":  # the loss-based probe (Show-o: its masked loss under fixed draws)
        probe.update(condition_swap_loss(trainer.adapter, model, images, views))
    detector = trainer.collapse_detector
    return {
        "condition": name,
        "seed": seed,
        "train": train_curve,
        "held_out": held_curve,
        "fired_at_step": detector.fired_at_step if detector else None,
        "probes": list(detector.history) if detector else [],
        **probe,
        "seconds": seconds,
        "ms_per_step": 1000 * seconds / steps,
    }


def summarise(results: list[dict], uniform: float | None) -> list[dict]:
    """One row per run. Token runs report the uniform-guess loss and the swap agreement; flow runs the first
    logged loss (the detector's reference) and the loss-based probe, final and highest over the run."""
    rows = []
    for result in results:
        row = {
            "condition": result["condition"],
            "seed": result["seed"],
            "final_train_loss": round(result["train"][-1][1], 4),
            "final_held_out_loss": round(result["held_out"][-1][1], 4),
        }
        if uniform is not None:
            row["uniform_guess_loss"] = round(uniform, 4)
        else:
            row["first_train_loss"] = round(result["train"][0][1], 4)
        row["detector_fired_at_step"] = result["fired_at_step"] if result["fired_at_step"] is not None else ""
        if "swap_copy_rate" in result:
            row["swap_copy_rate"] = round(result["swap_copy_rate"], 3)
            row["swap_target_rate"] = round(result["swap_target_rate"], 3)
        if "condition_gain" in result:
            row["condition_gain"] = round(result["condition_gain"], 3)
            if "swap_copy_rate" not in result:  # the detector's probes were loss-based
                gains = [probe["condition_gain"] for probe in result["probes"]]
                row["max_probe_gain"] = round(max(gains), 3) if gains else ""
            row["swap_own_loss"] = round(result["swap_own_loss"], 4)
            row["swap_other_loss"] = round(result["swap_other_loss"], 4)
        row["ms_per_step"] = round(result["ms_per_step"], 1)
        rows.append(row)
    return rows


def write_outputs(results: list[dict], rows: list[dict], output_dir: Path, kind: str = "tokens") -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    if kind == "flow":
        with open(output_dir / "probes.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["condition", "seed", "step", "condition_gain", "swap_own_loss", "swap_other_loss",
                             "loss_signal"])  # fmt: skip
            for result in results:
                for probe in result["probes"]:
                    writer.writerow([result["condition"], result["seed"], probe["step"],
                                     f"{probe['condition_gain']:.4f}", f"{probe['swap_own_loss']:.4f}",
                                     f"{probe['swap_other_loss']:.4f}", int(probe["loss_signal"])])  # fmt: skip
    with open(output_dir / "losses.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["condition", "seed", "split", "step", "loss"])
        for result in results:
            for split in ("train", "held_out"):
                for step, loss in result[split]:
                    writer.writerow([result["condition"], result["seed"], split, step, f"{loss:.6f}"])
    with open(output_dir / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if kind == "showo":
        (output_dir / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
        (output_dir / "summary.md").write_text(markdown_table(rows) + "\n")
    return plot(results, output_dir / "bottleneck_ablation.png", kind)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(str(v) for v in row.values()) + " |" for row in rows])


def plot(results: list[dict], path: Path, kind: str = "tokens") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(CONDITIONS, ("tab:red", "tab:blue", "tab:green", "tab:grey")))
    flow = kind == "flow"
    probed = kind in ("flow", "showo")  # a third panel: the detector's probe readings
    figure, axes = plt.subplots(1, 3 if probed else 2, figsize=(16 if probed else 11, 4))
    for axis, split, title in zip(axes, ("train", "held_out"), ("training loss", "held-out loss")):
        for result in results:
            steps, losses = zip(*result[split])
            label = f"{result['condition']} (seed {result['seed']})"
            axis.plot(steps, losses, color=colours[result["condition"]], alpha=0.85, label=label)
            if result["fired_at_step"] is not None:
                axis.axvline(result["fired_at_step"], color=colours[result["condition"]], linestyle=":", linewidth=1)
        if flow:
            axis.set_title(f"Tiny flow UMM, {title} (velocity MSE)")
        else:
            axis.set_title(f"{TITLE[kind]}, {title} (code cross-entropy, nats)")
        axis.set_xlabel("step")
        axis.set_yscale("log")
    axes[0].set_ylabel("loss")
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axes[1].legend(unique.values(), unique.keys(), fontsize=7, loc="lower left")
    if probed:
        from reca_hf.callbacks import COPY_THRESHOLD, GAIN_THRESHOLD

        metric, threshold, name = ("condition_gain", GAIN_THRESHOLD, "GAIN_THRESHOLD") if flow else (
            "swap_copy_rate", COPY_THRESHOLD, "COPY_THRESHOLD")  # fmt: skip
        for result in results:
            if result["probes"]:
                steps, readings = zip(*[(probe["step"], probe[metric]) for probe in result["probes"]])
                axes[2].plot(steps, readings, marker=".", color=colours[result["condition"]], alpha=0.85)
        axes[2].axhline(threshold, color="black", linestyle="--", linewidth=1, label=name)
        axes[2].set_title(f"{metric} on held-out images (detector probes)")
        axes[2].set_xlabel("step")
        axes[2].set_ylim(-0.1, 1.0)
        axes[2].legend(fontsize=7, loc="center right")
    if flow:
        figure.suptitle(
            "Condition = the target's own latents: without a bottleneck the flow model copies (dotted: detector)"
        )
    else:
        figure.suptitle(
            "Condition and target in one VQ space: without a bottleneck the model copies (dotted: detector)"
        )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Only errors from ``logger_name`` while the runs last (restored after, for callers such as tests)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=list(ARCH), default="tokens",
                        help="tokens: tiny Emu3; flow: tiny flow UMM; showo: tiny Show-o (VQ)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=list(CONDITIONS))
    parser.add_argument("--train-images", type=int, default=1024)
    parser.add_argument("--held-out", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None, help="default: 1e-3 (tokens, showo), 3e-3 (flow)")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--single-instruction", action="store_true",
                        help="train with the probes' instruction only (the adapter's default_instruction)")  # fmt: skip
    parser.add_argument("--output-dir", type=Path, default=None, help="default: benchmarks/results/bottleneck_ablation"
                        " (flow, showo: bottleneck_ablation_flow, bottleneck_ablation_showo)")  # fmt: skip
    options = parser.parse_args(argv)
    if options.lr is None:
        options.lr = 3e-3 if options.kind == "flow" else 1e-3
    if options.output_dir is None:
        suffix = "" if options.kind == "tokens" else f"_{options.kind}"
        options.output_dir = Path(f"benchmarks/results/bottleneck_ablation{suffix}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = []
    with tempfile.TemporaryDirectory() as scratch, _quiet("reca_hf.trainer"):  # the shared-LLM reminder
        for seed in options.seeds:
            for name in options.conditions:
                result = run(name, steps=options.steps, seed=seed, train_images=options.train_images,
                             held_out=options.held_out, batch_size=options.batch_size, lr=options.lr,
                             eval_every=options.eval_every, output_dir=Path(scratch), kind=options.kind,
                             single_instruction=options.single_instruction)  # fmt: skip
                results.append(result)
                probes = []
                if "swap_copy_rate" in result:
                    probes.append(f"swap copy {result['swap_copy_rate']:.2f} / target {result['swap_target_rate']:.2f}")
                if "condition_gain" in result:
                    probes.append(f"condition gain {result['condition_gain']:.3f}")
                probe = ", ".join(probes)
                print(f"{name} seed {seed}: train {result['train'][-1][1]:.4f}, held-out "
                      f"{result['held_out'][-1][1]:.4f}, detector {result['fired_at_step']}, {probe}, "
                      f"{result['ms_per_step']:.0f} ms/step", flush=True)  # fmt: skip
    token_arch = {"tokens": "emu3", "showo": "showo"}.get(options.kind)
    uniform = math.log(get_adapter(tiny_umm(token_arch)[0]).codebook_size) if token_arch else None
    rows = summarise(results, uniform)
    figure = write_outputs(results, rows, options.output_dir, options.kind)
    print("\n" + markdown_table(rows))
    print(f"\nWrote {options.output_dir}/losses.csv, summary.csv and {figure.name}")
    return rows


if __name__ == "__main__":
    main()
