"""Collapse-probe cost: encoding each probe image once vs once per pass, side by side in one process.

The token probe (:func:`reca_hf.callbacks.swap_probe`, Janus-Pro-shaped ``cpu`` model of ``janus_shapes``, 8
images at 384 px) and the loss probe (:func:`reca_hf.callbacks.condition_swap_loss`, the tiny OpenUni model, 8
images, 3 noise levels) run with the frozen towers' outputs computed once (:meth:`UMMAdapter.frozen_features`)
and without (every pass encodes again, as before), alternating, best of ``--repeats``.

    OMP_NUM_THREADS=1 python benchmarks/probe_cost.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from janus_shapes import janus_pro_like  # noqa: E402

from reca_hf.adapters import get_adapter  # noqa: E402
from reca_hf.callbacks import condition_swap_loss, swap_probe  # noqa: E402
from reca_hf.data import synthetic_shapes  # noqa: E402
from reca_hf.testing import tiny_umm  # noqa: E402


def _best(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def measure(name: str, model, processor, probe, images: int, repeats: int) -> dict:
    adapter = get_adapter(model, processor)
    views = adapter.default_views()
    pictures = synthetic_shapes(images, size=views.generation_resolution, seed=1)["image"]
    once = lambda: probe(adapter, model, pictures, views)  # noqa: E731
    every_pass_adapter = get_adapter(model, processor)
    every_pass_adapter.frozen_features = lambda model, batch, names=None: {}  # as before: each pass encodes
    every_pass = lambda: probe(every_pass_adapter, model, pictures, views)  # noqa: E731
    once(), every_pass()  # warm-up
    best_once, best_every = [], []
    for _ in range(repeats):  # alternating, so both see the same load
        best_once.append(_best(once, 1))
        best_every.append(_best(every_pass, 1))
    return {"probe": name, "encode_once_s": min(best_once), "encode_every_pass_s": min(best_every),
            "speedup": min(best_every) / min(best_once)}  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="'' for no file")
    args = parser.parse_args(argv)
    janus, janus_processor = janus_pro_like("cpu")
    openuni, openuni_processor = tiny_umm("openuni")
    results = [
        measure("swap_probe (Janus-Pro-shaped cpu)", janus, janus_processor, swap_probe, args.images, args.repeats),
        measure(
            "condition_swap_loss (tiny OpenUni)",
            openuni,
            openuni_processor,
            condition_swap_loss,
            args.images,
            args.repeats,
        ),  # fmt: skip
    ]
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "probe_cost.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
