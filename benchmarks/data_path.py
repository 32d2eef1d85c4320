"""Data-path throughput: RecACollator vs a naive PIL pipeline vs the decode floor, side by side in one process.

Inputs are 1024-px JPEGs (undecoded bytes, as an ``Image(decode=False)`` column gives them), turned into a
384/384 Janus-shaped batch (the tiny Janus adapter with SigLIP's 16-px patches: 576 condition slots).

- ``collator``: this checkout's ``RecACollator`` (decode, views, tokenisation, tensors).
- ``baseline``: the ``RecACollator`` of another git revision (``--baseline REF``), imported from a copy of
  that revision's package, so "today" and "now" are timed in the same process on the same bytes.
- ``naive``: full PIL decode, one resize per view, numpy -> torch.
- ``floor``: JPEG draft decode + one resize + tensor conversion, nothing else.

It also times loading an image folder of ``--folder-files`` files again (warm caches): ``datasets``'
``imagefolder`` (what a load cost before) vs :func:`reca_hf.data.image_folder` reading its saved listing.

Run with one thread, e.g. ``OMP_NUM_THREADS=1 python benchmarks/data_path.py --baseline 61e26f3``.
The best of ``--repeats`` interleaved rounds is reported (other processes share the cores).
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's reca_hf, not an installed one


def photo_like_jpegs(count: int, size: int, seed: int = 0) -> list[bytes]:
    """JPEGs with photo-like statistics: smooth gradients, shapes, and fine noise (q=90)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        y, x = np.mgrid[0:size, 0:size] / size
        base = np.stack([np.sin(x * rng.uniform(2, 9)), np.cos(y * rng.uniform(2, 9)), x * y], -1)
        array = (base * 0.5 + 0.5) * 200 + rng.normal(0, 12, (size, size, 3))
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, y0 = rng.integers(0, size, 2)
            draw.ellipse([x0, y0, x0 + size // 5, y0 + size // 6], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def janus_collator(package, resolution: int):
    """A collator of ``package`` (reca_hf or a baseline copy) for a Janus-shaped adapter at ``resolution``."""
    model, processor = package.testing.tiny_umm("janus")
    model.config.vision_config.patch_size = 16  # Janus-Pro's SigLIP: 576 slots at 384 px
    adapter = package.adapters.get_adapter(model, processor)
    collator = package.collator.RecACollator(adapter)
    # the tiny VQ decodes 32 px only; the collator's data path does not depend on it
    collator.views = package.images.ViewSpec(resolution, resolution, "resize", 4, adapter.background_color)
    return collator


def import_revision(ref: str, folder: Path):
    """Import the ``reca_hf`` package of git revision ``ref`` as ``reca_hf_baseline``."""
    archive = subprocess.run(["git", "archive", ref, "reca_hf", "prompts"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    (folder / "reca_hf").rename(folder / "reca_hf_baseline")
    sys.path.insert(0, str(folder))
    return _package("reca_hf_baseline")


def _package(name: str):
    package = importlib.import_module(name)
    print(f"{name}: {package.__file__}")
    for module in ("testing", "adapters", "collator", "images"):
        setattr(package, module, importlib.import_module(f"{name}.{module}"))
    return package


def naive(jpegs: list[bytes], resolution: int) -> torch.Tensor:
    """What one would write first: full decode, one resize per view, numpy -> torch."""
    views = []
    for data in jpegs:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        for _ in range(2):  # condition and target
            views.append(np.asarray(image.resize((resolution, resolution), Image.Resampling.BICUBIC)))
    return torch.from_numpy(np.stack(views)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def floor(jpegs: list[bytes], resolution: int) -> torch.Tensor:
    """The least work a batch needs: draft decode, one resize, one tensor conversion."""
    views = []
    for data in jpegs:
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (resolution, resolution))
        image = image.convert("RGB").resize((resolution, resolution), Image.Resampling.BICUBIC)
        views.append(torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3))
    return torch.stack(views).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def rows(jpegs: list[bytes]) -> list[dict]:
    return [{"image": {"bytes": data, "path": None}, "caption": "a photo"} for data in jpegs]


def measure(contenders: dict, repeats: int, batch: int) -> dict[str, dict[str, float]]:
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):  # interleaved, so load from other processes hits every contender alike
        for name, run in contenders.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {
        name: {"best_images_per_s": batch / min(t), "median_images_per_s": batch / statistics.median(t)}
        for name, t in times.items()
    }


def folder_loads(files: int, repeats: int) -> dict[str, float]:
    """Seconds to load an unchanged folder of ``files`` images again: imagefolder vs the cached listing."""
    import datasets

    from reca_hf import data

    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "images"
        folder.mkdir()
        for i in range(files):
            Image.new("RGB", (8, 8), (i % 256, 0, 0)).save(folder / f"{i:06d}.png")
        datasets.config.HF_DATASETS_CACHE = str(Path(root) / "cache")
        datasets.disable_progress_bars()
        datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")  # warm its cache
        data.image_folder(folder)
        times = {"imagefolder": [], "cached listing (new process)": [], "cached listing (same process)": []}
        for _ in range(repeats):
            start = time.perf_counter()
            datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
            times["imagefolder"].append(time.perf_counter() - start)
            data._FOLDER_CACHE.clear()  # as in a new process: the listing is read back from the cache dir
            start = time.perf_counter()
            data.image_folder(folder)
            times["cached listing (new process)"].append(time.perf_counter() - start)
            start = time.perf_counter()
            data.image_folder(folder)
            times["cached listing (same process)"].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", help="git revision whose collator is timed as 'baseline' (e.g. 61e26f3)")
    parser.add_argument("--images", type=int, default=16, help="batch size (distinct 1024-px JPEGs)")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--resolution", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--folder-files", type=int, default=2000, help="files in the folder-loading test (0: skip)")
    parser.add_argument("--output", type=Path, default=RESULTS / "data_path.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    jpegs = photo_like_jpegs(args.images, args.size)
    batch = rows(jpegs)
    contenders = {"collator": janus_collator(_package("reca_hf"), args.resolution)}
    with tempfile.TemporaryDirectory() as folder:
        if args.baseline:
            contenders["baseline"] = janus_collator(import_revision(args.baseline, Path(folder)), args.resolution)
        runs = {name: (lambda c=c: c(batch)) for name, c in contenders.items()}
        runs["naive"] = lambda: naive(jpegs, args.resolution)
        runs["floor"] = lambda: floor(jpegs, args.resolution)
        for run in runs.values():  # warm-up
            run()
        results = measure(runs, args.repeats, args.images)
    best = {name: r["best_images_per_s"] for name, r in results.items()}
    ratios = {
        "collator / floor (time)": best["floor"] / best["collator"],
        "collator / naive": best["collator"] / best["naive"],
    }
    if "baseline" in best:
        ratios["collator / baseline"] = best["collator"] / best["baseline"]
    folder = folder_loads(args.folder_files, 3) if args.folder_files else {}
    report = {
        "command": " ".join(["OMP_NUM_THREADS=1", "python", *sys.argv]),
        "setup": f"{args.images} x {args.size}-px JPEG (q=90) -> {args.resolution}/{args.resolution} Janus-shaped batch, "
        f"1 thread, best of {args.repeats} interleaved rounds",
        "results": results,
        "ratios": ratios,
        "folder_load_seconds": {"files": args.folder_files, **folder},
    }
    for name, r in results.items():
        print(f"{name:>10}: {r['best_images_per_s']:7.1f} images/s best, {r['median_images_per_s']:7.1f} median")
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    for name, seconds in folder.items():
        print(f"load a {args.folder_files}-file folder again, {name}: {seconds * 1000:.1f} ms")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
