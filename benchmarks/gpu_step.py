"""GPU step: bf16 samples/s, MFU and peak memory of Janus-Pro-1B- and 7B-shaped, Show-o-512-shaped and
Harmon-0.5B- and 1.5B-shaped random models, through RecATrainer.

The models are built in code with the public configs' shapes (``janus_shapes.SHAPES``; random weights, no
download) and trained with RecA's defaults (``freeze: auto``, reconstruction at 384/384, dataloader workers
``auto``) in bf16 mixed precision on one CUDA GPU, on synthetic 384-px images. After ``--warmup`` steps,
``--steps`` steps are timed (step end to step end): samples/s, the FLOPs the trainer counted for them
(:class:`reca_hf.flops.FlopCounter`: forward through trained and frozen modules, and the backward that runs)
per second over the GPU's dense bf16 peak (``--peak``, else the known peak of the device), and the peak memory
allocated. The goal for the 1B shape on an H100/H200-class GPU is an MFU of at least 0.40.

    python benchmarks/gpu_step.py                      # both sizes, default batch sizes
    python benchmarks/gpu_step.py --sizes 1b --batch-size 16
    python benchmarks/gpu_step.py --tiny               # a tiny CPU run that checks the script itself
    python benchmarks/gpu_step.py --sizes showo_vq_512 showo_clip_512   # Show-o (Phi-1.5, 1024 codes per image)
    python benchmarks/gpu_step.py --tiny --tiny-arch showo              # the Show-o path on the tiny Show-o
    python benchmarks/gpu_step.py --sizes harmon_0_5b harmon_1_5b     # Harmon (Qwen2.5 + MAR-B / MAR-H + kl16)
    python benchmarks/gpu_step.py --tiny --tiny-arch harmon             # the Harmon path on the tiny Harmon

The Show-o shapes (``showo_shape``) are the released 512-px models' (``ShowoConfig`` defaults: Phi-1.5, MAGVIT-v2,
CLIP ViT-L/14-336; 1024 codes, the RecA text budget of 381) with a synthetic word-level tokenizer of Phi-1.5's
50,295 text tokens; the step is reconstruction only (the authors add 2 image-to-text rows per 2 recon rows).

The Harmon shapes (``harmon_shape``) are ``HarmonConfig.harmon_0_5b`` / ``harmon_1_5b`` (the parameter counts of
``benchmarks/harmon_params.py``) at the authors' 512 px (32 x 32 latent tokens, 1088 image slots in the prompt), with
the tiny Harmon's word-level tokenizer (the prompts' few text tokens; the LLM keeps Qwen2.5's 151,936-row
embedding); the step is reconstruction only (the authors add 2 image-to-text micro-batches per 2 recon ones). The
1.5B shape checkpoints activations (its fp32 weights, gradients and AdamW states take ~40 GB).

Without a CUDA GPU it exits with a message (``--tiny`` runs anywhere). Writes ``benchmarks/results/gpu_step.json``
and ``.md`` (``--out`` elsewhere, ``--out ''`` for none).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from janus_shapes import janus_pro_like  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from reca_hf import RecAConfig, RecATrainer  # noqa: E402
from reca_hf.data import synthetic_shapes  # noqa: E402
from reca_hf.flops import peak_flops_per_second  # noqa: E402
from reca_hf.testing import tiny_umm  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# Per size: (batch size, weights dtype, activation checkpointing). The 7B shape keeps bf16 weights (fp32 master
# weights plus AdamW states would not fit beside its activations) and checkpoints activations.
DEFAULTS = {
    "1b": (16, "float32", False),
    "7b": (8, "bfloat16", True),
    "showo_vq_512": (4, "float32", False),
    "showo_clip_512": (4, "float32", False),
    "harmon_0_5b": (8, "float32", False),
    "harmon_1_5b": (16, "float32", True),
    "tiny": (2, "float32", False),
}
SHOWO = ("showo_vq_512", "showo_clip_512")
HARMON = ("harmon_0_5b", "harmon_1_5b")


def showo_shape(size: str, device=None):
    """``(model, tokenizer)``: a random Show-o shaped like the released 512-px VQ or CLIP model (no download)."""
    from reca_hf.models.showo import ShowoConfig, ShowoModel
    from reca_hf.models.showo.tiny import add_showo_tokens
    from reca_hf.tiny_text import word_level_tokenizer

    end = "<|endoftext|>"
    words = [f"w{i}" for i in range(50295 - 1)] + ["user", "assistant"]
    text = word_level_tokenizer([end], words[: 50295 - 1], bos=end, eos=end, pad=end, unk=end,
                                extra_special_tokens={}, add_bos=False)  # fmt: skip
    config = ShowoConfig(w_clip_vit=size == "showo_clip_512", llm_vocab_size=len(text), num_vq_tokens=1024,
                         max_seq_length=381)  # fmt: skip
    with torch.device(device or "cpu"):
        model = ShowoModel(config)
    return model, add_showo_tokens(text)


def harmon_shape(size: str, device=None):
    """``(model, tokenizer)``: a random Harmon shaped like Harmon-0.5B or 1.5B (no download), with the tiny
    Harmon's tokenizer (its ``<image>`` id becomes the config's image token)."""
    from reca_hf.models.harmon import HarmonConfig, HarmonModel
    from reca_hf.models.harmon.tiny import tiny_harmon_tokenizer

    tokenizer = tiny_harmon_tokenizer()
    make = HarmonConfig.harmon_0_5b if size == "harmon_0_5b" else HarmonConfig.harmon_1_5b
    config = make(image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    with torch.device(device or "cpu"):
        model = HarmonModel(config)
    return model, tokenizer


def image_resolution(model) -> int:
    """The pixel size of the synthetic training images: the model's native generation resolution."""
    config = model.config
    if config.model_type == "harmon":
        return 2 * config.img_size  # trains at twice MAR's table size (512 px), as the adapter
    if hasattr(config, "num_vq_tokens"):
        return config.image_size
    return config.vision_config.image_size


