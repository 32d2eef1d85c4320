"""Trainer callbacks of a RecA run: prompt draws in step with epochs, the reconstruction grid, collapse detection."""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .adapters.base import UMMAdapter
from .adapters.helpers import cached_key, eval_mode
from .adapters.targets import LossNoise
from .config import COLLAPSE_ACTIONS, MAX_GRID_IMAGES, TINY_PREFIX
from .data import synthetic_shapes, undecoded
from .images import BadImageError, ViewSpec, decode_image, load_image, view_image
from .sharding import from_rank_zero

ShardedForward = Callable[[Callable[[torch.nn.Module], Any]], Any]  # runs function(model) on every rank together

logger = logging.getLogger(__name__)

GRID_FILE = "reconstructions.png"
TEXT_TO_IMAGE_FILE = "text_to_image_before_after.png"  # the validation prompts' samples at the start and at the end
SAMPLES_DIR = "samples"  # output_dir/samples/step-N.png: the grid and samples of each step they were made at
DETECTOR_ACTIONS = tuple(action for action in COLLAPSE_ACTIONS if action != "off")  # "off" means no detector
DERIVED_PROBE_FACTOR = 2  # a derived condition is probed this many times as often
PROBE_SEED = 20250909  # synthetic probe images: a seed no training set of synthetic shapes uses by default
# Text-to-image samples whose mean absolute pixel difference from the first prompt's stays below this share of the
# pixel range are one image for every prompt: the model does not follow its prompts.
SAME_IMAGE_TOLERANCE = 0.02
SAME_FOR_EVERY_PROMPT = "the same image for every prompt: this model does not follow its prompts yet"


class PromptEpochCallback(TrainerCallback):
    """Tells the collator (and a task mix) which epoch starts, so each epoch draws fresh instructions and
    rows, also after a resume. ``next_epoch``, when the trainer sets it, is the number of the epoch that starts
    next (``state.epoch`` is a fraction of ``max_steps`` for a stream, not a pass count)."""

    def __init__(self, collator, dataset=None):
        self.collator = collator
        self.dataset = dataset
        self.next_epoch: int | None = None

    def on_epoch_begin(self, args, state, control, **kwargs):
        epoch = int(state.epoch or 0) if self.next_epoch is None else self.next_epoch
        if self.next_epoch is not None:
            self.next_epoch += 1
        self.collator.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


class RunTotals(TrainerCallback, ExportableState):
    """What a run has done, over all its processes and all its resumed parts: the training samples per task
    (``task_counts``, which the trainer adds to), the training wall time (:meth:`elapsed`), the skipped
    non-finite steps and the bad rows skipped per dataset (:meth:`add_skipped`; ``skipped_rows`` counts each
    distinct row once, however often it was drawn). Saved into every checkpoint's ``trainer_state.json``
    (``stateful_callbacks``) and taken up again when training resumes from one, so the card of a resumed run
    counts the whole run."""

    def __init__(
        self,
        task_counts: dict[str, int] | None = None,
        seconds: float = 0.0,
        nonfinite_skipped_steps: int = 0,
        skipped_row_numbers: dict[str, list[int]] | None = None,
    ):
        self.task_counts = dict(task_counts or {})
        self.skipped_row_numbers = {name: set(rows) for name, rows in (skipped_row_numbers or {}).items()}
        self.seconds = float(seconds)  # wall time of the parts that ended (or were checkpointed) before this one
        self.nonfinite_skipped_steps = int(nonfinite_skipped_steps)
        self._started: float | None = None

    @property
    def skipped_rows(self) -> dict[str, int]:
        """Distinct bad rows skipped per dataset."""
        return {name: len(rows) for name, rows in sorted(self.skipped_row_numbers.items()) if rows}

    def add_skipped(self, name: str, rows) -> None:
        self.skipped_row_numbers.setdefault(name, set()).update(int(row) for row in rows)

    def elapsed(self) -> float | None:
        """Training wall time in seconds, the earlier parts included; None before training started."""
        if self._started is None:
            return self.seconds or None
        return self.seconds + time.time() - self._started

    def state(self) -> dict:
        return {
            "args": {},
            "attributes": {
                "task_counts": dict(self.task_counts),
                "seconds": self.elapsed() or 0.0,
                "nonfinite_skipped_steps": self.nonfinite_skipped_steps,
                "skipped_row_numbers": {name: sorted(rows) for name, rows in self.skipped_row_numbers.items()},
            },
        }

    def on_train_begin(self, args, state, control, **kwargs):
        saved = state.stateful_callbacks.get(type(self).__name__) if state.global_step > 0 else None
        if saved:  # resumed from a checkpoint: continue its totals
            attributes = (saved[0] if isinstance(saved, list) else saved).get("attributes", {})
            self.task_counts = {**dict.fromkeys(self.task_counts, 0), **attributes.get("task_counts", {})}
            self.seconds = float(attributes.get("seconds", 0.0))
            self.nonfinite_skipped_steps = int(attributes.get("nonfinite_skipped_steps", 0))
            numbers = attributes.get("skipped_row_numbers", {})
            self.skipped_row_numbers = {name: set(rows) for name, rows in numbers.items()}
        self._started = time.time()

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = self.elapsed() or 0.0
        self._started = None


