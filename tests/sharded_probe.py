"""Run by tests/test_distributed.py on 2 CPU processes (torchrun, gloo): the collapse probes and the reconstruction
grid's generation (reconstructions and text-to-image samples) on a model sharded with FSDP2 (``fully_shard``, as accelerate's fsdp2 config wraps it: each
``_no_split_modules`` block, then the root), through :func:`reca_hf.sharding.forward_only` on every rank, and the
probes on the same blocks wrapped with FSDP1 (FullyShardedDataParallel). Each rank
writes what it read, next to the same readings of the unsharded model, to ``OUT/rank<N>.json``."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

from reca_hf.adapters import LossNoise, get_adapter
from reca_hf.callbacks import condition_swap_loss, swap_probe
from reca_hf.data import synthetic_shapes
from reca_hf.sharding import forward_as, forward_only
from reca_hf.testing import tiny_umm


def shard(model: torch.nn.Module) -> None:
    blocks = set(model._no_split_modules)
    for module in list(model.modules())[1:]:
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(model)


def probes_under_fsdp1(arch: str, images: list) -> dict:
    """FSDP1 (FullyShardedDataParallel, the same blocks wrapped): the probes through forward_only (the grid is off
    under FSDP1: a wrapped block's weights are whole only inside its own forward)."""
    model, processor = tiny_umm(arch)
    adapter = get_adapter(model, processor)
    views = adapter.default_views()

    def read(model) -> dict:
        return {"loss_probe": condition_swap_loss(adapter, model, images, views)} | (
            {"token_probe": swap_probe(adapter, model, images, views)} if arch == "janus" else {}
        )

    whole = read(model)
    blocks = {type(m) for m in model.modules() if type(m).__name__ in set(model._no_split_modules)}
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=blocks)
    wrapped = FullyShardedDataParallel(
        model, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu")
    )
    return {"whole": whole, "sharded": forward_only(wrapped, read)}


def readings(arch: str, images: list) -> dict:
    model, processor = tiny_umm(arch)
    adapter = get_adapter(model, processor)
    views = adapter.default_views()

    def read(model) -> dict:
        result = {"loss_probe": condition_swap_loss(adapter, model, images, views)}
        if arch == "janus":
            result["token_probe"] = swap_probe(adapter, model, images, views)
            pictures = adapter.reconstruct(images[:2], model=model, views=views, seed=0)
            result["grid"] = [np.asarray(picture).astype(float).mean() for picture in pictures]
            samples = adapter.text_to_image(["a red circle"], model=model, seed=0, do_sample=False)  # the before/after
            result["text_to_image"] = [np.asarray(picture).astype(float).mean() for picture in samples]
        return result

    batch = adapter.prepare([views.condition_view(i) for i in images], [views.target_view(i) for i in images],
                            [adapter.default_instruction] * len(images))  # fmt: skip
    whole = read(model)
    with forward_as(model, lambda: adapter.loss(model, batch, noise=LossNoise(seed=0))):
        whole_loss = model()
    whole_loss.backward()
    whole_grads = sorted(name for name, p in model.named_parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    shard(model)
    sharded = forward_only(model, read)
    left_whole = [name for name, p in model.named_parameters() if type(p).__name__ != "DTensor"]
    # a training step still works after the probe
    with forward_as(model, lambda: adapter.loss(model, batch, noise=LossNoise(seed=0))):
        loss = model()
    loss.backward()
    grads = sorted(name for name, p in model.named_parameters() if p.grad is not None)
    return {"whole": whole, "sharded": sharded, "left_whole": left_whole, "losses": [float(whole_loss), float(loss)],
            "same_gradients": grads == whole_grads and len(grads) > 0}  # fmt: skip


def main() -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    images = synthetic_shapes(4, size=32, seed=3)["image"]
    result = {arch: readings(arch, images) for arch in sys.argv[2:]}
    result["fsdp1"] = {arch: probes_under_fsdp1(arch, images) for arch in sys.argv[2:]}
    Path(sys.argv[1], f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