class _Clock(TrainerCallback):
    """Step-end times and the trainer's FLOP count at each, for the steps after the warm-up."""

    def __init__(self, trainer_ref: list):
        self.trainer_ref = trainer_ref
        self.marks: list[tuple[float, int]] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the benchmark's own clock, not the trainer's step
        self.marks.append((time.perf_counter(), sum(self.trainer_ref[0].task_flos.values())))


def run(size: str, batch_size: int, steps: int, warmup: int, model_dtype: str, checkpointing: bool,
        peak: float | None, tiny_arch: str = "janus") -> dict:  # fmt: skip
    tiny = size == "tiny"
    device = None if tiny else "cuda"
    if tiny:
        model, processor = tiny_umm(tiny_arch)
    elif size in SHOWO:
        model, processor = showo_shape(size, device=device)
    elif size in HARMON:
        model, processor = harmon_shape(size, device=device)
    else:
        model, processor = janus_pro_like(size, device=device)
    if model_dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    data = synthetic_shapes(batch_size * (steps + warmup + 1), size=image_resolution(model), seed=0)
    trainer_ref: list = []
    clock = _Clock(trainer_ref)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        args = RecAConfig(output_dir=out, per_device_train_batch_size=batch_size, max_steps=warmup + steps,
                          logging_steps=warmup + steps, bf16=not tiny, use_cpu=tiny, save_strategy="no",
                          report_to="none", num_reconstruction_images=0, collapse_action="off", disable_tqdm=True,
                          activation_checkpointing=checkpointing, dataloader_pin_memory=not tiny,
                          peak_flops_per_second=peak, seed=0)  # fmt: skip
        trainer = RecATrainer(model, args=args, train_dataset=data, processing_class=processor, callbacks=[clock])
        trainer_ref.append(trainer)
        trainer.train()
    (start, flops_start), (end, flops_end) = clock.marks[warmup - 1], clock.marks[-1]
    seconds = end - start
    flops_per_second = (flops_end - flops_start) / seconds
    return {
        "size": size,
        "batch_size": batch_size,
        "weights_dtype": model_dtype,
        "activation_checkpointing": checkpointing,
        "timed_steps": steps,
        "samples_per_second": batch_size * steps / seconds,
        "seconds_per_step": seconds / steps,
        "tflops_per_second": flops_per_second / 1e12,
        "mfu": flops_per_second / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["1b", "7b"], choices=["1b", "7b", *SHOWO, *HARMON])
    parser.add_argument("--batch-size", type=int, help="per size default: 1b 16, 7b 8, Show-o 4, Harmon 8 / 16")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="steps before the timing starts")
    parser.add_argument("--peak", type=float, help="the GPU's dense bf16 peak FLOP/s (default: the known one)")
    parser.add_argument("--tiny", "--dry-run", action="store_true", help="a tiny Janus on the CPU: checks the script")
    parser.add_argument("--tiny-arch", default="janus", choices=["janus", "showo", "harmon"], help="the --tiny model")
    parser.add_argument("--out", default=str(RESULTS), help="folder for gpu_step.json/.md ('' for none)")
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("gpu_step.py: needs a CUDA GPU and none is visible; --tiny checks the script on the CPU")
    device = "CPU (tiny check)" if args.tiny else torch.cuda.get_device_name(0)
    peak = args.peak if args.peak else (None if args.tiny else peak_flops_per_second())
    results = []
    for size in ["tiny"] if args.tiny else args.sizes:
        batch_size, dtype, checkpointing = DEFAULTS[size]
        batch_size = args.batch_size or batch_size
        try:
            result = run(size, batch_size, args.steps, args.warmup, dtype, checkpointing, peak, args.tiny_arch)
        except torch.cuda.OutOfMemoryError as error:
            result = {"size": size, "batch_size": batch_size, "error": f"out of memory: {error}"[:300]}
            torch.cuda.empty_cache()
        results.append({"device": device, "peak_flops_per_second": peak, **result})
        print(json.dumps(results[-1], indent=2))
    if args.out:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "gpu_step.json").write_text(json.dumps(results, indent=2) + "\n")
        (folder / "gpu_step.md").write_text(_markdown(results))
    return results


def _markdown(results: list[dict]) -> str:
    lines = [
        "# GPU step: Janus-Pro-, Show-o- and Harmon-shaped random models through RecATrainer (bf16)",
        "",
        f"Device: {results[0]['device']}. Command: `python benchmarks/gpu_step.py`.",
        "",
        "| size | batch | weights | ckpt | samples/s | s/step | TFLOP/s | MFU | peak memory GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['batch_size']} | | | {r['error']} | | | | |")
            continue
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "-"
        memory = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        lines.append(
            f"| {r['size']} | {r['batch_size']} | {r['weights_dtype']} | {r['activation_checkpointing']} | "
            f"{r['samples_per_second']:.2f} | {r['seconds_per_step']:.3f} | {r['tflops_per_second']:.1f} | {mfu} | "
            f"{memory} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
