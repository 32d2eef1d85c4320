"""Trainer callbacks of a RecA run: keeping prompt draws in step with epochs, and the reconstruction grid."""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image, ImageDraw
from transformers import TrainerCallback

from .adapters.base import UMMAdapter
from .images import ViewSpec, load_image

logger = logging.getLogger(__name__)

GRID_FILE = "reconstructions.png"


class PromptEpochCallback(TrainerCallback):
    """Tells the collator which epoch starts, so each epoch draws fresh instructions (also after a resume)."""

    def __init__(self, collator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.epoch = int(state.epoch or 0)


class ReconstructionGridCallback(TrainerCallback):
    """Reconstructs a few images at the start and at the end of training and saves them as a grid.

    Columns: input | condition as the model saw it | image tokenizer round trip (the best any
    generator can do with these codes) | reconstruction at the start | reconstruction at the end.
    """

    def __init__(self, adapter: UMMAdapter, views: ViewSpec, images: list, seed: int = 0, **generation_kwargs):
        self.adapter = adapter
        self.views = views
        self.images = [load_image(image) for image in images]
        self.generation_kwargs = {"seed": seed, **generation_kwargs}
        self.start: tuple[int, list[Image.Image]] | None = None

    def _reconstruct(self, model) -> list[Image.Image]:
        was_training = model.training
        model.eval()
        try:
            return self.adapter.reconstruct(self.images, model=model, views=self.views, **self.generation_kwargs)
        finally:
            model.train(was_training)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            self.start = (state.global_step, self._reconstruct(model))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or self.start is None:
            return
        start_step, start_images = self.start
        columns = {
            "input": [self.views.target_view(image) for image in self.images],
            "condition": [self.views.condition_view(image) for image in self.images],
        }
        round_trip = self.adapter.round_trip(self.images, model=model, views=self.views)
        if round_trip is not None:
            columns["tokenizer"] = round_trip
        columns[f"step {start_step}"] = start_images
        columns[f"step {state.global_step}"] = self._reconstruct(model)
        path = Path(args.output_dir) / GRID_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        image_grid(columns).save(path)
        logger.info("Saved the reconstruction grid to %s", path)


def image_grid(columns: dict[str, list[Image.Image]], cell: int = 96) -> Image.Image:
    """Lay out equally long image lists as labelled columns."""
    rows = len(next(iter(columns.values())))
    header = 14
    grid = Image.new("RGB", (cell * len(columns), header + cell * rows), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for c, (label, images) in enumerate(columns.items()):
        draw.text((c * cell + 3, 1), label, fill=(0, 0, 0))
        for r, image in enumerate(images):
            grid.paste(
                image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST),
                (c * cell, header + r * cell),
            )
    return grid
