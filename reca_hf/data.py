"""Datasets for RecA: synthetic shapes built in code, loading user data (hub, folder, disk), and the
undecoded, source-tagged rows the collator decodes itself (so a bad image names its dataset, row and file).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset, IterableDataset

from .images import BadImageError, decode_image

logger = logging.getLogger(__name__)

SYNTHETIC = "synthetic_shapes"
SOURCE_KEY = "__reca_source__"  # the name of the dataset a row comes from: train, i2t, t2i or eval
ROW_KEY = "__reca_row__"  # the row's index in that dataset, whatever mixes or wrappers re-index it later
# The RecAConfig field naming each dataset's image column (unset ones fall back to image_column).
IMAGE_COLUMN_FIELDS = {"train": "image_column", "i2t": "i2t_image_column", "t2i": "t2i_image_column",
                       "eval": "eval_image_column"}  # fmt: skip
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_FOLDER_CACHE: dict[str, Any] = {}  # folder-state key -> dataset, for loads within one process
_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 40),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
    "cyan": (40, 190, 200),
    "black": (20, 20, 20),
}
_BACKGROUNDS = {
    "white": (245, 245, 245),
    "grey": (128, 128, 128),
    "black": (15, 15, 15),
    "beige": (225, 210, 180),
}
_SHAPES = ("circle", "square", "triangle")
_PLACES = {"top left": (0.27, 0.27), "top right": (0.73, 0.27), "bottom left": (0.27, 0.73),
           "bottom right": (0.73, 0.73), "centre": (0.5, 0.5)}  # fmt: skip


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, centre, radius: float, colour) -> None:
    x, y = centre
    if shape == "circle":
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
    elif shape == "square":
        draw.rectangle([x - radius, y - radius, x + radius, y + radius], fill=colour)
    else:
        draw.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=colour)


def _shapes_image(rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
    background = list(_BACKGROUNDS)[rng.integers(len(_BACKGROUNDS))]
    image = Image.new("RGB", (size, size), _BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    places = rng.choice(list(_PLACES), size=int(rng.integers(1, 3)), replace=False)
    parts = []
    for place in places:
        colours = [c for c in _COLOURS if c != background]
        colour = colours[rng.integers(len(colours))]
        shape = _SHAPES[rng.integers(len(_SHAPES))]
        big = bool(rng.integers(2))
        radius = size * (0.2 if big else 0.12)
        centre = (_PLACES[place][0] * size, _PLACES[place][1] * size)
        _draw_shape(draw, shape, centre, radius, _COLOURS[colour])
        where = "in the centre" if place == "centre" else f"at the {place}"
        parts.append(f"a {'large' if big else 'small'} {colour} {shape} {where}")
    return image, f"{' and '.join(parts).capitalize()}, on a {background} background."


def synthetic_shapes(n: int, size: int = 64, seed: int = 0):
    """``n`` images of one or two coloured shapes on a plain background, with captions saying what is where.

    Returns a ``datasets.Dataset`` with columns ``image`` (PIL) and ``caption`` (str); the same
    ``(n, size, seed)`` always gives the same data.
    """
    import datasets

    if n < 1 or size < 8:
        raise ValueError(f"synthetic_shapes needs n >= 1 and size >= 8, got n={n}, size={size}")
    rng = np.random.default_rng(seed)
    images, captions = zip(*(_shapes_image(rng, size) for _ in range(n)))
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": list(images), "caption": list(captions)}, features=features)


DATASET_FIELDS = {"train": "dataset_name", "i2t": "i2t_dataset_name", "t2i": "t2i_dataset_name"}


def load_image_dataset(
    name: str,
    config_name: str | None = None,
    split: str = "train",
    image_column: str = "image",
    max_samples: int | None = None,
    seed: int = 0,
    text_column: str | None = None,
    source: str = "train",
    streaming: bool = False,
):
    """Load training images: ``"synthetic_shapes"``, a folder of images, a ``save_to_disk`` folder, or a hub id.

    Checks that ``image_column`` (and ``text_column``, for captioned data) exist and says which columns do when
    one does not; errors name the recipe fields of ``source`` (train, i2t or t2i), e.g. ``i2t_image_column``.
    ``streaming`` gives a ``datasets.IterableDataset`` (``load_dataset(..., streaming=True)``; in-memory and
    saved datasets through ``to_iterable_dataset``).
    """
    import datasets

    field, column_field = DATASET_FIELDS.get(source, "dataset_name"), IMAGE_COLUMN_FIELDS.get(source, "image_column")
    path = Path(name).expanduser()
    problem = local_dataset_problem(name, field)
    if problem:
        raise (FileNotFoundError if "no such folder" in problem else ValueError)(problem)
    if name == SYNTHETIC:
        dataset = synthetic_shapes(max_samples or 256, seed=seed)
    elif (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[split]
    elif path.is_dir() and not any(path.glob("*.py")) and not (path / "README.md").is_file() and _has_images(path):
        if streaming:
            dataset = datasets.load_dataset("imagefolder", data_dir=str(path), split=split, streaming=True)
        else:
            dataset = image_folder(path, split)
    else:
        dataset = datasets.load_dataset(name, config_name, split=split, streaming=streaming)
    columns = dataset.column_names
    if columns is not None and image_column not in columns:
        raise ValueError(
            f"{column_field}={image_column!r} is not a column of dataset {field}={name!r} (columns: {columns}); "
            f"set {column_field} to the column that holds the images"
        )
    if columns is not None and text_column is not None and text_column not in columns:
        raise ValueError(
            f"caption_column={text_column!r} is not a column of dataset {field}={name!r} (columns: {columns}); "
            "set caption_column to the column that holds the captions or chat messages"
        )
    if streaming and isinstance(dataset, datasets.Dataset):
        dataset = dataset.to_iterable_dataset()
    if max_samples is not None and name != SYNTHETIC:
        if isinstance(dataset, datasets.IterableDataset):
            dataset = dataset.take(max_samples)
        else:
            dataset = dataset.select(range(min(max_samples, len(dataset))))
    return dataset


def local_dataset_problem(name: str | None, field: str = "dataset_name") -> str | None:
    """What is wrong with a dataset name that is a local path (a missing or empty folder), else None."""
    if not name or name == SYNTHETIC:
        return None
    path = Path(name).expanduser()
    if path.is_dir() and not any(p.is_file() for p in path.rglob("*")):
        return f"{field}={name!r} is an empty folder; set {field} to a folder of images or a hub id"
    if looks_local(name) and not path.exists():
        return f"{field}={name!r}: no such folder; set {field} to an existing folder or a hub id"
    return None


def image_folder(folder: str | Path, split: str = "train"):
    """A folder of images (with ``metadata.csv``/``.jsonl`` captions, as ``imagefolder`` reads them) as a dataset.

    The listing (file paths and metadata columns, not the image bytes) is cached, keyed by the folder's
    state (every file's relative path, size and mtime), in memory and under the ``datasets`` cache:
    loading an unchanged folder again reads the saved listing instead of re-scanning it. A folder without image files is an error naming the folder.
    """
    import datasets

    folder = Path(folder).expanduser().resolve()
    state = _folder_state(folder)
    if not any(relative.lower().endswith(IMAGE_SUFFIXES) for relative, _, _ in state):
        raise ValueError(
            f"dataset folder {str(folder)!r} has no image files ({', '.join(IMAGE_SUFFIXES)}); set dataset_name to a "
            "folder of images"
        )
    key = hashlib.sha256(repr((str(folder), split, datasets.__version__, state)).encode()).hexdigest()[:24]
    if key in _FOLDER_CACHE:
        return _FOLDER_CACHE[key]
    saved = Path(datasets.config.HF_DATASETS_CACHE) / "reca_folders" / f"{key}.arrow"
    if not saved.is_file():
        listing = datasets.load_dataset("imagefolder", data_dir=str(folder), split=split)
        _write_arrow(listing.data.table, saved)  # paths only: save_to_disk would copy every image's bytes
    dataset = datasets.Dataset.from_file(str(saved))
    _FOLDER_CACHE[key] = dataset
    return dataset


def _write_arrow(table, path: Path) -> None:
    """Write ``table`` (with its ``datasets`` features in the schema) as an Arrow stream, atomically."""
    import pyarrow as pa

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(partial, path)


def _folder_state(folder: Path) -> list[tuple[str, int, int]]:
    """``(relative path, size, mtime_ns)`` of every file under ``folder``, sorted; one ``stat`` per file."""
    state, pending = [], [folder]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=True):
                    pending.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=True):
                    info = entry.stat()
                    state.append((os.path.relpath(entry.path, folder), info.st_size, info.st_mtime_ns))
    return sorted(state)


def _has_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.rglob("*") if p.is_file())


def looks_local(name: str) -> bool:
    """A path rather than a hub id (``owner/name``): absolute, relative to ``.`` or ``~``, or deeper than one slash."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def undecoded(dataset, column: str):
    """``dataset`` with its ``datasets.Image`` column ``column`` cast to ``Image(decode=False)``.

    Rows then hold ``{"bytes", "path"}``: the collator decodes them (with JPEG draft mode, and errors that
    name the row and file) instead of ``datasets`` decoding every image in full when the row is read.
    Datasets without such a column (plain lists, path strings) are returned as they are.
    """
    import datasets

    features = getattr(dataset, "features", None) or {}
    feature = features.get(column) if hasattr(features, "get") else None
    if isinstance(feature, datasets.Image) and feature.decode:
        return dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


class SourceRows(Dataset):
    """A map-style dataset whose rows carry their dataset's name and their own index (``SOURCE_KEY``, ``ROW_KEY``).

    The task mix and the trainer re-index rows; these two keys survive that, so an error names the row of
    the dataset the user gave, and ``bad_image_policy: skip`` can draw another row of the same dataset.
    """

    def __init__(self, dataset, name: str):
        self.dataset = dataset
        self.name = name

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[index], SOURCE_KEY: self.name, ROW_KEY: int(index)}

    @property
    def column_names(self) -> list[str] | None:
        return getattr(self.dataset, "column_names", None)

    @property
    def features(self):
        return getattr(self.dataset, "features", None)


