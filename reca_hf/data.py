"""Datasets for RecA: synthetic shapes built in code, and loading user data (hub, folder, disk)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SYNTHETIC = "synthetic_shapes"
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


def load_image_dataset(
    name: str,
    config_name: str | None = None,
    split: str = "train",
    image_column: str = "image",
    max_samples: int | None = None,
    seed: int = 0,
    text_column: str | None = None,
):
    """Load training images: ``"synthetic_shapes"``, a folder of images, a ``save_to_disk`` folder, or a hub id.

    Checks that ``image_column`` (and ``text_column``, for captioned data) exist and says which columns
    do when one does not.
    """
    import datasets

    path = Path(name).expanduser()
    if name == SYNTHETIC:
        dataset = synthetic_shapes(max_samples or 256, seed=seed)
    elif (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[split]
    elif path.is_dir() and not any(path.glob("*.py")) and not (path / "README.md").is_file() and _has_images(path):
        dataset = datasets.load_dataset("imagefolder", data_dir=str(path), split=split)
    else:
        dataset = datasets.load_dataset(name, config_name, split=split)
    if image_column not in dataset.column_names:
        raise ValueError(
            f"image_column={image_column!r} is not a column of dataset {name!r} (columns: {dataset.column_names}); "
            "set image_column to the column that holds the images"
        )
    if text_column is not None and text_column not in dataset.column_names:
        raise ValueError(
            f"caption_column={text_column!r} is not a column of dataset {name!r} (columns: {dataset.column_names}); "
            "set caption_column to the column that holds the captions or chat messages"
        )
    if max_samples is not None and name != SYNTHETIC:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    return dataset


def _has_images(folder: Path) -> bool:
    suffixes = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
    return any(p.suffix.lower() in suffixes for p in folder.rglob("*") if p.is_file())
