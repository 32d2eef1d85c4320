"""Images for the benchmarks: text-to-image samples in GenEval's, DPG-Bench's or a plain folder layout, and
reconstructions of image files (`reca sample`, `reca reconstruct`).

Layouts, as the official evaluators read them:

* ``geneval`` (djghosh13/geneval, ``evaluation/evaluate_images.py``): prompts are its
  ``evaluation_metadata.jsonl`` (one JSON object per line with ``prompt``, ``tag``, ``include``...); prompt ``i``
  writes ``OUT/{i:05d}/metadata.jsonl`` (that line's object) and ``OUT/{i:05d}/samples/{k:05d}.png``, plus
  ``grid.png`` of its samples.
* ``dpgbench`` (ELLA's ``dpg_bench/compute_dpg_bench.py``): prompts are its ``prompts/`` folder of
  ``<item_id>.txt`` files; each item writes ``OUT/<item_id>.png``, its 4 samples as a 2x2 grid (top left, top
  right, bottom left, bottom right), each at the generation resolution (the evaluator's ``--resolution``,
  ``--pic-num 4``). Nothing else is written into OUT: the evaluator reads every file there.
* ``folder``: prompts from a ``.txt`` file (one per line), a ``.jsonl`` file (a ``prompt`` key) or a folder of
  ``.txt`` files; prompt ``i`` writes ``OUT/{i:05d}_{k}.png``, and ``OUT/prompts.jsonl`` lists each prompt with
  its files.

Sampling is resumable: a prompt whose files all exist is skipped. Batches of prompts are fixed by their
position, and batch ``b`` is sampled with seed ``seed + b``, so a resumed run writes the same images as an
uninterrupted one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

logger = logging.getLogger(__name__)

LAYOUTS = ("geneval", "dpgbench", "folder")
DPG_GRID = 4  # DPG-Bench scores a 2x2 grid of samples per prompt
GENEVAL_SAMPLES = 4  # GenEval's own generation script draws 4 per prompt


@dataclass
class Prompt:
    """One prompt of a benchmark: its text, the name its files take, and the metadata the layout stores."""

    text: str
    name: str
    metadata: dict[str, Any] = field(default_factory=dict)


def read_prompts(path: str | Path, layout: str) -> list[Prompt]:
    """The prompts of ``path`` in the format ``layout`` expects (errors name the file, line and fix)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--prompts {str(path)!r}: no such file or folder")
    if layout == "dpgbench" and not path.is_dir():
        raise ValueError(
            f"--prompts {str(path)!r}: DPG-Bench's prompts are a folder of <item_id>.txt files (dpg_bench/prompts)"
        )
    if layout == "geneval" and (path.is_dir() or path.suffix != ".jsonl"):
        raise ValueError(
            f"--prompts {str(path)!r}: GenEval's prompts are its evaluation_metadata.jsonl (one JSON object per line)"
        )
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise ValueError(f"--prompts {str(path)!r}: the folder holds no .txt prompt files")
        return [Prompt(f.read_text(encoding="utf-8").strip(), f.stem) for f in files]
    lines = [line for line in path.read_text(encoding="utf-8").splitlines()]
    if path.suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON object ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f'{path}:{number}: each line needs a "prompt" string')
            prompts.append(Prompt(record["prompt"], f"{len(prompts):05d}", record))
        return prompts
    return [Prompt(line.strip(), f"{i:05d}") for i, line in enumerate(t for t in lines if t.strip())]


def sampler_settings(adapter) -> list[str]:
    """The sampler settings (``text_to_image(..., **sampler)`` keys) this architecture takes."""
    import inspect

    parameters = inspect.signature(adapter.sample_text_codes).parameters.values()
    return [p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]


def check_sampler(adapter, sampler: dict[str, Any]) -> None:
    """Refuse sampler settings the architecture does not take, listing those it does."""
    known = sampler_settings(adapter)
    unknown = sorted(set(sampler) - set(known))
    if unknown:
        raise ValueError(
            f"--sampler {', '.join(unknown)}: not a setting of the {adapter.name} sampler (it takes "
            f"{', '.join(known) or 'none'})"
        )


def output_files(out: Path, layout: str, prompt: Prompt, count: int) -> list[Path]:
    """The files one prompt's samples take in ``layout`` (what resuming checks)."""
    if layout == "geneval":
        folder = out / prompt.name
        return [folder / "metadata.jsonl", *(folder / "samples" / f"{k:05d}.png" for k in range(count))]
    if layout == "dpgbench":
        return [out / f"{prompt.name}.png"]
    return [out / f"{prompt.name}_{k}.png" for k in range(count)]


