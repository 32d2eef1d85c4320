"""`RecACollator`: dataset rows -> a RecA batch (images through the bottleneck, one instruction each)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .adapters.base import AUTO, UMMAdapter
from .images import ViewSpec, load_image
from .prompts import PromptSampler, load_prompts

INDEX_KEY = "__reca_index__"


class RecACollator:
    """Builds RecA batches for one adapter.

    For every row it decodes the image (any PIL mode becomes RGB, EXIF orientation applied), makes the
    condition view at ``condition_resolution`` through ``condition_bottleneck`` and the target view at
    ``generation_resolution``, draws one instruction from ``(seed, epoch, row index)`` and, with
    probability ``cond_dropout_prob``, replaces it with the adapter's null prompt. The adapter then
    tokenises and normalises (:meth:`UMMAdapter.prepare`).

    The row index comes from the ``__reca_index__`` key that :class:`~reca_hf.RecATrainer` adds to
    every row; rows without it are numbered in the order this collator sees them.
    """

    def __init__(
        self,
        adapter: UMMAdapter,
        condition_resolution: int | str = AUTO,
        generation_resolution: int | str = AUTO,
        condition_bottleneck: str = "resize",
        blur_factor: int = 4,
        prompts: list[str] | str | Path | None = None,
        cond_dropout_prob: float = 0.1,
        image_column: str = "image",
        seed: int = 0,
    ):
        self.adapter = adapter
        condition, generation = adapter.resolve_resolutions(condition_resolution, generation_resolution)
        self.views = ViewSpec(condition, generation, condition_bottleneck, blur_factor, adapter.background_color)
        templates = prompts if isinstance(prompts, list) else load_prompts(prompts)
        self.sampler = PromptSampler(templates, adapter.null_prompt, cond_dropout_prob, seed)
        self.image_column = image_column
        self.epoch = 0
        self._rows_seen = 0

    def _row_index(self, example: dict[str, Any]) -> int:
        index = example.get(INDEX_KEY)
        if index is None:
            index, self._rows_seen = self._rows_seen, self._rows_seen + 1
        return int(index)

    def _image(self, example: dict[str, Any], index: int):
        if self.image_column not in example:
            raise KeyError(
                f"dataset row {index} has no column {self.image_column!r} (columns: {sorted(k for k in example if k != INDEX_KEY)}); "
                "set image_column to the column that holds the images"
            )
        try:
            return load_image(example[self.image_column])
        except Exception as error:
            raise ValueError(
                f"dataset row {index}: column {self.image_column!r} could not be decoded as an image "
                f"({type(error).__name__}: {error}); fix or remove that row"
            ) from error

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        indices = [self._row_index(example) for example in examples]
        images = [self._image(example, index) for example, index in zip(examples, indices)]
        draws = [self.sampler.draw(index, self.epoch) for index in indices]
        instructions = [instruction for instruction, _ in draws]
        batch = self.adapter.prepare(
            [self.views.condition_view(image) for image in images],
            [self.views.target_view(image) for image in images],
            instructions,
        )
        batch["dataset_index"] = torch.tensor(indices)
        batch["prompt_dropped"] = torch.tensor([dropped for _, dropped in draws])
        batch["instructions"] = instructions
        return batch
