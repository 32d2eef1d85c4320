"""Trainer overhead: a RecATrainer step vs a hand-written loop, side by side in one process.

Both train the same Janus-Pro-shaped random model (``janus_shapes.SHAPES["cpu"]``: 384-px images, 576 SigLIP
tokens, 576 VQ codes, narrow widths) on the same synthetic images through the same collator (in the main
process, as ``dataloader_num_workers=0``), with AdamW at the same learning rate. The hand-written loop is what
one would write without reca_hf's trainer: ``DataLoader`` -> ``adapter.loss`` -> ``backward`` -> ``step``. The
trainer adds everything else it does per step (task-loss recording, the FLOP counter, callbacks, logging every
``--logging-steps``). The two loops are interleaved step by step (a trainer callback runs one hand-written step
after each trainer step, timed apart), so both see the same machine load; the first step of each is left out.
The ratio of the median step times is reported (and the ratio of the fastest steps), and must stay <= 1.05.

Run with one thread: ``OMP_NUM_THREADS=1 python benchmarks/trainer_overhead.py`` (about 2-4 minutes on 2 busy cores).
Writes ``benchmarks/results/trainer_overhead.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from janus_shapes import janus_pro_like  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from reca_hf import RecACollator, RecAConfig, RecATrainer  # noqa: E402
from reca_hf.adapters import get_adapter  # noqa: E402
from reca_hf.data import synthetic_shapes  # noqa: E402
from reca_hf.tasks import IndexedDataset  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LIMIT = 1.05


class _Interleaved(TrainerCallback):
    """After each trainer step, one hand-written step: both loops share every stretch of machine time."""

    def __init__(self, hand_step):
        self.hand_step = hand_step
        self.trainer_s: list[float] = []
        self.hand_s: list[float] = []
        self._resumed: float | None = None

    def on_step_end(self, args, state, control, **kwargs):
        ended = time.perf_counter()
        if self._resumed is not None:  # the first trainer step (warm-up, optimizer creation) is left out
            self.trainer_s.append(ended - self._resumed)
        self.hand_step()  # the first hand step is the warm-up of its loop
        resumed = time.perf_counter()
        if self._resumed is not None:
            self.hand_s.append(resumed - ended)
        self._resumed = resumed


def hand_written_loop(shape: str, data, batch_size: int):
    """One step of the loop one would write without reca_hf's trainer per call: DataLoader (the same collator,
    in this process) -> ``adapter.loss`` -> backward -> clip -> AdamW step."""
    model, processor = janus_pro_like(shape)
    adapter = get_adapter(model, processor)
    for module in (model.model.vision_model, model.model.aligner, model.model.vqmodel, model.lm_head):
        module.requires_grad_(False)  # the trainer's freeze: auto
    model.train()
    loader = torch.utils.data.DataLoader(IndexedDataset(data), batch_size=batch_size, shuffle=True,
                                         collate_fn=RecACollator(adapter, seed=0), drop_last=True)  # fmt: skip
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95))

    def batches():
        while True:
            yield from loader

    stream = batches()

    def step() -> None:
        batch = next(stream)
        loss = adapter.loss(model, {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    return step


def measure(shape: str, data, steps: int, batch_size: int, logging_steps: int) -> dict:
    clock = _Interleaved(hand_written_loop(shape, data, batch_size))
    model, processor = janus_pro_like(shape)
    with tempfile.TemporaryDirectory() as out:
        args = RecAConfig(output_dir=out, per_device_train_batch_size=batch_size, max_steps=steps + 1,
                          logging_steps=logging_steps, learning_rate=1e-4, save_strategy="no", report_to="none",
                          dataloader_num_workers=0, dataloader_pin_memory=False, num_reconstruction_images=0,
                          collapse_action="off", disable_tqdm=True, seed=0)  # fmt: skip
        RecATrainer(model, args=args, train_dataset=data, processing_class=processor, callbacks=[clock]).train()
    return {"trainer_s": clock.trainer_s, "hand_written_s": clock.hand_s}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="cpu", help="a janus_shapes.SHAPES key (default: cpu)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each loop")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--logging-steps", type=int, default=10, help="the trainer's logging interval (default 10)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for trainer_overhead.json/.md ('' for none)")
    args = parser.parse_args(argv)
    data = synthetic_shapes(64, size=384, seed=0)
    times = measure(args.shape, data, args.steps, args.batch_size, args.logging_steps)
    trainer, hand = times["trainer_s"], times["hand_written_s"]
    result = {
        "shape": args.shape,
        "batch_size": args.batch_size,
        "timed_steps": len(trainer),
        "threads": torch.get_num_threads(),
        "trainer_median_s": statistics.median(trainer),
        "hand_written_median_s": statistics.median(hand),
        "ratio": statistics.median(trainer) / statistics.median(hand),
        "best_step_ratio": min(trainer) / min(hand),
        "limit": LIMIT,
        "steps": times,
        "command": "OMP_NUM_THREADS=1 python benchmarks/trainer_overhead.py " + " ".join(argv or sys.argv[1:]),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "steps"}, indent=2))
    if args.out:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "trainer_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
        (folder / "trainer_overhead.md").write_text(_markdown(result))
    return result


def _markdown(result: dict) -> str:
    return "\n".join(
        [
            "# Trainer overhead: RecATrainer step / hand-written loop",
            "",
            f"Janus-Pro-shaped random model (`{result['shape']}`: 384 px, 576 + 576 tokens), batch "
            f"{result['batch_size']}, {result['threads']} thread(s), {result['timed_steps']} timed steps of each loop, "
            "interleaved step by step in one process.",
            "",
            "| | trainer | hand-written | ratio |",
            "|---|---|---|---|",
            f"| median s/step | {result['trainer_median_s']:.3f} | {result['hand_written_median_s']:.3f} | "
            f"**{result['ratio']:.3f}** |",
            f"| best s/step | {min(result['steps']['trainer_s']):.3f} | {min(result['steps']['hand_written_s']):.3f} | "
            f"{result['best_step_ratio']:.3f} |",
            "",
            f"Limit {result['limit']}. Command: `{result['command']}`.",
            "",
        ]
    )


if __name__ == "__main__":
    main()
