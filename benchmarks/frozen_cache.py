"""Cached vs uncached training step (``cache_frozen_features``) at Janus-like and OpenUni-like tiny shapes.

Two random models built in code, shaped so that their frozen towers take about the share of a step that they
take in the real models (Janus-Pro-1B: SigLIP and the VQ encoder, about 7% of the step's FLOPs by the issue's
count; OpenUni-B-512: InternViT at 448 px and DC-AE at 512 px beside a 0.6B SANA, a large share). For each,
:class:`~reca_hf.RecATrainer` builds the frozen-tower cache of 64 synthetic images, and one training step
(loss, backward, AdamW step) is timed on the same collated batches with and without the cached entries,
interleaved in one process. Also reported: the frozen share counted by ``torch.utils.flop_counter`` (what
``cache_frozen_features: auto`` decides on), the collator's time per batch with and without the cache lookup,
the cache's size per image, and the largest difference between the cached and the uncached loss.

Run with one thread: ``OMP_NUM_THREADS=1 python benchmarks/frozen_cache.py``. Results go to
``benchmarks/results/frozen_cache.{json,md}``.
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

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's reca_hf, not an installed one

from reca_hf import RecACollator, RecAConfig, RecATrainer  # noqa: E402
from reca_hf.adapters import LossNoise, get_adapter  # noqa: E402
from reca_hf.data import synthetic_shapes  # noqa: E402
from reca_hf.frozen_cache import AUTO_MIN_SHARE, frozen_share  # noqa: E402


def janus_like():
    """Janus at a tiny shape: a 4-layer, 256-wide LLM over 16 SigLIP slots and 16 VQ codes of a 32-px image."""
    from transformers import JanusConfig, JanusForConditionalGeneration

    from reca_hf.testing import build_tiny_janus, tiny_llm_config

    _, processor = build_tiny_janus(0)
    tokenizer = processor.tokenizer
    text = {**tiny_llm_config(tokenizer, hidden_size=256), "num_hidden_layers": 4, "intermediate_size": 512}
    config = JanusConfig(
        text_config={"model_type": "llama", **text},
        vision_config={"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32,
                       "patch_size": 8, "projection_dim": 256, "depth": 2, "num_image_tokens": 16},
        vq_config={"embed_dim": 8, "num_embeddings": 256, "latent_channels": 32, "base_channels": 32,
                   "channel_multiplier": [1, 1, 2, 2], "num_res_blocks": 1, "projection_dim": 256,
                   "image_token_embed_dim": 256},
        image_token_id=tokenizer.convert_tokens_to_ids(tokenizer.image_token),
    )  # fmt: skip
    torch.manual_seed(0)
    return JanusForConditionalGeneration(config), processor, 32


def openuni_like():
    """OpenUni at a tiny shape: the frozen InternViT tile and DC-AE encoder run at higher resolution than SANA's
    latent grid, beside a small LLM, connector and transformer."""
    from reca_hf.models.openuni import OpenUniModel
    from reca_hf.models.openuni.tiny import tiny_openuni_config, tiny_openuni_processor

    processor = tiny_openuni_processor()
    config = tiny_openuni_config(processor.tokenizer)
    vision = config.internvl_config.vision_config
    vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers = 64, 256, 4
    config.vae_config = {**config.vae_config, "encoder_block_out_channels": [16, 32, 32],
                         "decoder_block_out_channels": [16, 32, 32]}  # fmt: skip
    torch.manual_seed(0)
    return OpenUniModel(config), processor, 32


def measure(name: str, build, rounds: int, steps: int, batch_size: int, workdir: Path) -> dict:
    model, processor, size = build()
    adapter = get_adapter(model, processor)
    if name == "openuni-like":
        adapter.target_fit = "center_crop"  # the authors' random crop is drawn per epoch: not cacheable
    args = RecAConfig(
        output_dir=str(workdir / name), cache_frozen_features="true", frozen_cache_dir=str(workdir / "cache"),
        per_device_train_batch_size=batch_size, report_to="none", collapse_action="off",
        num_reconstruction_images=0, dataloader_pin_memory=False, cond_dropout_prob=0.0,
    )  # fmt: skip
    images = synthetic_shapes(64, size=size * 2, seed=0)
    collator = RecACollator.from_config(adapter, args)
    trainer = RecATrainer(model, args, data_collator=collator, train_dataset=images, processing_class=processor)
    started = time.perf_counter()
    cache = trainer.setup_frozen_cache()
    build_s = time.perf_counter() - started
    rows = [[trainer.train_dataset[i] for i in range(b, b + batch_size)] for b in range(0, 64, batch_size)]

    def collate(cached: bool):
        collator.frozen_cache = cache if cached else None
        started = time.perf_counter()
        batches = [{k: v for k, v in collator(r).items() if isinstance(v, torch.Tensor)} for r in rows]
        return batches, (time.perf_counter() - started) / len(rows)

    cached_batches, _ = collate(True)
    uncached_batches, _ = collate(False)
    with torch.no_grad():
        noise = LossNoise(seed=1)
        difference = max(
            (adapter.loss(model, c, noise=noise) - adapter.loss(model, u, noise=noise)).abs().item()
            for c, u in zip(cached_batches, uncached_batches)
        )
    share = frozen_share(adapter, model, uncached_batches[0], cache.names)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()

    def step_time(batches) -> float:
        started = time.perf_counter()
        for i in range(steps):
            loss = adapter.loss(model, batches[i % len(batches)])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return (time.perf_counter() - started) / steps

    step_time(uncached_batches[:1])  # warm-up
    timings = {"uncached": [], "cached": []}
    collate_timings = {"uncached": [], "cached": []}
    arms = [("uncached", uncached_batches), ("cached", cached_batches)]
    for round_ in range(rounds):  # interleaved, first arm alternating, so both arms see the same machine load
        for arm, batches in arms if round_ % 2 == 0 else arms[::-1]:
            timings[arm].append(step_time(batches))
            collate_timings[arm].append(collate(arm == "cached")[1])
    best = {arm: min(values) for arm, values in timings.items()}
    collate_best = {arm: min(values) for arm, values in collate_timings.items()}
    return {
        "shape": name,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "frozen_parameters": sum(p.numel() for p in model.parameters() if not p.requires_grad),
        "cached_features": cache.names,
        "frozen_flop_share": round(share, 4),
        "auto_decision": "on" if share >= AUTO_MIN_SHARE else "off",
        "step_ms_uncached": round(1000 * best["uncached"], 2),
        "step_ms_cached": round(1000 * best["cached"], 2),
        "step_speedup": round(best["uncached"] / best["cached"], 3),
        "step_speedup_median": round(statistics.median(timings["uncached"]) / statistics.median(timings["cached"]), 3),
        "collate_ms_uncached": round(1000 * collate_best["uncached"], 2),
        "collate_ms_cached": round(1000 * collate_best["cached"], 2),
        "cache_build_s": round(build_s, 2),
        "cache_bytes_per_image": cache.nbytes() // cache.index["rows"],
        "max_loss_difference": difference,
        "batch_size": batch_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    options = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as workdir:
        results = [
            measure(name, build, options.rounds, options.steps, options.batch_size, Path(workdir))
            for name, build in (("janus-like", janus_like), ("openuni-like", openuni_like))
        ]
    record = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/frozen_cache.py "
        f"--rounds {options.rounds} --steps {options.steps} --batch-size {options.batch_size}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "frozen_cache.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "# Frozen-tower cache: cached vs uncached training step",
        "",
        f"`{record['command']}` (torch {record['torch']}, CPU, {record['threads']} thread; best of "
        f"{options.rounds} interleaved rounds of {options.steps} steps).",
        "",
        "| shape | cached | frozen FLOP share | auto | step uncached | step cached | speedup (best / median) "
        "| collate uncached / cached | cache per image | max loss diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['shape']} | {', '.join(r['cached_features'])} | {100 * r['frozen_flop_share']:.1f}% | "
            f"{r['auto_decision']} | {r['step_ms_uncached']} ms | {r['step_ms_cached']} ms | {r['step_speedup']}x / "
            f"{r['step_speedup_median']}x | {r['collate_ms_uncached']} / {r['collate_ms_cached']} ms | "
            f"{r['cache_bytes_per_image'] / 1024:.1f} KiB | {r['max_loss_difference']:.1e} |"
        )
    (RESULTS / "frozen_cache.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
