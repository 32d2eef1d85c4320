"""No host-device syncs in a training step from reca_hf's own code.

On a CPU there is no sync to see, so the test counts the operations that would wait for an accelerator: reading
a number off a tensor (``.item()``, ``int()``, ``float()``, ``bool()``, ``.tolist()``), and operations whose
output size depends on the data (``nonzero``, boolean indexing, ``masked_select``). Each is attributed to the
innermost frame outside torch; the ones in reca_hf must be none after the first step (which checks each batch
layout once, :mod:`reca_hf.slots`). transformers' own causal-mask shortcut (``masking_utils``) reads its padding
mask every forward: that is the library's, and is reported here only by not being counted.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import reca_hf
from reca_hf import RecATrainer
from reca_hf.data import synthetic_shapes
from reca_hf.testing import tiny_umm

aten = torch.ops.aten
_READS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten._unique2, aten.unique_consecutive}
_INDEXING = {aten.index, aten.index_put, aten.index_put_}
_PACKAGE = str(Path(reca_hf.__file__).parent)
_TORCH = str(Path(torch.__file__).parent)


def _culprit() -> str:
    """The innermost frame outside torch and this file: who asked for the sync."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if not frame.filename.startswith(_TORCH) and frame.filename != __file__:
            return f"{frame.filename}:{frame.lineno}"
    return "?"


class SyncCounter(TorchDispatchMode):
    """Records every would-be host-device sync, by the code that caused it."""

    def __init__(self):
        super().__init__()
        self.culprits: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        indices = args[1] if packet in _INDEXING and len(args) > 1 else None
        if packet in _READS or (
            indices and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
        ):
            self.culprits.append(_culprit())
        return func(*args, **(kwargs or {}))


def _count_syncs(monkeypatch, trainer) -> list[list[str]]:
    """Train, returning for each training_step the reca_hf lines that would have synced."""
    per_step: list[list[str]] = []
    step = trainer.training_step
    tolist = torch.Tensor.tolist

    def counting_step(*args, **kwargs):
        counter = SyncCounter()

        def counted_tolist(tensor):  # a direct copy to Python, below the dispatcher
            counter.culprits.append(_culprit())
            return tolist(tensor)

        monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
        try:
            with counter:
                return step(*args, **kwargs)
        finally:
            monkeypatch.setattr(torch.Tensor, "tolist", tolist)
            per_step.append([c for c in counter.culprits if c.startswith(_PACKAGE)])

    monkeypatch.setattr(trainer, "training_step", counting_step)
    trainer.train()
    return per_step


@pytest.mark.parametrize("arch", ["janus", "emu3", "flow", "openuni"])
def test_training_steps_do_not_sync(monkeypatch, make_args, arch):
    model, processor = tiny_umm(arch)
    data = synthetic_shapes(12, size=32, seed=0)
    mix = {"i2t_dataset": data, "args": make_args(max_steps=4, logging_steps=100, collapse_action="off",
                                                  task_ratios={"reconstruction": 1, "image_to_text": 1})}  # fmt: skip
    if arch != "janus":  # one architecture with the task mix is enough; the others reconstruct only
        mix = {"args": make_args(max_steps=4, logging_steps=100, collapse_action="off")}
    trainer = RecATrainer(model, train_dataset=data, processing_class=processor, **mix)
    per_step = _count_syncs(monkeypatch, trainer)
    assert len(per_step) == 4
    assert per_step[1:] == [[], [], []], per_step  # the first step checks each batch layout once
    log = trainer.state.log_history[-1]
    assert log["reconstruction_loss"] > 0  # recorded on the device, read at the log
    if arch == "janus":
        assert log["image_to_text_loss"] > 0 and trainer.task_counts["image_to_text"] > 0


def test_a_wrong_slot_count_is_still_refused(tiny_janus, shapes):
    from reca_hf import RecACollator
    from reca_hf.adapters import get_adapter

    model, processor = tiny_janus
    adapter = get_adapter(model, processor)
    batch = RecACollator(adapter)([shapes[0], shapes[1]])
    batch = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    batch["condition_mask"] = batch["condition_mask"].clone()
    batch["condition_mask"][0, batch["condition_mask"][0].nonzero()[0]] = False  # one slot fewer
    with pytest.raises(ValueError, match=r"condition slots in the prompt but \d+ understanding features"):
        adapter.loss(model, batch)
