"""How many torch threads a CPU run uses (``RecAConfig.cpu_threads``).

A tiny model's matrix products are too small for several intra-op threads to pay for their synchronisation, and
on a machine whose cores are busy the extra threads wait on each other: the Janus demo's 100 steps take about
ten times longer with torch's default thread count at a load of 5 than with one thread
(``python benchmarks/demo_threads.py``). So ``"auto"`` gives a tiny model on the CPU one thread, unless the user
already chose through ``OMP_NUM_THREADS``; real models keep torch's default.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)

TINY_MODEL_PARAMETERS = 50_000_000  # below this, one thread is as fast on an idle machine and far faster on a busy one


def resolve_cpu_threads(setting: int | str, parameters: int, on_cpu: bool, environ=os.environ) -> int | None:
    """The thread count to set, or None to leave torch's own. ``setting``: ``"auto"``, 0 (torch's default) or a
    number of threads."""
    if setting != "auto":
        return int(setting) or None
    if not on_cpu or parameters >= TINY_MODEL_PARAMETERS or environ.get("OMP_NUM_THREADS"):
        return None
    return 1


def apply_cpu_threads(setting: int | str, model: torch.nn.Module, device: torch.device) -> int | None:
    """Set torch's intra-op threads for this run as :func:`resolve_cpu_threads` says; returns what it set."""
    threads = resolve_cpu_threads(setting, sum(p.numel() for p in model.parameters()), device.type == "cpu")
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
        logger.info("torch threads: %d (cpu_threads=%r; set cpu_threads: 0 to keep torch's default)", threads, setting)
    return threads
