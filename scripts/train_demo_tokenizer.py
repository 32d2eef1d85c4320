"""Train the demo's image tokenizer: the VQ of the demo Janus (``tiny:janus``) on synthetic shapes, on a CPU.

VQ-VAE training, GAN-free: L1 + L2 pixel reconstruction, a codebook and a commitment loss, straight-through
gradients, cosine (unit-norm) codes as Janus' decoder reads them, and dead codes restarted on encoder outputs.
Writes the VQ weights into the package (``reca_hf/weights/tiny_janus_vq.safetensors``), a figure of held-out
shapes and their round trips (``docs/images/demo_tokenizer_round_trip.png``) and the metrics
(``benchmarks/results/demo_tokenizer.json``).

Run (1336 s, 1500 steps, on one thread of a shared and loaded 2-core machine; less on an idle one)::

    nice -n 10 python scripts/train_demo_tokenizer.py
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from reca_hf.adapters import get_adapter
from reca_hf.data import synthetic_shapes
from reca_hf.images import to_pil, to_tensor
from reca_hf.testing import DEMO_JANUS, DEMO_VQ_WEIGHTS, tiny_janus_from_config

ROOT = Path(__file__).resolve().parents[1]
MEAN = STD = (0.5, 0.5, 0.5)  # Janus' VQ reads pixels in [-1, 1]
TRAIN_SEED, HELD_OUT_SEED = 1, 12345  # the demo trains on seed 0's shapes; neither set is those
BETA = 0.25  # commitment weight, as in Janus' quantizer


def shape_pixels(n: int, seed: int, views) -> torch.Tensor:
    """``n`` synthetic shapes as the VQ sees them: the demo's target view (32 px), normalised to [-1, 1]."""
    images = [views.target_view(image.convert("RGB")) for image in synthetic_shapes(n, seed=seed)["image"]]
    return to_tensor(images, MEAN, STD)


def quantize(vq, pixels: torch.Tensor):
    """Encode to unit-norm latents, snap each to its nearest unit-norm code, straight through.

    Returns ``(latents for the decoder, codebook + commitment loss, codes)``. With unit-norm codes, Janus' own
    nearest-code search (unnormalised Euclidean) picks the same codes as this cosine search, and its decoder's
    normalised codebook lookup reads the same vectors.
    """
    z = F.normalize(vq.quant_conv(vq.encoder(pixels)), dim=1)  # (B, D, h, w)
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    codebook = F.normalize(vq.quantize.embedding.weight, dim=1)
    codes = (flat @ codebook.T).argmax(dim=1)
    snapped = codebook[codes]
    loss = F.mse_loss(snapped, flat.detach()) + BETA * F.mse_loss(flat, snapped.detach())
    straight = flat + (snapped - flat).detach()
    return straight.view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2), loss, codes, flat


def decode(vq, latents: torch.Tensor) -> torch.Tensor:
    return vq.decoder(vq.post_quant_conv(latents))


@torch.no_grad()
def restart_dead_codes(vq, usage: torch.Tensor, latents: torch.Tensor, generator: torch.Generator) -> int:
    """Move every code unused since the last restart onto a random recent encoder output."""
    dead = (usage == 0).nonzero().flatten()
    if len(dead):
        picks = torch.randint(len(latents), (len(dead),), generator=generator)
        vq.quantize.embedding.weight[dead] = latents[picks]
    return len(dead)


@torch.no_grad()
def mean_abs_error(vq, pixels: torch.Tensor, model) -> float:
    """Mean absolute pixel error, in 0-255 units, of Janus' own round trip (encode, then decode the codes)."""
    codes = vq.encode(pixels).image_tokens.view(len(pixels), -1)
    return pixel_error(to_pil(pixels, MEAN, STD), to_pil(model.decode_image_tokens(codes), MEAN, STD))