class StreamPosition(TrainerCallback, ExportableState):
    """Where a run is in its training stream: the pass (``epoch``, counted from 0) and the global step at which
    that pass began. Saved in each checkpoint's trainer_state.json, so that a resumed streamed run skips only
    the batches of the current pass (the Trainer alone would skip ``global_step`` batches from the stream's
    start, which lands elsewhere once the stream has been read through)."""

    def __init__(self, epoch: int = -1, epoch_start_step: int = 0):
        self.epoch = epoch
        self.epoch_start_step = epoch_start_step

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epoch += 1
        self.epoch_start_step = state.global_step

    def state(self) -> dict:
        return {"args": {}, "attributes": {"epoch": self.epoch, "epoch_start_step": self.epoch_start_step}}


def first_good_images(dataset, column: str, count: int, name: str, args) -> list[Image.Image]:
    """The first ``count`` images of ``dataset`` (map-style or a stream), decoded as the collator decodes them:
    a bad one stops with the dataset, row and file named (``bad_image_policy: error``) or is passed over with a
    warning (``skip``), so the grid and the probe never meet an undecodable image later."""
    dataset = undecoded(dataset, column)  # decoded here, not by datasets (whose errors name no row)
    rows = iter(dataset) if isinstance(dataset, torch.utils.data.IterableDataset) else (
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


class ReconstructionGridCallback(TrainerCallback):
    """Shows what RecA does while it trains: reconstructions of a fixed set of images (and text-to-image samples
    of fixed prompts) at the start, every ``every_steps`` steps, at each evaluation and at the last step.

    Each grid (columns: input | condition as the model saw it | image tokenizer round trip, the best any
    generator can do with these codes | reconstruction) and the prompts' samples go to every tracker of the
    run that takes images (:func:`log_images`) and to ``output_dir/samples/step-N.png``. At the end,
    ``reconstructions.png`` sets the start and end reconstructions side by side, and
    ``text_to_image_before_after.png`` the prompts' samples at the start (the base model) and at the end (the
    trained one), drawn with the same seed (also sent to the trackers, as ``reca/text_to_image_before_after``).

    A text-to-image row that cannot mean anything yet has a caption saying so: ``text_caption`` when set (for a
    tiny model with a random language model, :meth:`for_run` sets one), else when the row's images are one image
    for every prompt (:func:`same_for_every_prompt`).

    Args:
        adapter, views, images: what is reconstructed (``views`` as the collator's).
        seed: the seed of every reconstruction and sample (the same noise at every step).
        every_steps: the period in steps (0: only at the start, at evaluations and at the end).
        prompts: text-to-image prompts sampled beside each grid (None or empty: none).
        trackers: the run's callbacks (the trainer's ``callback_handler.callbacks``), searched for trackers.
        sample_kwargs: settings of those samples, passed to the adapter's text_to_image.
        text_caption: a caption under every text-to-image row (None: only under rows of one image for every prompt).
        generation_kwargs: settings of the reconstructions, passed to the adapter's reconstruct.

    At most :data:`~reca_hf.config.MAX_GRID_IMAGES` (16) images; the seconds each grid took are logged and kept in
    :attr:`seconds` (step -> seconds), which the model card sums up.

    Rank 0 generates and writes; when ``sharded_forward`` is set (by `RecATrainer` under FSDP and DeepSpeed,
    where no rank holds the whole model) every rank generates the same images through it, and rank 0 writes.
    """

    def __init__(
        self,
        adapter: UMMAdapter,
        views: ViewSpec,
        images: list,
        seed: int = 0,
        *,
        every_steps: int = 0,
        prompts: list[str] | None = None,
        trackers: list | None = None,
        sample_kwargs: dict | None = None,
        text_caption: str | None = None,
        **generation_kwargs,
    ):
        if len(images) > MAX_GRID_IMAGES:
            raise ValueError(
                f"ReconstructionGridCallback: {len(images)} images; at most {MAX_GRID_IMAGES} (each grid generates "
                "them all), set num_reconstruction_images lower"
            )
        self.adapter = adapter
        self.views = views
        self.images = [load_image(image) for image in images]
        self.seed = seed
        self.every_steps = every_steps
        self.prompts = list(prompts or [])
        self.trackers = trackers if trackers is not None else []
        self.sample_kwargs = dict(sample_kwargs or {})
        self.text_caption = text_caption
        self.generation_kwargs = {"seed": seed, **generation_kwargs}
        self.start: tuple[int, list[Image.Image]] | None = None
        self.latest: tuple[int, list[Image.Image]] | None = None
        self.start_samples: tuple[int, list[Image.Image]] | None = None  # the prompts' samples at the start
        self.latest_samples: tuple[int, list[Image.Image]] | None = None
        self.before_after_step: int | None = None  # the step text_to_image_before_after.png was made at
        self.logged_steps: list[int] = []  # the steps whose images went out, in order
        self.seconds: dict[int, float] = {}  # step -> seconds its grid (and samples) took
        self._fixed_columns: dict[str, list[Image.Image]] | None = None
        self.sharded_forward: ShardedForward | None = None

    @classmethod
    def for_run(
        cls, args, adapter: UMMAdapter, views: ViewSpec, train_dataset, eval_dataset=None, trackers: list | None = None
    ) -> ReconstructionGridCallback | None:
        """The grid a :class:`~reca_hf.RecAConfig` asks for: of the first ``num_reconstruction_images`` eval images
        when there is an eval set, else of the first training images, with ``validation_prompts`` sampled beside
        it (None when there is nothing to show). A ``tiny:`` model's text-to-image rows say that they show noise:
        its language model is random."""
        prompts = list(args.validation_prompts or [])
        if prompts and not adapter.supports_text_to_image_sampling():
            logger.info(
                "validation_prompts are not sampled (no text-to-image samples, no %s): the %s architecture adapter "
                "has no text-to-image sampler.",
                TEXT_TO_IMAGE_FILE,
                adapter.name,
            )
            prompts = []
        source = eval_dataset if _has_rows(eval_dataset) else train_dataset
        count = args.num_reconstruction_images if source is not None else 0
        if count == 0 and not prompts:
            return None
        name = "eval" if source is eval_dataset else "train"
        images = first_good_images(source, args.image_columns[name], count, name, args) if source is not None else []
        if not images and not prompts:
            return None
        generation = dict(args.reconstruction_kwargs or {})
        from .sampling import sampler_settings

        sampler = {k: v for k, v in generation.items() if k in {"guidance_scale", *sampler_settings(adapter)}}
        return cls(
            adapter,
            views,
            images,
            seed=args.seed,
            every_steps=args.reconstruction_steps,
            prompts=prompts,
            trackers=trackers,
            sample_kwargs=sampler if prompts else None,
            text_caption=tiny_model_caption(args.model_name_or_path),
            **generation,
        )

    def _reconstruct(self, model) -> list[Image.Image]:
        return self.adapter.reconstruct(self.images, model=model, views=self.views, **self.generation_kwargs)

    def _sample(self, model) -> list[Image.Image]:
        return self.adapter.text_to_image(self.prompts, model=model, seed=self.seed, **self.sample_kwargs)

    def _caption(self, *rows: list[Image.Image]) -> str | None:
        """The caption under text-to-image rows: ``text_caption``, else whether every row is one image for all."""
        if self.text_caption is not None:
            return self.text_caption
        return SAME_FOR_EVERY_PROMPT if rows and all(same_for_every_prompt(row) for row in rows) else None

    def _generate(self, function, model):
        """``function(model)``: through ``sharded_forward`` (every rank together) when the model is sharded."""
        return self.sharded_forward(function) if self.sharded_forward is not None else function(model)

    def _takes_part(self, state) -> bool:
        return state.is_world_process_zero or self.sharded_forward is not None

    def _columns(self, model) -> dict[str, list[Image.Image]]:
        """The columns that do not change while training (the tokenizer is frozen), computed once."""
        if self._fixed_columns is None:
            columns = {
                "input": [self.views.target_view(image) for image in self.images],
                "condition": [view_image(self.views.condition_view(image)) for image in self.images],
            }
            round_trip = self._generate(
                lambda m: self.adapter.round_trip(self.images, model=m, views=self.views), model
            )
            if round_trip is not None:
                columns["tokenizer"] = round_trip
            self._fixed_columns = columns
        return self._fixed_columns

    def _show(self, args, state, model) -> None:
        """Reconstruct (and sample) at this step; send the images to the trackers and samples/step-N.png."""
        step = state.global_step
        if not self._takes_part(state) or model is None or step in self.logged_steps:
            return
        started = time.perf_counter()
        images, samples = {}, None
        if self.images:
            reconstructions = self._generate(self._reconstruct, model)
            self.latest = (step, reconstructions)
            columns = self._columns(model)
        if self.prompts:
            samples = self._generate(self._sample, model)
            self.latest_samples = (step, samples)
        if not state.is_world_process_zero:  # a sharded run's other ranks: they generated, rank 0 writes
            self.logged_steps.append(step)
            return
        if self.images:
            images["reca/reconstructions"] = image_grid({**columns, f"step {step}": reconstructions})
        if samples is not None:
            images["reca/text_to_image"] = image_grid(
                {prompt[:14]: [image] for prompt, image in zip(self.prompts, samples)}, caption=self._caption(samples)
            )
        log_images(self.trackers, images, step)
        path = Path(args.output_dir) / SAMPLES_DIR / f"step-{step}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        stack_vertically(list(images.values())).save(path)
        self.logged_steps.append(step)
        self.seconds[step] = time.perf_counter() - started
        logger.info("Reconstruction grid at step %d (%d images, %d prompts): %.1f s", step, len(self.images),
                    len(self.prompts or []), self.seconds[step])  # fmt: skip

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self._takes_part(state):
            return
        self._show(args, state, model)
        if self.latest is not None:
            self.start = self.latest
        if self.latest_samples is not None:
            self.start_samples = self.latest_samples

    def on_step_end(self, args, state, control, model=None, **kwargs):
        last = state.max_steps > 0 and state.global_step >= state.max_steps
        if last or (self.every_steps and state.global_step % self.every_steps == 0):
            self._show(args, state, model)
        if last:  # here rather than at on_train_end, where the trackers may have closed their runs
            self._show_before_after(args, state, model)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self._show(args, state, model)

    def _show_before_after(self, args, state, model) -> None:
        """The prompts' samples at the start beside those at this step, same prompts and seed:
        ``text_to_image_before_after.png`` and the trackers (once per step)."""
        if not self._takes_part(state) or model is None or self.start_samples is None:
            return
        step = state.global_step
        if self.before_after_step == step:
            return
        if self.latest_samples is None or self.latest_samples[0] != step:
            self.latest_samples = (step, self._generate(self._sample, model))
        self.before_after_step = step
        if not state.is_world_process_zero:
            return
        (start_step, before), after = self.start_samples, self.latest_samples[1]
        start_label = f"base (step {start_step})" if start_step == 0 else f"step {start_step}"
        image = image_grid(
            {start_label: before, f"trained (step {step})": after},
            row_labels=self.prompts,
            caption=self._caption(before, after),
        )
        log_images(self.trackers, {"reca/text_to_image_before_after": image}, step)
        path = Path(args.output_dir) / TEXT_TO_IMAGE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        logger.info("Saved the text-to-image samples before and after training to %s", path)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._show_before_after(args, state, model)  # a run that stopped before max_steps
        if not self._takes_part(state) or self.start is None or not self.images:
            return
        start_step, start_images = self.start
        if self.latest is None or self.latest[0] != state.global_step:
            self.latest = (state.global_step, self._generate(self._reconstruct, model))
        if not state.is_world_process_zero:
            return
        columns = {
            **self._columns(model),
            f"step {start_step}": start_images,
            f"step {state.global_step}": self.latest[1],
        }
        path = Path(args.output_dir) / GRID_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        image_grid(columns).save(path)
        logger.info("Saved the reconstruction grid to %s", path)


def same_for_every_prompt(images: list[Image.Image]) -> bool:
    """Whether text-to-image samples of two or more prompts are one image: each differs from the first by a mean
    absolute pixel difference below :data:`SAME_IMAGE_TOLERANCE` of the pixel range."""
    if len(images) < 2:
        return False
    first = np.asarray(images[0].convert("RGB"), dtype=np.float32)
    return all(
        np.abs(np.asarray(image.convert("RGB").resize(images[0].size), dtype=np.float32) - first).mean()
        < SAME_IMAGE_TOLERANCE * 255
        for image in images[1:]
    )


def tiny_model_caption(model_name_or_path: str | None) -> str | None:
    """The caption under a ``tiny:`` model's text-to-image rows: its language model is random (None for others)."""
    if not (model_name_or_path or "").startswith(TINY_PREFIX):
        return None
    return f"text-to-image of {model_name_or_path}, a tiny model whose language model started random: expect noise"


def stack_vertically(images: list[Image.Image]) -> Image.Image:
    """Images one below the other on white, left-aligned."""
    width, height = max(image.width for image in images), sum(image.height for image in images)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    top = 0
    for image in images:
        canvas.paste(image, (0, top))
        top += image.height
    return canvas


# ---- trackers --------------------------------------------------------------------------------


def _tensorboard(callback, tag: str, image: Image.Image, step: int) -> None:
    writer = callback.tb_writer
    if writer is None:
        raise _NotReady
    writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
    writer.flush()


def _wandb_like(module_attr: str):
    """W&B, Trackio and SwanLab: ``module.log({tag: module.Image(image)})`` at the step."""

    def send(callback, tag: str, image: Image.Image, step: int) -> None:
        module = getattr(callback, module_attr, None)
        if module is None or not getattr(callback, "_initialized", True):
            raise _NotReady
        payload = {tag: module.Image(image), "train/global_step": step}
        if module_attr == "_swanlab":
            module.log(payload, step=step)
        else:
            module.log(payload)

    return send


def _comet(callback, tag: str, image: Image.Image, step: int) -> None:
    if callback._experiment is None:
        raise _NotReady
    callback._experiment.log_image(image, name=tag, step=step)


def _mlflow(callback, tag: str, image: Image.Image, step: int) -> None:
    if not callback._initialized:
        raise _NotReady
    callback._ml_flow.log_image(image, artifact_file=f"{tag}/step-{step}.png")


def _clearml(callback, tag: str, image: Image.Image, step: int) -> None:
    if callback._clearml_task is None:
        raise _NotReady
    callback._clearml_task.get_logger().report_image(title=tag, series=tag, iteration=step, image=image)


def _dvclive(callback, tag: str, image: Image.Image, step: int) -> None:
    if callback.live is None:
        raise _NotReady
    callback.live.log_image(f"{tag.replace('/', '_')}/step-{step}.png", image)


def _neptune(callback, tag: str, image: Image.Image, step: int) -> None:
    from neptune.types import File

    callback.run[tag].append(File.as_image(image), step=step)


class _NotReady(Exception):
    """The tracker has not started its run (yet)."""


# transformers' integration callbacks (by class name, so none of them is imported) -> how they take an image.
# The others (AzureML, CodeCarbon, Flyte, Kubeflow) take no images.
IMAGE_TRACKERS = {
    "TensorBoardCallback": _tensorboard,
    "WandbCallback": _wandb_like("_wandb"),
    "TrackioCallback": _wandb_like("_trackio"),
    "SwanLabCallback": _wandb_like("_swanlab"),
    "CometCallback": _comet,
    "MLflowCallback": _mlflow,
    "DagsHubCallback": _mlflow,
    "ClearMLCallback": _clearml,
    "DVCLiveCallback": _dvclive,
    "NeptuneCallback": _neptune,
}


def log_images(callbacks: list, images: dict[str, Image.Image], step: int) -> list[str]:
    """Send ``images`` (tag -> image) at ``step`` to every tracker among ``callbacks`` that takes images;
    returns the names of the trackers reached. Trackers without images, or not started, are skipped (DEBUG)."""
    reached = []
    for callback in callbacks:
        name = type(callback).__name__
        send = IMAGE_TRACKERS.get(name)
        if send is None:
            if name.endswith("Callback") and type(callback).__module__.startswith("transformers.integrations"):
                logger.debug("%s takes no images: the reconstruction grid is not sent there", name)
            continue
        try:
            for tag, image in images.items():
                send(callback, tag, image, step)
        except _NotReady:
            logger.debug("%s has no run yet at step %d: its images are skipped", name, step)
            continue
        except Exception as error:  # a tracker failing to take an image must not stop training
            logger.warning("Could not send the reconstruction grid to %s (%s: %s)", name, type(error).__name__, error)
            continue
        reached.append(name)
    return reached


ROW_LABEL_WIDTH = 120  # pixels of the row labels' column
LINE_HEIGHT = 12


def _wrapped(draw: ImageDraw.ImageDraw, text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` pixels (a longer word keeps its own line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def image_grid(
    columns: dict[str, list[Image.Image]],
    cell: int = 96,
    *,
    row_labels: list[str] | None = None,
    caption: str | None = None,
) -> Image.Image:
    """Lay out equally long image lists as labelled columns; ``row_labels`` (wrapped) in a column on the left and
    ``caption`` (wrapped, in dark red) under the grid when given. An image that is not square is letterboxed in its
    cell (its longer side fills the cell, centred on white)."""
    rows = len(next(iter(columns.values())))
    header, left = 14, ROW_LABEL_WIDTH if row_labels else 0
    width = left + cell * len(columns)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    caption_lines = _wrapped(measure, caption, width - 6) if caption else []
    height = header + cell * rows + (LINE_HEIGHT * len(caption_lines) + 6 if caption_lines else 0)
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, label in enumerate(row_labels or []):
        for n, line in enumerate(_wrapped(draw, label, left - 6)[: cell // LINE_HEIGHT]):
            draw.text((3, header + r * cell + 3 + n * LINE_HEIGHT), line, fill=(0, 0, 0))
    for c, (label, images) in enumerate(columns.items()):
        draw.text((left + c * cell + 3, 1), label, fill=(0, 0, 0))
        for r, image in enumerate(images):
            longest = max(image.size)
            size = (max(1, round(cell * image.width / longest)), max(1, round(cell * image.height / longest)))
            x, y = left + c * cell + (cell - size[0]) // 2, header + r * cell + (cell - size[1]) // 2
            grid.paste(image.convert("RGB").resize(size, Image.Resampling.NEAREST), (x, y))
    for n, line in enumerate(caption_lines):
        draw.text((3, header + cell * rows + 3 + n * LINE_HEIGHT), line, fill=(150, 0, 0))
    return grid


# ---- collapse --------------------------------------------------------------------------------


def has_target_logits(adapter: UMMAdapter) -> bool:
    """Whether the adapter exposes teacher-forced token logits (the token swap probe needs them)."""
    return type(adapter).target_logits is not UMMAdapter.target_logits


PLATEAU_RATIO = 0.25  # loss signal: the logged loss falls below this fraction of its earlier plateau...
FLOOR_RATIO = 0.1  # ...or below this fraction of the uniform-guess loss, ln(codebook size)
COPY_THRESHOLD = 0.5  # probe signal: at least this share of the predictions follows the swapped-in condition
# Loss-probe signal: the own-condition loss at most a fifth of the swapped one. Calibrated on the tiny flow UMM
# (`benchmarks/bottleneck_ablation.py --kind flow`, three seeds): a model copying the target's own latents reads
# 0.93-0.97 once its loss has fallen (the detector's loss signal); one reading a resized, blurred or another
# image's condition at most 0.29, and a model reconstructing from the condition's meaning 0.5-0.65 (the tiny
# OpenUni demo, 300-600 steps). 0.8 sits between, with 0.15 to spare on the meaning side.
GAIN_THRESHOLD = 0.8
_PLATEAU_WINDOW = 3  # the plateau is the highest median of this many consecutive logged losses


def _own_and_swapped(adapter: UMMAdapter, model, conditions: list, targets: list, instruction: str) -> tuple:
    """The probe's two batches: each image with its own condition, and with the next image's (cyclically), and the
    partner of each row. The frozen towers' outputs (:meth:`UMMAdapter.frozen_features`) are computed once and
    passed precomputed to both passes, those of the condition view (``condition_*``) permuted for the swap; an
    adapter without them has its swapped batch prepared from the swapped views."""
    device = next(model.parameters()).device
    partner = [(i + 1) % len(conditions) for i in range(len(conditions))]

    def prepared(views: list) -> dict:
        batch = adapter.prepare(views, targets, [instruction] * len(targets))
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    own = prepared(conditions)
    frozen = getattr(adapter, "frozen_features", None)
    features = frozen(model, own) if frozen is not None else {}
    condition = {cached_key(name): value for name, value in features.items() if name.startswith("condition")}
    target = {cached_key(name): value for name, value in features.items() if not name.startswith("condition")}
    if not condition:
        return {**own, **target}, {**prepared([conditions[j] for j in partner]), **target}, partner
    own = {**own, **condition, **target}
    rows = {**condition, "condition_pixel_values": own["condition_pixel_values"]}
    # A list holds one entry per row (views of different sizes, the keep fit), a tensor one row per sample
    swapped = {key: [value[j] for j in partner] if isinstance(value, list) else value[partner]
               for key, value in rows.items()}  # fmt: skip
    return own, {**own, **swapped}, partner


@torch.no_grad()
def swap_probe(adapter: UMMAdapter, model, images: list, views: ViewSpec, instruction: str | None = None):
    """The condition-swap probe: does the model reconstruct its target, or copy its condition?

    Image ``j = i + 1`` (cyclically) lends its condition view to image ``i``, whose target stays
    teacher-forced. Where the two images' target tokens differ, the argmax predictions are counted as
    following ``j`` (``swap_copy_rate``: the model copies whatever condition it gets) or ``i``
    (``swap_target_rate``: it predicts from the target's own prefix). Returns both rates and the
    teacher-forced accuracy with the right conditions (``own_accuracy``).
    """
    pictures = [load_image(image) for image in images]
    if len(pictures) < 2:
        raise ValueError("the condition-swap probe needs at least two images")
    instruction = instruction if instruction is not None else getattr(adapter, "default_instruction", "")
    conditions = [views.condition_view(p) for p in pictures]
    targets = [views.target_view(p) for p in pictures]
    with eval_mode(model):
        own, swapped, partner = _own_and_swapped(adapter, model, conditions, targets, instruction)
        own_logits, codes = adapter.target_logits(model, own)
        swapped_logits, _ = adapter.target_logits(model, swapped)
    own_predictions, swapped_predictions = own_logits.argmax(-1), swapped_logits.argmax(-1)
    partner_codes = codes[partner]
    differ = codes != partner_codes
    counted = max(int(differ.sum()), 1)
    return {
        "swap_copy_rate": float(((swapped_predictions == partner_codes) & differ).sum()) / counted,
        "swap_target_rate": float(((swapped_predictions == codes) & differ).sum()) / counted,
        "own_accuracy": float((own_predictions == codes).float().mean()),
    }


PROBE_NOISE = LossNoise(seed=0, timesteps=(0.5, 0.75, 0.9))  # mid and high noise: x_t alone hides the target


@torch.no_grad()
def condition_swap_loss(
    adapter: UMMAdapter, model, images: list, views: ViewSpec, noise: LossNoise | None = None
) -> dict[str, float]:
    """The loss-based condition-swap probe, for every kind of generation target.

    Each image's target is scored twice under identical noise (the same seed, noise levels and masks): once
    with its own condition, once with the next image's (cyclically). ``condition_gain = 1 - own / swapped``:
    near 0 the condition is ignored, near 1 it determines the target. A model that copies its condition
    drives its own loss toward 0 (for flow and epsilon targets at every noise level above 0), so its gain
    approaches 1. Each of ``noise.timesteps`` (default 0.5, 0.75, 0.9: where the noisy input alone does not
    reveal the target) is scored separately and the losses are summed. Forward passes only, so every rank of
    a sharded run can take part with the same images.
    """
    noise = noise or PROBE_NOISE
    pictures = [load_image(image) for image in images]
    if len(pictures) < 2:
        raise ValueError("the condition-swap probe needs at least two images")
    instruction = getattr(adapter, "default_instruction", "")
    conditions = [views.condition_view(p) for p in pictures]
    targets = [views.target_view(p) for p in pictures]
    levels = noise.timesteps or (None,)
    own = other = 0.0
    with eval_mode(model):
        own_batch, other_batch, _ = _own_and_swapped(adapter, model, conditions, targets, instruction)
        for level in levels:
            fixed = LossNoise(noise.seed, timesteps=None if level is None else (level,), mask_ratio=noise.mask_ratio)
            own += float(adapter.loss(model, own_batch, reduction="none", noise=fixed).float().mean())
            other += float(adapter.loss(model, other_batch, reduction="none", noise=fixed).float().mean())
    own, other = own / len(levels), other / len(levels)
    return {"condition_gain": 1.0 - own / other if other > 0 else 0.0, "swap_own_loss": own, "swap_other_loss": other}


class CollapseDetector(TrainerCallback):
    """Detects the copy-and-paste collapse of RecA while training (on by default in `RecATrainer`).

    A falling loss alone is ambiguous: a model that memorises a small dataset drives it down too. So two
    signals must agree:

    * **loss**: a logged ``reconstruction_loss`` below ``plateau_ratio`` (0.25) times its earlier plateau
      (the highest median of three consecutive logged losses so far), or below ``floor_ratio`` (0.1) times
      a reference: the uniform-guess loss ``ln(codebook size)`` for token targets, the first logged loss
      for continuous (diffusion, flow) targets;
    * **condition-swap probe** on a few held-out images, every ``probe_steps`` steps and at the first log
      where the loss signal appears. Token targets (adapters with ``target_logits``) use :func:`swap_probe`:
      at least ``copy_threshold`` (0.5) of the predictions follow the swapped-in condition, and more of them
      than follow the target. Every other target uses :func:`condition_swap_loss`: a ``condition_gain`` of
      at least ``gain_threshold``. A memorising model has nothing to copy on images it has never seen; a
      copying one copies them all.

    Logged with the next training log: the token probe's ``collapse_score`` (0 healthy .. 1 copying: the copy
    rate), ``swap_copy_rate`` and ``swap_target_rate``; the loss probe's ``condition_gain`` (how much the model
    uses its condition, which RecA raises; also logged as ``collapse_score``, its older name, for dashboards that
    read it), ``swap_own_loss`` and ``swap_other_loss``. On
    detection it logs a warning naming the cause and the fix; with ``action="stop"`` it also saves a checkpoint
    and ends training.

    In a multi-process run rank 0 probes and every rank acts on its reading (they stop at the same step); under
    FSDP and DeepSpeed, where no rank holds the whole model, every rank runs the probe (forward passes only) on
    the same images through ``sharded_forward``, which `RecATrainer` sets.

    Args:
        adapter, views, probe_images: what the default probe runs on (``views`` as the collator's).
        action: "warn" or "stop".
        probe: a replacement probe, ``probe(model) -> dict`` with either the token readings or
            ``condition_gain``.
        uniform_loss: the loss signal's reference; by default ``ln(codebook size)`` for token targets.
    """

    def __init__(
        self,
        adapter: UMMAdapter | None = None,
        views: ViewSpec | None = None,
        probe_images: list | None = None,
        action: str = "warn",
        probe_steps: int = 200,
        plateau_ratio: float = PLATEAU_RATIO,
        floor_ratio: float = FLOOR_RATIO,
        copy_threshold: float = COPY_THRESHOLD,
        probe=None,
        uniform_loss: float | None = None,
        gain_threshold: float = GAIN_THRESHOLD,
    ):
        if action not in DETECTOR_ACTIONS:
            raise ValueError(f"CollapseDetector action={action!r}: choose {' or '.join(map(repr, DETECTOR_ACTIONS))}")
        self._probe_needs_model = probe is None
        if probe is None:
            if adapter is None or views is None or not probe_images or len(probe_images) < 2:
                raise ValueError("CollapseDetector needs a probe, or an adapter, views and two or more probe_images")
            probe_images = [load_image(image) for image in probe_images]
            function = swap_probe if has_target_logits(adapter) else condition_swap_loss
            probe = lambda model: function(adapter, model, probe_images, views)  # noqa: E731
        codebook = adapter.generation_target.codebook_size if adapter is not None else None
        if uniform_loss is None and codebook:
            uniform_loss = math.log(codebook)
        self.probe = probe
        self.action = action
        self.probe_steps = probe_steps
        self.plateau_ratio = plateau_ratio
        self.floor_ratio = floor_ratio
        self.copy_threshold = copy_threshold
        self.gain_threshold = gain_threshold
        self.uniform_loss = uniform_loss
        self.losses: list[tuple[int, float]] = []
        self.plateau: float | None = None
        self.loss_signal = False
        self.history: list[dict[str, float]] = []  # one entry per probe run, with its step
        self.fired_at_step: int | None = None
        self._probe_due = False
        self._pending: dict[str, float] = {}
        self._warned_no_model = False
        # Set by RecATrainer under FSDP and DeepSpeed: runs probe(model) on every rank with whole parameters.
        self.sharded_forward: ShardedForward | None = None

    @classmethod
    def for_run(cls, args, adapter: UMMAdapter, views: ViewSpec, eval_dataset=None) -> CollapseDetector | None:
        """The detector a :class:`~reca_hf.RecAConfig` asks for (None when ``collapse_action`` or
        ``collapse_probe_images`` turn it off): it probes the first eval images, or synthetic shapes the model has
        never seen without an eval set, every ``collapse_probe_steps`` steps (twice as often for a derived
        condition)."""
        if args.collapse_action == "off":
            return None
        if args.collapse_probe_images == 0:  # the documented way to turn the probe off, as collapse_action='off'
            logger.info("Collapse detector off: collapse_probe_images=0.")
            return None
        if args.collapse_probe_images < 2:
            logger.warning(
                "Collapse detector off: collapse_probe_images=%d, and the condition-swap probe needs at least two "
                "images (one lends its condition to another). Set collapse_probe_images to 2 or more (default 8), or "
                "collapse_action='off' to turn the detector off on purpose.",
                args.collapse_probe_images,
            )
            return None
        count = args.collapse_probe_images
        if eval_dataset is not None and not isinstance(eval_dataset, torch.utils.data.IterableDataset):
            images = first_good_images(eval_dataset, args.image_columns["eval"], count, "eval", args)
        else:
            images = []
        if len(images) < 2:  # no held-out images: shapes this model has never seen
            images = synthetic_shapes(count, size=views.generation_resolution, seed=PROBE_SEED)["image"]
        probe_steps = args.collapse_probe_steps
        if adapter.condition_relation == "derived":  # copyable by learning: probe twice as often
            probe_steps = max(1, probe_steps // DERIVED_PROBE_FACTOR)
        return cls(adapter, views, images, action=args.collapse_action, probe_steps=probe_steps)

    # ---- the rule, as plain functions of what was observed ----

    def observe_loss(self, step: int, loss: float) -> bool:
        """Record a logged reconstruction loss; returns whether the loss signal is on."""
        self.losses.append((step, float(loss)))
        recent = sorted(value for _, value in self.losses[-_PLATEAU_WINDOW:])
        if len(recent) == _PLATEAU_WINDOW:
            median = recent[_PLATEAU_WINDOW // 2]
            self.plateau = median if self.plateau is None else max(self.plateau, median)
        reference = self.uniform_loss if self.uniform_loss is not None else self.losses[0][1]
        below_plateau = self.plateau is not None and loss < self.plateau_ratio * self.plateau
        below_floor = loss < self.floor_ratio * reference
        signal = bool(below_plateau or below_floor)
        if signal and not self.loss_signal:
            self._probe_due = True  # probe at once rather than waiting for the next scheduled probe
        self.loss_signal = signal
        return signal

    def observe_probe(self, step: int, result: dict[str, float]) -> bool:
        """Record a probe result; returns whether collapse is detected (both signals agree)."""
        if "condition_gain" in result:
            gain = float(result["condition_gain"])
            # Named for what it measures (RecA raises it); collapse_score, its 0.x name (max(gain, 0)), is still logged
            # for the dashboards and scripts that read it, but the plot and the card show condition_gain.
            metrics = {"collapse_score": max(gain, 0.0), **{k: float(v) for k, v in result.items()}}
            copying = gain >= self.gain_threshold
        else:
            copy_rate, target_rate = float(result["swap_copy_rate"]), float(result["swap_target_rate"])
            metrics = {"collapse_score": copy_rate, "swap_copy_rate": copy_rate, "swap_target_rate": target_rate}
            copying = copy_rate >= self.copy_threshold and copy_rate > target_rate
        self.history.append({"step": step, **metrics, "loss_signal": float(self.loss_signal)})
        self._pending.update(metrics)
        detected = self.loss_signal and copying
        if detected and self.fired_at_step is None:
            self.fired_at_step = step
        return detected

    def describe(self) -> dict[str, Any] | None:
        """What the probe's readings are, for the probe plot and the card: the logged metric, its plot label, the
        threshold at which it reads as copying, and what it measures in words (None before the first probe)."""
        if not self.history:
            return None
        if "condition_gain" in self.history[-1]:
            return {"metric": "condition_gain", "label": "condition_gain: use of the condition (RecA raises it)",
                    "threshold": self.gain_threshold, "fired_at_step": self.fired_at_step,
                    "meaning": "condition_gain: how much lower the reconstruction loss is with each image's own "
                    "condition than with another image's. It rises as the model learns to use its condition, which "
                    "is what RecA trains; it signals copying only near 1 and together with a collapsing loss."}  # fmt: skip
        return {"metric": "swap_copy_rate", "label": "swap_copy_rate: share copying a swapped-in condition",
                "threshold": self.copy_threshold, "fired_at_step": self.fired_at_step,
                "meaning": "swap_copy_rate: the share of the predicted image tokens that follow another image's "
                "condition swapped in, instead of the image being reconstructed. A model that copies its condition "
                "follows the swap; one that reconstructs from its understanding does not."}  # fmt: skip

    def verdict(self) -> str:
        """What the detector concluded, in words (the card's "collapse detector" line)."""
        if not self.history:
            return "on; no probe had run yet"
        last = self.history[-1]
        if "condition_gain" in last:
            reading = (f"condition_gain {last['condition_gain']:.2f} (how much lower the loss is with the image's own "
                       f"condition than with another's; copying reads at least {self.gain_threshold})")  # fmt: skip
        else:
            reading = (f"{last['swap_copy_rate']:.0%} of the predictions followed a swapped-in condition (copying: at "
                       f"least {self.copy_threshold:.0%})")  # fmt: skip
        if self.fired_at_step is not None:
            return (f"fired at step {self.fired_at_step}: the loss collapsed and the probe found the model copying its "
                    f"condition; last probe (step {last['step']}): {reading}")  # fmt: skip
        return (f"did not fire: {len(self.history)} probes, none with both signals (a collapsing loss and a copying "
                f"probe); last probe (step {last['step']}): {reading}")  # fmt: skip

    def pop_metrics(self) -> dict[str, float]:
        """The probe metrics not yet logged (the trainer adds them to its next training log)."""
        metrics, self._pending = self._pending, {}
        return metrics

    # ---- Trainer events ----

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reconstruction_loss" in logs:
            self.observe_loss(state.global_step, logs["reconstruction_loss"])

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not (self._probe_due or state.global_step % self.probe_steps == 0):
            return
        if model is None and self._probe_needs_model and self.sharded_forward is None:
            if not self._warned_no_model:
                logger.warning(
                    "Collapse probe skipped at step %d: the trainer passed its callbacks no model to probe; the "
                    "detector watches nothing until it does. Pass probe= (a function of nothing but the model you "
                    "hold) to CollapseDetector, or use RecATrainer.",
                    state.global_step,
                )
                self._warned_no_model = True
            return
        self._probe_due = False
        first = self.fired_at_step is None
        # Sharded (FSDP, DeepSpeed): every rank probes together through sharded_forward. Otherwise rank 0 probes
        # alone. Either way every rank acts on rank 0's reading, so that all stop at the same step.
        if self.sharded_forward is not None:
            reading = self.sharded_forward(self.probe)
        else:
            reading = self.probe(model) if state.is_world_process_zero else None
        detected = self.observe_probe(state.global_step, from_rank_zero(reading))  # logged with the next log
        if not detected:
            return
        if first and state.is_world_process_zero:
            logger.warning(
                "RecA collapse detected at step %d: the reconstruction loss fell to %.3g (plateau %.3g), and %s: "
                "it copies its condition instead of understanding it. Cause: the condition view carries the target "
                "(same representation, no information bottleneck). Fix: lower condition_resolution (e.g. 'auto', "
                "at most half the generation resolution) with condition_bottleneck='resize', or use "
                "condition_bottleneck='blur'; do not set allow_shortcut.%s",
                state.global_step,
                self.losses[-1][1] if self.losses else float("nan"),
                self.plateau or float("nan"),
                self._evidence(self.history[-1]),
                " Stopping after a checkpoint (collapse_action='stop')." if self.action == "stop" else "",
            )
        if self.action == "stop":
            control.should_save = True
            control.should_training_stop = True

    @staticmethod
    def _evidence(reading: dict[str, float]) -> str:
        if "swap_copy_rate" in reading:
            return (
                f"given another image's condition the model predicts that image's tokens "
                f"{100 * reading['swap_copy_rate']:.0f}% of the time"
            )
        return (
            f"its loss with the image's own condition is {100 * reading['condition_gain']:.0f}% lower than with "
            "another image's (condition_gain)"
        )


def _has_rows(dataset) -> bool:
    """A dataset with a length and at least one row (iterable datasets have no rows to pick)."""
    return dataset is not None and hasattr(dataset, "__len__") and len(dataset) > 0


def __getattr__(name: str):
    if name == "evaluating":  # the 0.1 name of reca_hf.adapters.helpers.eval_mode
        warnings.warn(
            "reca_hf.callbacks.evaluating is the 0.1 name of reca_hf.adapters.helpers.eval_mode: use eval_mode; the "
            "old name will be removed",
            FutureWarning,
            stacklevel=2,
        )
        return eval_mode
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
