"""Forward-only work on a sharded model (FSDP, DeepSpeed ZeRO-3): the collapse probe and the reconstruction grid
run on every rank together, each with the whole parameters, and rank 0 reports.

Under sharding no rank holds the whole model, so a forward run by one rank alone waits forever for the others'
shards. :func:`whole_parameters` gathers them on every rank for the duration of a forward-only call: FSDP2
(``fully_shard``) unshards every sharded module (``FSDPModule.unshard``); DeepSpeed ZeRO-3 gathers every partitioned
parameter (``deepspeed.zero.GatheredParameters``, untested here: DeepSpeed needs an accelerator). FSDP1 needs no
gathering here: :func:`forward_only` runs the function inside the FSDP root's own forward (as training does), where
the root's parameters are whole and each nested unit gathers its own in its forward (enough for the probes; not for
generation that reads a wrapped block's weights outside its forward, so the trainer keeps the grid off under FSDP1). Memory: for the call, every rank holds the
model's whole parameters (no gradients, no optimizer state) on top of its shards, as a full-state-dict save does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

ShardedForward = Callable[[Callable[[torch.nn.Module], Any]], Any]  # runs function(model) on every rank together


@contextmanager
def whole_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Every parameter of ``model`` whole on this rank until the block ends (a no-op for a model that is not
    sharded). Every rank must enter it together, and run the same forward passes inside it."""
    with ExitStack() as stack:
        fsdp2 = _fsdp2_modules(model)
        # A sharded block reshards after its own forward by default; a method that is not its forward (a VQ codebook
        # lookup while generating) would then meet sharded weights. So none reshards until the block ends.
        reshards = [_reshards_after_forward(module) for module in fsdp2]
        for module in fsdp2:
            module.set_reshard_after_forward(False, recurse=False)
            module.unshard()
        if fsdp2:
            stack.callback(_restore, fsdp2, reshards)
        partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]  # DeepSpeed ZeRO-3's mark
        if partitioned:
            import deepspeed  # a ZeRO-3 run has it: its engine partitioned these parameters

            stack.enter_context(deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None))
        yield


@contextmanager
def forward_as(module: torch.nn.Module, function):
    """Temporarily make ``module``'s forward compute the RecA loss (or another function of the model).

    Calling the (possibly DDP / FSDP / DeepSpeed wrapped) training model then runs the loss inside the
    wrapper's own forward, which is what gradient synchronisation (and FSDP's parameter gathering) hooks onto.
    The replacement serves one call: inside it, ``module``'s own forward is back (generation calls it).
    """
    previous = module.__dict__.get("forward")

    def restore():
        if previous is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = previous

    def once(*args, **kwargs):
        restore()
        return function(*args, **kwargs)

    module.forward = once
    try:
        yield
    finally:
        restore()


def forward_only(wrapped: torch.nn.Module, function: Callable[[torch.nn.Module], Any]) -> Any:
    """``function(model)`` with ``model`` the module under ``wrapped`` (a DDP, FSDP or DeepSpeed wrapper, or a plain
    model), forward only: under no_grad, inside ``wrapped``'s own forward (where FSDP1 gathers its root's
    parameters) and with every parameter whole (:func:`whole_parameters`). Under sharding every rank must call it
    at the same point with the same inputs (the same collectives then run on all). Returns what ``function`` does."""
    from .adapters import unwrap_model

    base = unwrap_model(wrapped)
    results = []

    def inside(*args, **kwargs) -> None:  # in the wrapper's forward: FSDP2's root has set up its state by now
        with whole_parameters(base):
            results.append(function(base))

    with torch.no_grad(), forward_as(base, inside):
        wrapped()
    for module in _fsdp2_modules(base):  # the root keeps its parameters whole after its forward: shard them again
        module.reshard()
    return results[0]


def _reshards_after_forward(module) -> bool:
    # FSDP2 has a setter but no getter: the parameter groups keep a post-forward mesh when they reshard
    return any(group.post_forward_mesh_info is not None for group in module._get_fsdp_state()._fsdp_param_groups)


def _restore(modules: list, reshards: list[bool]) -> None:
    for module, reshard in zip(modules, reshards):
        module.set_reshard_after_forward(reshard, recurse=False)
        module.reshard()


def _fsdp2_modules(model: torch.nn.Module) -> list[Any]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return []
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def from_rank_zero(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object; ``value`` itself without a process group), so that all
    ranks act on one reading, e.g. all stop together."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    if torch.distributed.get_world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