def pixel_error(images: list[Image.Image], others: list[Image.Image]) -> float:
    """Mean absolute difference of two lists of RGB images, in 0-255 units."""
    return float(
        np.mean([np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean() for a, b in zip(images, others)])
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument(
        "--max_seconds", type=float, default=3600.0, help="stop early after this many seconds of training"
    )
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--num_train_images", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--weights", type=Path, default=DEMO_VQ_WEIGHTS)
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "images" / "demo_tokenizer_round_trip.png")
    parser.add_argument("--metrics", type=Path, default=ROOT / "benchmarks" / "results" / "demo_tokenizer.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)

    model, processor = tiny_janus_from_config(0, **DEMO_JANUS)  # the demo's shape, its VQ still random
    vq = model.model.vqmodel
    views = get_adapter(model, processor).default_views()
    train = shape_pixels(args.num_train_images, TRAIN_SEED, views)
    held_out = shape_pixels(256, HELD_OUT_SEED, views)
    random_error = mean_abs_error(vq.eval(), held_out, model)

    vq.train()
    optimizer = torch.optim.Adam(vq.parameters(), lr=args.learning_rate, betas=(0.9, 0.99))
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, args.learning_rate, total_steps=args.steps, pct_start=0.05
    )
    usage = torch.zeros(vq.config.num_embeddings, dtype=torch.long)
    start = time.perf_counter()
    step = 0
    for step in range(1, args.steps + 1):
        batch = train[torch.randint(len(train), (args.batch_size,), generator=generator)]
        latents, vq_loss, codes, flat = quantize(vq, batch)
        decoded = decode(vq, latents)
        loss = F.l1_loss(decoded, batch) + F.mse_loss(decoded, batch) + vq_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        usage += torch.bincount(codes, minlength=len(usage))
        if step % 100 == 0:
            dead = restart_dead_codes(vq, usage, flat.detach(), generator) if step <= args.steps * 0.8 else 0
            usage.zero_()
            elapsed = time.perf_counter() - start
            print(f"step {step} loss {loss.item():.4f} vq {vq_loss.item():.4f} dead {dead} {elapsed:.0f}s", flush=True)
            if elapsed > args.max_seconds:
                break
    seconds = time.perf_counter() - start

    vq.eval()
    with torch.no_grad():  # store the codes unit-norm: Janus' own nearest-code search then agrees with training
        vq.quantize.embedding.weight.copy_(F.normalize(vq.quantize.embedding.weight, dim=1))
    error = mean_abs_error(vq, held_out, model)
    codes = vq.encode(held_out).image_tokens
    args.weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in vq.state_dict().items()}, str(args.weights))
    save_figure(model, held_out[:8], args.figure)
    metrics = {
        "held_out_images": len(held_out),
        "mean_abs_pixel_error_0_255": round(error, 2),
        "random_tokenizer_mean_abs_pixel_error_0_255": round(random_error, 2),
        "codes_used_on_held_out": int(codes.unique().numel()),
        "codebook_size": int(vq.config.num_embeddings),
        "grid": int(vq.config.num_patches),
        "steps": step,
        "batch_size": args.batch_size,
        "train_images": args.num_train_images,
        "training_seconds": round(seconds, 1),
        "threads": args.threads,
        "weights_bytes": args.weights.stat().st_size,
        "command": "nice -n 10 python scripts/train_demo_tokenizer.py",
    }
    args.metrics.parent.mkdir(parents=True, exist_ok=True)
    args.metrics.write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


@torch.no_grad()
def save_figure(model, pixels: torch.Tensor, path: Path, cell: int = 96) -> None:
    """Two rows: held-out inputs over their round trips through the trained tokenizer."""
    vq = model.model.vqmodel
    codes = vq.encode(pixels).image_tokens.view(len(pixels), -1)
    rows = [to_pil(pixels, MEAN, STD), to_pil(model.decode_image_tokens(codes), MEAN, STD)]
    figure = Image.new("RGB", (cell * len(pixels), cell * 2), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            figure.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (c * cell, r * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.save(path)


if __name__ == "__main__":
    main()