def as_source(dataset, name: str, image_column: str):
    """The trainer's view of one of its datasets (``name``: train, i2t, t2i or eval): image column undecoded,
    rows tagged with ``name`` and their index (for a ``datasets.IterableDataset``, the position in its stream).
    ``None`` and other iterable datasets pass through (only undecoded)."""
    import datasets
    from torch.utils.data import IterableDataset

    if dataset is None:
        return None
    dataset = undecoded(dataset, image_column)
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.map(functools.partial(source_tags, name=name), with_indices=True)
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        return dataset
    return SourceRows(dataset, name)


def source_tags(row: dict[str, Any], index: int, name: str) -> dict[str, Any]:
    """The tags :func:`as_source` adds to a streamed row: its dataset's name and its position in the stream."""
    return {SOURCE_KEY: name, ROW_KEY: int(index)}


def find_bad_images(dataset, image_column: str = "image", max_pixels: int | None = None) -> list[str]:
    """Decode every image of ``dataset`` and describe each that fails (row, file, reason); ``[]`` when all decode.

    This is the full check behind ``reca validate --check-images``: it reads every image, so it costs one
    decode per row (the start-of-training check only looks at the folder).
    """
    from .images import DEFAULT_MAX_IMAGE_PIXELS, load_image, source_file

    dataset = undecoded(dataset, image_column)
    problems = []
    for row in range(len(dataset)):
        value = dataset[row][image_column]
        try:
            load_image(value, max_pixels or DEFAULT_MAX_IMAGE_PIXELS)
        except Exception as error:  # every failure is reported, whatever Pillow raised
            file = source_file(value)
            problems.append(f"row {row}{f' (file {file})' if file else ''}: {type(error).__name__}: {error}")
    return problems


def first_good_images(dataset, column: str, count: int, name: str, args) -> list[Image.Image]:
    """The first ``count`` images of ``dataset`` (map-style or a stream), decoded as the collator decodes them:
    a bad one stops with the dataset, row and file named (``bad_image_policy: error``) or is passed over with a
    warning (``skip``), so the grid and the probe never meet an undecodable image later."""
    dataset = undecoded(dataset, column)  # decoded here, not by datasets (whose errors name no row)
    rows = iter(dataset) if isinstance(dataset, IterableDataset) else (
        dataset[i] for i in range(len(dataset))
    )  # fmt: skip
    images = []
    for number, row in enumerate(rows):
        if len(images) == count:
            break
        try:
            images.append(decode_image(row[column], f"{name} dataset row {number}", column, args.max_image_pixels))
        except BadImageError as error:
            if args.bad_image_policy != "skip":
                raise
            logger.warning("Skipped a bad image for the reconstruction grid and the probe: %s", error)
    return images


def has_rows(dataset) -> bool:
    """A dataset with a length and at least one row (iterable datasets have no rows to pick)."""
    return dataset is not None and hasattr(dataset, "__len__") and len(dataset) > 0
