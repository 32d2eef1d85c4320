"""Counting the FLOPs a RecA step really runs, and the peak FLOP/s an accelerator can give (for MFU).

transformers' ``Trainer.floating_point_ops`` estimates ``6 x parameters x input_ids``: for RecA that counts the
prompt tokens only (not the image tokens, nor the condition the understanding tower encodes) and charges a
backward to frozen weights. :class:`FlopCounter` instead watches the forward pass: every ``nn.Linear`` and
convolution adds ``2 x (its weights) x (the positions it is applied to)``; the backward that autograd will run
is known at the same moment, from what requires a gradient: ``2 x weights x positions`` for the weight gradient
when the weights are trained, and as much again for the input gradient when the input carries one (a frozen
layer between the loss and a trained one). Self-attention (a module with ``q_proj`` and ``k_proj``) adds
``4 x batch x length^2 x width`` forward (counted whole, not halved for causal masks, as the usual MFU
convention does) and twice that backward when gradients flow through it. Embedding lookups cost no FLOPs, and
recomputation under gradient checkpointing is not counted (model FLOPs, not hardware FLOPs). Left out, and
small beside the matmuls: norms, activations, softmax, the quantiser's codebook search, diffusers' attention maps.
"""

from __future__ import annotations

import logging
import math
import re

import torch
from torch import nn

__all__ = ["FlopCounter", "peak_flops_per_second", "resolve_peak_flops"]
logger = logging.getLogger(__name__)

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class FlopCounter:
    """Counts forward and backward FLOPs of the matmuls and convolutions that a model's forward runs.

    Hooks are attached once (:meth:`attach`); counting happens only between :meth:`start` and :meth:`stop`
    (the trainer's training forward: never the probes, the grids or evaluation). Shapes only: nothing is read
    off the device.
    """

    def __init__(self):
        self.forward = 0
        self.backward = 0
        self.active = False
        self._handles: list = []

    def attach(self, model: nn.Module) -> FlopCounter:
        for module in model.modules():
            if isinstance(module, nn.Linear):
                self._handles.append(module.register_forward_hook(self._linear))
            elif isinstance(module, _CONVOLUTIONS):
                self._handles.append(module.register_forward_hook(self._convolution))
            elif isinstance(getattr(module, "q_proj", None), nn.Linear) and hasattr(module, "k_proj"):
                self._handles.append(module.register_forward_hook(self._attention, with_kwargs=True))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False

    def pop(self) -> int:
        """The FLOPs counted since the last pop (forward plus backward), reset to zero."""
        total, self.forward, self.backward = self.forward + self.backward, 0, 0
        return total

    def _counting(self) -> bool:
        # Inside the backward pass a forward hook fires only for gradient-checkpointing recomputation.
        return self.active and torch._C._current_graph_task_id() == -1

    def _add(self, flops: int, weight_trained: bool, input_grad: bool) -> None:
        self.forward += flops
        self.backward += flops * (int(weight_trained) + int(input_grad))

    def _linear(self, module: nn.Linear, inputs, output) -> None:
        if not self._counting():
            return
        positions = output.numel() // module.out_features
        trained = torch.is_grad_enabled() and module.weight.requires_grad
        self._add(2 * module.in_features * module.out_features * positions, trained, _input_grad(inputs))

    def _convolution(self, module, inputs, output) -> None:
        if not self._counting():
            return
        weights = module.out_channels * (module.in_channels // module.groups) * math.prod(module.kernel_size)
        positions = output.numel() // module.out_channels
        trained = torch.is_grad_enabled() and module.weight.requires_grad
        self._add(2 * weights * positions, trained, _input_grad(inputs))

    def _attention(self, module, args, kwargs, output) -> None:
        if not self._counting():
            return
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor) or hidden.dim() < 3:
            return
        length = hidden.shape[-2]
        batch = hidden.numel() // (length * hidden.shape[-1])
        flops = 4 * batch * length * length * module.q_proj.out_features
        grads = torch.is_grad_enabled() and (
            hidden.requires_grad or any(p.requires_grad for p in module.q_proj.parameters())
        )
        self.forward += flops
        self.backward += 2 * flops if grads else 0


def _input_grad(inputs) -> bool:
    first = inputs[0] if inputs else None
    return isinstance(first, torch.Tensor) and first.requires_grad and torch.is_grad_enabled()


# Dense (no sparsity) bf16/fp16 tensor-core peaks from the vendors' datasheets, first match wins; a device not
# listed needs peak_flops_per_second set.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    (r"\bb200\b", 2250e12),
    (r"\bh200\b", 989e12),
    (r"\bh100\b.*\bpcie\b", 756e12),
    (r"\bh100\b.*\bnvl\b", 835e12),
    (r"\bh100\b", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"\bh800\b", 989e12),
    (r"\ba100\b", 312e12),
    (r"\ba800\b", 312e12),
    (r"\bl40s\b", 362e12),
    (r"\bl40\b", 181e12),
    (r"\bl4\b", 121e12),
    (r"\ba10\b", 125e12),
    (r"\brtx 4090\b", 165e12),
    (r"\brtx 3090\b", 71e12),
)


def peak_flops_per_second(device_name: str | None = None) -> float | None:
    """The bf16/fp16 dense peak FLOP/s of a known accelerator (``torch.cuda.get_device_name()`` by default), or
    None for one not in :data:`PEAK_BF16_FLOPS` and when there is no CUDA device."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name(0)
    name = device_name.lower()
    return next((peak for pattern, peak in PEAK_BF16_FLOPS if re.search(pattern, name)), None)


def resolve_peak_flops(args) -> float | None:
    """What ``peak_flops_per_second`` means for a run: a number as given, None as given (no ``mfu``), and
    ``"auto"`` the known bf16/fp16 peak of this CUDA device when the run trains in bf16 or fp16 (None on a CPU,
    for fp32 runs and for devices not in :data:`PEAK_BF16_FLOPS`, which then log how to set it)."""
    value = getattr(args, "peak_flops_per_second", "auto")
    if value != "auto":
        return None if value is None else float(value)
    if not (args.bf16 or args.fp16) or args.use_cpu or not torch.cuda.is_available():
        return None
    peak = peak_flops_per_second()
    if peak is None:
        logger.info(
            "No mfu in the logs: the peak FLOP/s of %s is not known; set peak_flops_per_second (its dense bf16 "
            "peak, e.g. 989e12 for an H100 SXM) to log it.",
            torch.cuda.get_device_name(0),
        )
    return peak