def square_grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Images of one size in rows of ``columns``, left to right then top to bottom."""
    width, height = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * width, rows * height))
    for k, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((k % columns) * width, (k // columns) * height))
    return grid


def write_samples(out: Path, layout: str, prompt: Prompt, images: list[Image.Image]) -> None:
    """Write one prompt's samples in ``layout``."""
    if layout == "geneval":
        folder = out / prompt.name
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        for k, image in enumerate(images):
            image.save(folder / "samples" / f"{k:05d}.png")
        square_grid(images, len(images)).save(folder / "grid.png")
        (folder / "metadata.jsonl").write_text(json.dumps(prompt.metadata))  # written last: it marks the prompt done
    elif layout == "dpgbench":
        square_grid(images, 2).save(out / f"{prompt.name}.png")
    else:
        for path, image in zip(output_files(out, layout, prompt, len(images)), images):
            image.save(path)


def sample_prompts(
    adapter,
    prompts: list[Prompt],
    out: str | Path,
    layout: str,
    *,
    num_images_per_prompt: int | None = None,
    batch_size: int = 1,
    seed: int = 0,
    guidance_scale: float | None = None,
    resolution: int | None = None,
    progress: bool = True,
    **sampler,
) -> dict[str, int]:
    """Text-to-image samples of every prompt written in ``layout`` under ``out``; prompts whose files exist are
    skipped. Returns ``{"prompts", "sampled", "skipped", "images"}`` (images written by this call)."""
    from transformers.utils.logging import tqdm

    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: choose one of {', '.join(LAYOUTS)}")
    count = num_images_per_prompt or (
        GENEVAL_SAMPLES if layout == "geneval" else DPG_GRID if layout == "dpgbench" else 1
    )
    if layout == "dpgbench" and count != DPG_GRID:
        raise ValueError(f"--num_images_per_prompt {count}: DPG-Bench scores a 2x2 grid, so it takes 4 per prompt")
    if batch_size < 1:
        raise ValueError(f"--batch_size {batch_size}: use a positive integer")
    check_sampler(adapter, sampler)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if layout == "folder":
        index = [{"prompt": p.text, "files": [f.name for f in output_files(out, layout, p, count)]} for p in prompts]
        (out / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in index))
    done = [all(f.is_file() for f in output_files(out, layout, p, count)) for p in prompts]
    stats = {"prompts": len(prompts), "sampled": 0, "skipped": sum(done), "images": 0}
    if stats["skipped"]:
        logger.info("%d of %d prompts already have their samples in %s: skipped", sum(done), len(prompts), out)
    bar = tqdm(total=len(prompts), initial=sum(done), desc="reca sample", unit="prompt", disable=not progress)
    for batch_index, start in enumerate(range(0, len(prompts), batch_size)):
        batch = prompts[start : start + batch_size]
        if all(done[start : start + len(batch)]):
            continue
        images = adapter.text_to_image(
            [p.text for p in batch],
            seed=seed + batch_index,
            num_images_per_prompt=count,
            guidance_scale=guidance_scale,
            resolution=resolution,
            **sampler,
        )
        for offset, prompt in enumerate(batch):
            if done[start + offset]:
                continue
            write_samples(out, layout, prompt, images[offset * count : (offset + 1) * count])
            stats["sampled"] += 1
            stats["images"] += count
            bar.update(1)
    bar.close()
    return stats


def reconstruct_files(
    adapter,
    images: list[str | Path],
    out: str | Path,
    *,
    views=None,
    batch_size: int = 4,
    seed: int = 0,
    side_by_side: bool = False,
    **generation,
) -> list[Path]:
    """Reconstructions of image files, written as ``OUT/<file stem>.png`` (with ``side_by_side``: the input's
    target view on the left, its reconstruction on the right); returns the paths written."""
    from PIL import Image

    from .images import load_image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in images]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"no such image file: {', '.join(missing)}")
    stems = [p.stem for p in paths]
    if len(set(stems)) != len(stems):
        raise ValueError("two images share a file name; their reconstructions would overwrite each other")
    views = views or adapter.default_views()
    written = []
    for batch_index, start in enumerate(range(0, len(paths), batch_size)):
        batch = paths[start : start + batch_size]
        inputs = [load_image(str(p)) for p in batch]
        results = adapter.reconstruct(inputs, views=views, seed=seed + batch_index, **generation)
        for path, source, image in zip(batch, inputs, results):
            if side_by_side:
                shown = views.target_view(source).resize(image.size)
                pair = Image.new("RGB", (2 * image.width, image.height), "white")
                pair.paste(shown, (0, 0))
                pair.paste(image.convert("RGB"), (image.width, 0))
                image = pair
            target = out / f"{path.stem}.png"
            image.save(target)
            written.append(target)
    return written
