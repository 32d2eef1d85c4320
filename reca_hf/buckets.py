"""Aspect-ratio buckets: batches of images of similar shape, for views that keep the aspect ratio (the ``keep`` fit).

Under ``keep`` every image has its own size, and a batch of a tall and a wide image pads both to the larger height
and width (BAGEL's packed sequence, its VAE pack). :class:`AspectGroupedSampler` orders a map-style dataset so
that each batch holds images of similar aspect ratio: the rows are shuffled per epoch (from the seed), cut into
groups of ``batch_size * group_batches`` rows, each group sorted by aspect ratio and cut into batches, and the
batches of each group shuffled. The sizes come from the image headers (:func:`aspect_ratios`), read once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.utils.data import Sampler

from .data import SOURCE_KEY
from .images import open_image

_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def image_aspect(value: Any) -> float:
    """``width / height`` of one dataset image value from its header (EXIF orientation applied), without decoding;
    1.0 for a value that cannot be opened (the collator names it when it reaches a batch)."""
    try:
        image = open_image(value, max_pixels=2**62)
    except Exception:
        return 1.0
    width, height = image.size
    try:
        if image.getexif().get(0x0112) in _TRANSPOSED:
            width, height = height, width
    except Exception:
        pass  # a corrupt EXIF block: the collator's decode decides
    if image is not value:
        image.close()
    return width / height if height else 1.0


def aspect_ratios(dataset, image_columns: dict[str, str], image_column: str) -> list[float]:
    """The aspect ratio of every row's image: ``image_columns`` by the row's dataset (``train``, ``i2t``, ...),
    else ``image_column``; a row without that column counts as square."""
    ratios = []
    for index in range(len(dataset)):
        row = dataset[index]
        column = image_columns.get(row.get(SOURCE_KEY), image_column)
        ratios.append(image_aspect(row[column]) if column in row else 1.0)
    return ratios


class AspectGroupedSampler(Sampler[int]):
    """Row indices in an order whose consecutive ``batch_size`` rows have similar aspect ratios (see the module
    docstring); the order is a function of ``(seed, epoch)``, and every row comes once per epoch. Only the last
    group may end in a short batch, and it comes last, so batch boundaries stay aligned."""

    def __init__(self, aspects: list[float], batch_size: int, seed: int = 0, group_batches: int = 50):
        if batch_size < 1 or group_batches < 1:
            raise ValueError(f"AspectGroupedSampler: batch_size={batch_size} and group_batches={group_batches} must "
                             "be positive")  # fmt: skip
        self.log_aspects = np.log(np.asarray(aspects, dtype=np.float64))
        self.batch_size = batch_size
        self.group = batch_size * group_batches
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.log_aspects)

    def batches(self) -> list[list[int]]:
        """This epoch's batches."""
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.log_aspects))
        batches = []
        for start in range(0, len(order), self.group):
            rows = order[start : start + self.group]
            rows = rows[np.argsort(self.log_aspects[rows], kind="stable")]
            group = [rows[i : i + self.batch_size].tolist() for i in range(0, len(rows), self.batch_size)]
            full = group if len(group[-1]) == self.batch_size else group[:-1]
            batches += [full[i] for i in rng.permutation(len(full))] + group[len(full) :]
        return batches

    def __iter__(self):
        for batch in self.batches():
            yield from batch
