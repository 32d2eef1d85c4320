"""Trainer callbacks of a RecA run: prompt draws in step with epochs, run totals, the reconstruction grid and the
text-to-image samples, and their images in the trackers. The collapse detector is :mod:`reca_hf.collapse` (its names
are importable from here too)."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .adapters.base import UMMAdapter
from .adapters.helpers import eval_mode
from .config import MAX_GRID_IMAGES, TINY_PREFIX
from .data import first_good_images, has_rows
from .images import ViewSpec, load_image, view_image
from .sharding import ShardedForward

logger = logging.getLogger(__name__)

GRID_FILE = "reconstructions.png"
TEXT_TO_IMAGE_FILE = "text_to_image_before_after.png"  # the validation prompts' samples at the start and at the end
SAMPLES_DIR = "samples"  # output_dir/samples/step-N.png: the grid and samples of each step they were made at
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
        source = eval_dataset if has_rows(eval_dataset) else train_dataset
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


# The collapse detector's names, importable from here as before it had its own module.
from .collapse import (  # noqa: E402, F401
    COPY_THRESHOLD,
    DERIVED_PROBE_FACTOR,
    DETECTOR_ACTIONS,
    FLOOR_RATIO,
    GAIN_THRESHOLD,
    PLATEAU_RATIO,
    PROBE_NOISE,
    PROBE_SEED,
    CollapseDetector,
    condition_swap_loss,
    has_target_logits,
    swap_probe,
)


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
