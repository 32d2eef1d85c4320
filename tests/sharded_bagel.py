"""Run by tests/test_distributed.py on 2 CPU processes (torchrun, gloo): one RecA step of the tiny BAGEL sharded with
FSDP2 (``fully_shard`` on the wrap units of the shipped ``fsdp2_bagel`` accelerate config, then the root), through
``RecATrainer.compute_loss``, against one process computing the same global batch unsharded.

The global batch is four images of four aspect ratios, two per process. The reference, on every process before
sharding: each process's micro-batch through ``adapter.loss`` under that process's seed, combined as the authors'
token-weighted mean over all four images' VAE tokens, and its gradients. The sharded step: each process's
micro-batch through the trainer's ``compute_loss`` (which divides by the global token count) under the same seed,
backward, FSDP2's gradient reduction. Then the collapse probe and the grid's reconstructions, whole and sharded
(``forward_only``). Each rank writes what it read to ``OUT/rank<N>.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from accelerate.commands.config.config_args import load_config_from_file
from torch.distributed.fsdp import fully_shard

from reca_hf import RecAConfig, RecATrainer
from reca_hf.callbacks import condition_swap_loss
from reca_hf.cli import accelerate_config_path
from reca_hf.data import synthetic_shapes
from reca_hf.sharding import forward_only
from reca_hf.testing import tiny_umm

SIZES = [(48, 32), (40, 40), (24, 48), (48, 24)]  # (width, height): two micro-batches of different token counts


def shard(model: torch.nn.Module) -> None:
    """As accelerate's fsdp2 set-up with the shipped ``fsdp2_bagel`` config: its wrap units, then the root."""
    config = load_config_from_file(str(accelerate_config_path("fsdp2_bagel"))).fsdp_config
    units = set(config["fsdp_transformer_layer_cls_to_wrap"].split(","))
    for module in list(model.modules())[1:]:
        if type(module).__name__ in units:
            fully_shard(module)
    fully_shard(model)


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    shapes = synthetic_shapes(len(SIZES), size=48, seed=3)
    images = [image.resize(size) for image, size in zip(shapes["image"], SIZES)]
    model, tokenizer = tiny_umm("bagel")
    args = RecAConfig(output_dir=str(out / "run"), use_cpu=True, report_to="none", max_steps=1, save_strategy="no",
                      num_reconstruction_images=0, collapse_action="off", disable_tqdm=True, seed=0)  # fmt: skip
    trainer = RecATrainer(model, args=args, train_dataset=shapes, processing_class=tokenizer)  # freeze: auto
    adapter, views = trainer.adapter, trainer.views
    adapter.num_inference_steps = 4  # the grid's sampler, shortened (the authors' 50 steps read the same way)
    model = trainer.model.train()
    batches = [
        adapter.prepare(
            [views.condition_view(i) for i in part],
            [views.target_view(i) for i in part],
            [adapter.default_instruction] * len(part),
        )
        for part in (images[:2], images[2:])
    ]

    # The reference: the global batch on one process, unsharded, as the authors' token-weighted mean.
    losses, tokens = [], []
    for process, batch in enumerate(batches):
        torch.manual_seed(100 + process)
        losses.append(adapter.loss(model, batch))
        tokens.append(adapter.loss_tokens(batch))
    reference = sum(loss * count for loss, count in zip(losses, tokens)) / sum(tokens)
    reference.backward()
    reference_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    def read(model) -> dict:
        pictures = adapter.reconstruct(images[:2], model=model, views=views, seed=0)
        return {"loss_probe": condition_swap_loss(adapter, model, images, views),
                "grid": [np.asarray(picture).astype(float).mean() for picture in pictures]}  # fmt: skip

    whole = forward_only(model, read)
    shard(model)
    sharded = forward_only(model, read)

    # The sharded step: this process's micro-batch through the trainer's loss, FSDP2 reducing the gradients.
    torch.manual_seed(100 + rank)
    loss = trainer.compute_loss(model, dict(batches[rank]))
    loss.backward()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    worst = max(float((grads[n] - g).abs().max() / g.abs().max().clamp(min=1e-12)) for n, g in reference_grads.items())
    result = {
        "tokens": tokens,
        "losses": [float(reference.detach()), float(mean / world)],
        "same_gradient_names": sorted(grads) == sorted(reference_grads) and len(grads) > 0,
        "worst_gradient_difference": worst,
        "whole": whole,
        "sharded": sharded,
        "left_whole": [n for n, p in model.named_parameters() if type(p).__name__ != "DTensor"],
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
