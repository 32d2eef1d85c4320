"""Memory of RecA on a Janus-Pro-7B-shaped model: full fine-tuning versus the two LoRA modes.

The model has Janus-Pro-7B's layer structure (30 LLM layers, a 24-layer SigLIP, the VQ model, the
generation aligner and head) with every width divided by ``--width-divisor`` (default 8: LLM hidden 512,
vocabulary 12,800, codebook 2,048), and reads and writes ``--resolution`` px images (default 192: 144
condition tokens and 144 VQ codes). Three runs train it for a few RecA steps through `RecATrainer`, each
in a fresh subprocess so that its peak memory is its own:

    full             freeze="auto" (the LLM and the generation modules train), no LoRA
    generation       use_peft, lora_target_modules="generation"
    generation+llm   use_peft, lora_target_modules="generation+llm"

For each it reports the trainable parameters, the peak resident memory of the process (RSS; on a GPU,
also the CUDA peak allocated) and the seconds per step. RSS includes the Python process and the model's
weights; the "above the loaded model" column subtracts the RSS measured right after the model was built.

    python benchmarks/lora_memory.py                       # one table on stdout (~2 min on 2 CPU cores)
    python benchmarks/lora_memory.py --output lora.md      # also write it to a file
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {
    "full": {},
    "generation": {"use_peft": True, "lora_target_modules": "generation"},
    "generation+llm": {"use_peft": True, "lora_target_modules": "generation+llm"},
}
_RESULT = "RESULT "


def janus_pro_7b_shaped(width_divisor: int, resolution: int, seed: int = 0):
    """A random Janus with Janus-Pro-7B's layer counts and every width divided by ``width_divisor``."""
    import torch
    from transformers import JanusConfig, JanusForConditionalGeneration, JanusImageProcessorPil, JanusProcessor

    from reca_hf.testing import tiny_tokenizer

    d = width_divisor
    hidden, patch, vq_downsample = 4096 // d, 16, 16
    tokenizer = tiny_tokenizer()
    config = JanusConfig(
        text_config={
            "model_type": "llama",
            "vocab_size": 102400 // d,
            "hidden_size": hidden,
            "intermediate_size": 11008 // d,
            "num_hidden_layers": 30,
            "num_attention_heads": 32 // d,
            "num_key_value_heads": 32 // d,
            "max_position_embeddings": 4096,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "hidden_size": 1024 // d,
            "num_hidden_layers": 24,
            "num_attention_heads": 16 // d,
            "image_size": resolution,
            "patch_size": patch,
            "projection_dim": hidden,
            "depth": 2,
            "num_image_tokens": (resolution // patch) ** 2,
        },
        vq_config={
            "embed_dim": 8,
            "num_embeddings": 16384 // d,
            "latent_channels": max(32, 256 // d),
            "base_channels": max(32, 128 // d),  # GroupNorm(32) needs at least 32 channels
            "channel_multiplier": [1, 1, 2, 2, 4],  # four downsamples: 16 px per code, as in Janus-Pro
            "num_res_blocks": 2,
            "num_patches": resolution // vq_downsample,
            "projection_dim": hidden,
            "image_token_embed_dim": hidden,
        },
        image_token_id=tokenizer.convert_tokens_to_ids("<image_placeholder>"),
    )
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(config)
    image_processor = JanusImageProcessorPil(
        size={"height": resolution, "width": resolution}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor = JanusProcessor(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=(resolution // patch) ** 2
    )
    return model, processor


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(mode: str, args) -> dict:
    import torch

    from reca_hf import RecAConfig, RecATrainer
    from reca_hf.data import synthetic_shapes

    model, processor = janus_pro_7b_shaped(args.width_divisor, args.resolution)
    total = sum(p.numel() for p in model.parameters())
    loaded_rss = _rss_mib()
    dataset = synthetic_shapes(args.batch_size * args.steps, size=args.resolution, seed=0)
    with tempfile.TemporaryDirectory() as output_dir:
        config = RecAConfig(
            output_dir=output_dir,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=1e-4,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_pin_memory=False,
            num_reconstruction_images=0,
            collapse_action="off",
            activation_checkpointing=args.activation_checkpointing,
            seed=0,
            **MODES[mode],
        )
        trainer = RecATrainer(model, args=config, train_dataset=dataset, processing_class=processor)
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    return {
        "mode": mode,
        "total": total,
        "trainable": trainable,
        "loaded_rss_mib": loaded_rss,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "seconds_per_step": seconds / args.steps,
        "device": torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU ({platform.machine()}), torch threads: {torch.get_num_threads()}",
    }


def table(results: list[dict], args) -> str:
    gpu = results[0]["cuda_peak_mib"] is not None
    header = "| mode | trainable parameters | share of the model | peak RSS (MiB) | RSS above the loaded model (MiB) |"
    header += " CUDA peak allocated (MiB) |" if gpu else ""
    header += " s / step |"
    lines = [header, "|---" + "|---:" * (header.count("|") - 2) + "|"]
    for r in results:
        row = f"| {r['mode']} | {r['trainable']:,} | {100 * r['trainable'] / r['total']:.2f} % "
        row += f"| {r['peak_rss_mib']:,.0f} | {r['peak_rss_mib'] - r['loaded_rss_mib']:,.0f} |"
        row += f" {r['cuda_peak_mib']:,.0f} |" if gpu else ""
        row += f" {r['seconds_per_step']:.1f} |"
        lines.append(row)
    total = results[0]["total"]
    lines.append("")
    lines.append(
        f"Janus-Pro-7B-shaped model, widths / {args.width_divisor} ({total / 1e6:.0f}M parameters), "
        f"{args.resolution} px, batch {args.batch_size}, {args.steps} steps, fp32, AdamW, activation checkpointing "
        f"{'on' if args.activation_checkpointing else 'off'}, LoRA rank 16; {results[0]['device']}."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width-divisor", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=192, help="a multiple of 16")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--output", type=Path, help="also write the table to this file")
    parser.add_argument("--worker", choices=list(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(_RESULT + json.dumps(worker(args.worker, args)), flush=True)
        return
    forwarded = [
        *("--width-divisor", str(args.width_divisor), "--resolution", str(args.resolution)),
        *("--batch-size", str(args.batch_size), "--steps", str(args.steps)),
        "--activation-checkpointing" if args.activation_checkpointing else "--no-activation-checkpointing",
    ]
    results = []
    for mode in MODES:
        print(f"running {mode} ...", file=sys.stderr, flush=True)
        done = subprocess.run(
            [sys.executable, __file__, "--worker", mode, *forwarded], capture_output=True, text=True, check=False
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith(_RESULT)]
        if done.returncode or not lines:
            sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(lines[-1][len(_RESULT) :]))
    text = table(results, args)
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
