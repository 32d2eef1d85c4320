"""`RecACollator`: dataset rows -> a RecA batch (images through the bottleneck, one instruction each)."""

from __future__ import annotations

import inspect
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .adapters.base import UMMAdapter
from .data import IMAGE_COLUMN_FIELDS, ROW_KEY, SOURCE_KEY
from .images import (
    AUTO,
    DEFAULT_MAX_IMAGE_PIXELS,
    BadImageError,
    ViewSpec,
    decode_image,
    resolve_views,
)
from .prompts import PromptSampler, load_prompts
from .tasks import (
    IMAGE_TO_TEXT,
    INDEX_KEY,
    RECONSTRUCTION,
    TASK_KEY,
    TASKS,
    TEXT_TO_IMAGE,
    SharedEpoch,
    caption_column_in,
)

logger = logging.getLogger(__name__)
_CROP_STREAM = 1  # keeps the crop draws apart from the instruction draws of the same (seed, epoch, row)
_REPLACEMENT_STREAM = 2  # and the replacement draws of a bad row
BAD_IMAGE_POLICIES = ("error", "skip")
SKIPPED_KEY = "reca_skipped_rows"  # a batch's {dataset: [bad row numbers]}, popped by the trainer (not a model input)


def resolve_dropout(adapter: UMMAdapter, cond_dropout_prob: float | str) -> float:
    """What ``cond_dropout_prob`` means for this architecture: ``"auto"`` is its ``default_cond_dropout_prob``."""
    return float(adapter.default_cond_dropout_prob if cond_dropout_prob == AUTO else cond_dropout_prob)


class RecACollator:
    """Builds RecA batches for one adapter.

    For every row it decodes the image (any PIL mode becomes RGB, EXIF orientation applied), makes the
    condition view at ``condition_resolution`` through ``condition_bottleneck`` and the target view at
    ``generation_resolution`` (the condition from the source image, or from the target view's tensor by
    ``condition_interpolation``: ``condition_source``, whose ``"auto"`` is the adapter's), draws one instruction from ``(seed, epoch, row index)`` and, with
    probability ``cond_dropout_prob`` (``"auto"``: the adapter's ``default_cond_dropout_prob``), replaces it with
    the adapter's null prompt (None: the prompt leaves the instruction out). The adapter then tokenises and
    normalises (:meth:`UMMAdapter.prepare`, told which rows were dropped with ``dropped=``).

    For adapters whose condition and target share one representation (Emu3: both VQ ids), a condition
    view the model could copy (not smaller than the target and not blurred) is refused unless
    ``allow_shortcut=True`` (a deliberate ablation; it warns). ``views``, a run's views already resolved (the
    trainer's), replaces the view arguments.

    Rows tagged with another task (``__reca_task__``, added by the trainer's task mix) become
    image-to-text examples (the image at the understanding resolution, a drawn question, the caption
    as the answer) or text-to-image examples (the caption as the prompt, the target view); their
    inputs go under ``batch["image_to_text"]`` / ``batch["text_to_image"]``. ``caption_column`` holds
    a caption string or chat-style messages (by default ``caption``, else ``text`` or ``messages``).

    The row index comes from the ``__reca_index__`` key that :class:`~reca_hf.RecATrainer` adds to
    every row; rows without it are numbered in the order this collator sees them.

    An image that cannot be used (undecodable, truncated, over ``max_image_pixels``) raises
    :class:`~reca_hf.images.BadImageError` naming the dataset, its original row and the file, for rows
    from :func:`~reca_hf.data.as_source` datasets. With ``bad_image_policy="skip"`` such a row is
    replaced by a good row drawn at random from the same dataset (seeded by seed, epoch and slot; registered with :meth:`add_sources`; for a streamed
    dataset, by another good row of that dataset in the same batch), so batches keep their size and every
    prompt its image. Each bad row is counted once per dataset in :attr:`skipped_rows`, and each batch carries the bad rows
    it found under ``reca_skipped_rows`` (so that those found in dataloader workers reach the trainer, which
    counts distinct rows).

    ``image_columns`` names the image column of each dataset (``train``, ``i2t``, ``t2i``, ``eval``, the names
    :func:`~reca_hf.data.as_source` tags rows with); rows of other datasets read ``image_column``.
    The collator holds no model, only the adapter's CPU face, so dataloader workers receive it cheaply by pickling.
    """

    def __init__(
        self,
        adapter: UMMAdapter,
        condition_resolution: int | str = AUTO,
        generation_resolution: int | str = AUTO,
        condition_bottleneck: str = "resize",
        blur_factor: int = 4,
        prompts: list[str] | str | Path | None = None,
        cond_dropout_prob: float | str = AUTO,
        image_column: str = "image",
        seed: int = 0,
        allow_shortcut: bool = False,
        caption_column: str = "caption",
        bad_image_policy: str = "error",
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        target_fit: str = AUTO,
        condition_fit: str = AUTO,
        image_columns: dict[str, str] | None = None,
        condition_source: str = AUTO,
        condition_interpolation: str = AUTO,
        views: ViewSpec | None = None,
    ):
        if bad_image_policy not in BAD_IMAGE_POLICIES:
            raise ValueError(f"bad_image_policy={bad_image_policy!r}: choose one of {', '.join(BAD_IMAGE_POLICIES)}")
        self.bad_image_policy = bad_image_policy
        self.max_image_pixels = int(max_image_pixels)
        self.sources: dict[str, Any] = {}
        self.skipped_rows: Counter[str] = Counter()  # distinct bad rows found by this process (workers: their own)
        self._bad_rows: dict[str, set[int]] = {}  # dataset -> rows known bad here: never drawn as replacements
        self._batch_skips: dict[str, set[int]] = {}  # bad rows first found while making this batch
        self.adapter = adapter
        self.views: ViewSpec = views or resolve_views(
            adapter,
            condition_resolution,
            generation_resolution,
            condition_bottleneck,
            blur_factor,
            allow_shortcut,
            target_fit,
            condition_fit,
            condition_source,
            condition_interpolation,
        )
        templates = prompts if isinstance(prompts, list) else load_prompts(prompts)
        self.sampler = PromptSampler(templates, adapter.null_prompt, resolve_dropout(adapter, cond_dropout_prob), seed)
        self.image_column = image_column
        self.image_columns = dict(image_columns or {})  # per dataset (train, i2t, t2i, eval); else image_column
        self.caption_column = caption_column
        self._epoch = SharedEpoch()
        self._rows_seen = 0
        self.frozen_cache = None  # a reca_hf.frozen_cache.FrozenFeatureCache, set by the trainer

    @property
    def epoch(self) -> int:
        """The epoch whose instructions and crops are drawn (set by the trainer; dataloader workers see each change,
        persistent ones too)."""
        return self._epoch.get()

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.set(value)

    @classmethod
    def from_config(cls, adapter: UMMAdapter, args, views: ViewSpec | None = None) -> RecACollator:
        """The collator a :class:`~reca_hf.RecAConfig` describes: its views, prompts, dropout, columns and seed
        (``views``: the run's views, already resolved from ``args``)."""
        return cls(
            adapter,
            condition_resolution=args.condition_resolution,
            generation_resolution=args.generation_resolution,
            condition_bottleneck=args.condition_bottleneck,
            blur_factor=args.blur_factor,
            prompts=args.prompt_templates,
            cond_dropout_prob=args.cond_dropout_prob,
            image_column=args.image_column,
            seed=args.seed,
            allow_shortcut=args.allow_shortcut,
            caption_column=args.caption_column,
            bad_image_policy=args.bad_image_policy,
            max_image_pixels=args.max_image_pixels,
            target_fit=args.target_fit,
            condition_fit=args.condition_fit,
            image_columns=args.image_columns,
            condition_source=args.condition_source,
            condition_interpolation=args.condition_interpolation,
            views=views,
        )

    def _row_index(self, example: dict[str, Any]) -> int:
        index = example.get(INDEX_KEY)
        if index is None:
            index, self._rows_seen = self._rows_seen, self._rows_seen + 1
        return int(index)

    def crop_position(self, index: int) -> float | None:
        """Where a ``random_crop`` view cuts row ``index``'s square this epoch, drawn from (seed, epoch, row) like
        its instruction, so workers and resumed runs cut the same crops; None without a random crop."""
        if not self.views.uses_random_crop:
            return None
        return float(np.random.default_rng([self.sampler.seed, self.epoch, index, _CROP_STREAM]).random())

    def add_sources(self, sources: dict[str, Any]) -> None:
        """Register the datasets (by name, from :func:`~reca_hf.data.as_source`) that bad rows are replaced from
        (map-style ones: a streamed dataset's bad row is replaced from its batch)."""
        self.sources.update(
            {name: data for name, data in sources.items() if hasattr(data, "__getitem__") and hasattr(data, "__len__")}
        )
        for name in sources:  # another dataset under that name: its own rows are not known to be bad
            self._bad_rows.pop(name, None)

    def _image(self, example: dict[str, Any], index: int, draft: int, fit: str):
        source = example.get(SOURCE_KEY)
        column = self.image_columns.get(source, self.image_column)
        field = IMAGE_COLUMN_FIELDS.get(source, "image_column")
        if column not in example:
            raise KeyError(
                f"{_row_name(example, index)} has no column {field}={column!r} (columns: "
                f"{sorted(k for k in example if not k.startswith('__reca'))}); "
                f"set {field} to the column that holds the images"
            )
        return decode_image(example[column], _row_name(example, index), column, self.max_image_pixels, draft, fit)

    def _decoded(self, examples: list[dict[str, Any]], draft: int, fit: str) -> tuple[list[dict[str, Any]], list]:
        """``(rows, images)``: each row with its decoded image; under ``skip``, bad rows replaced (see class doc)."""
        rows, images, streamed_bad = [], [], []
        for example, index in zip(examples, [self._row_index(example) for example in examples]):
            row = {**example, INDEX_KEY: index}
            for attempt in range(_MAX_REPLACEMENTS):
                try:
                    image = self._image(row, index, draft, fit)
                    break
                except BadImageError as error:
                    if self.bad_image_policy == "error":
                        raise
                    if row.get(SOURCE_KEY) is not None and row.get(SOURCE_KEY) not in self.sources:
                        image = None  # a streamed dataset has no row to draw: filled from this batch below
                        streamed_bad.append((len(rows), error))
                        self._count_skip(row, error)
                        break
                    row = self._replacement(row, error, attempt)
            else:
                raise BadImageError(
                    f"{_MAX_REPLACEMENTS} bad images drawn in a row for {_row_name(example, index)}; that dataset "
                    "looks broken (check it with reca validate --check-images)"
                )
            rows.append(row)
            images.append(image)
        for position, error in streamed_bad:
            rows[position], images[position] = self._stand_in(rows, images, position, error)
        return rows, images

    @staticmethod
    def _stand_in(rows: list[dict[str, Any]], images: list, position: int, error: BadImageError):
        """A good row of the same streamed dataset from this batch for the bad row at ``position`` (its task and
        slot index kept), so that the batch stays whole and every prompt has its own image."""
        bad = rows[position]
        for row, image in zip(rows, images):
            if image is not None and row.get(SOURCE_KEY) == bad[SOURCE_KEY]:
                return {**row, **{key: bad[key] for key in (INDEX_KEY, TASK_KEY) if key in bad}}, image
        raise BadImageError(
            f"{error} (bad_image_policy: skip replaces a bad row of a streamed dataset by another row of that dataset in "
            "its batch, and this batch has no good one; fix the data or use a larger batch)",
            error.file,
        ) from error

    def _count_skip(self, row: dict[str, Any], error: BadImageError) -> None:
        """Remember a bad row; the first time this process finds it, count it and say so (a bad row drawn again
        is neither counted nor logged again)."""
        source, number = row[SOURCE_KEY], int(row[ROW_KEY])
        known = self._bad_rows.setdefault(source, set())
        if number in known:
            return
        known.add(number)
        self.skipped_rows[source] += 1
        self._batch_skips.setdefault(source, set()).add(number)
        logger.warning("Skipped a bad image (bad_image_policy: skip): %s", error)

    def _replacement(self, row: dict[str, Any], error: BadImageError, attempt: int) -> dict[str, Any]:
        """A row of ``row``'s source dataset drawn at random from those not known to be bad, keeping ``row``'s
        task and slot index; records the bad row. The draw is seeded by (seed, epoch, slot, attempt), so a run
        is reproducible and no neighbour of a bad row trains more often than the other rows."""
        source = self.sources.get(row.get(SOURCE_KEY))
        if source is None or ROW_KEY not in row:
            raise BadImageError(
                f"{error} (bad_image_policy: skip replaces a bad row by another row of its dataset, which this "
                "collator does not know: wrap the dataset with reca_hf.data.as_source and pass it to add_sources)",
                error.file,
            ) from error
        self._count_skip(row, error)
        known = self._bad_rows[row[SOURCE_KEY]]
        if len(known) >= len(source):
            raise BadImageError(f"{error} (every row of that dataset is bad: check it with reca validate "
                                "--check-images)", error.file) from error  # fmt: skip
        rng = np.random.default_rng([self.sampler.seed, self.epoch, int(row[INDEX_KEY]), attempt, _REPLACEMENT_STREAM])
        drawn = int(rng.integers(len(source)))
        for _ in range(64):  # uniform over the rows not known to be bad (rejection; a mostly bad dataset: below)
            if drawn not in known:
                break
            drawn = int(rng.integers(len(source)))
        else:
            drawn = int(rng.choice([number for number in range(len(source)) if number not in known]))
        return {**source[drawn], **{key: row[key] for key in (INDEX_KEY, TASK_KEY) if key in row}}

    def _text(self, example: dict[str, Any], index: int, task: str):
        """``(question, answer)`` of an image-to-text row, or ``(caption, None)`` of a text-to-image row.

        The caption column holds a string, or chat-style messages (a list of ``{"role", "content"}``), whose
        last assistant turn is the answer and whose user text before it is the question.
        """
        column = caption_column_in(example, self.caption_column)
        if column is None:
            raise KeyError(
                f"{task} row {index} has no column {self.caption_column!r} (columns: "
                f"{sorted(k for k in example if not k.startswith('__reca'))}); set caption_column to the column "
                "that holds the captions or chat messages"
            )
        value = example[column]
        if isinstance(value, str) and value.strip():
            return None, value.strip()
        if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
            answers = [i for i, m in enumerate(value) if m["role"] == "assistant"]
            if answers:
                question = " ".join(_message_text(m) for m in value[: answers[-1]] if m["role"] == "user").strip()
                return question or None, _message_text(value[answers[-1]]).strip()
        raise ValueError(
            f"{task} row {index}: column {column!r} holds {type(value).__name__} {str(value)[:80]!r}; "
            "expected a non-empty caption string or chat messages with an assistant turn; fix or remove that row"
        )

    def _reconstruction(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        rows, images = self._decoded(examples, self.views.largest_side, self.views.decode_fit)
        indices = [row[INDEX_KEY] for row in rows]
        draws = [self.sampler.draw(index, self.epoch) for index in indices]
        instructions = [instruction for instruction, _ in draws]
        conditions, targets = zip(
            *(self.views.views(image, self.crop_position(index)) for image, index in zip(images, indices))
        )
        dropped = [drop for _, drop in draws]
        batch = self._prepare(self.adapter.prepare, list(conditions), list(targets), instructions, dropped=dropped)
        if self.frozen_cache is not None:  # the frozen towers' outputs of these rows, computed before training
            batch.update(self.frozen_cache.batch_entries(rows, SOURCE_KEY, ROW_KEY))
        batch["dataset_index"] = torch.tensor(indices)
        batch["prompt_dropped"] = torch.tensor(dropped)
        batch["instructions"] = instructions
        return batch

    def frozen_inputs(self, examples: list[dict[str, Any]]) -> tuple[list[int], dict[str, Any]]:
        """``(dataset rows, prepared batch)`` of source rows (tagged by :func:`~reca_hf.data.as_source`) with the
        same pixel tensors as in training, for computing their frozen features once; under ``bad_image_policy:
        skip`` a bad row is left out (training replaces it by a later row)."""
        rows, images = [], []
        for example in examples:
            row = int(example[ROW_KEY])
            try:
                images.append(self._image(example, row, self.views.largest_side, self.views.decode_fit))
            except BadImageError:
                if self.bad_image_policy == "error":
                    raise
                continue
            rows.append(row)
        if not rows:
            return rows, {}
        conditions, targets = zip(*(self.views.views(image) for image in images))
        return rows, self.adapter.prepare(list(conditions), list(targets), [self.adapter.null_prompt] * len(rows))

    def _image_to_text(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """The image at the understanding resolution (no bottleneck), a question, and the caption as answer."""
        resolution = self.adapter.understanding_resolution
        rows, images = self._decoded(examples, resolution, self.views.condition_fit)
        indices = [row[INDEX_KEY] for row in rows]
        images = [self.views.square(image, resolution, self.views.condition_fit) for image in images]
        texts = [self._text(row, self._report_index(row), IMAGE_TO_TEXT) for row in rows]
        questions = [q if q is not None else self.sampler.template(i, self.epoch) for (q, _), i in zip(texts, indices)]
        batch = self.adapter.prepare_image_to_text(images, questions, [answer for _, answer in texts])
        batch["dataset_index"] = torch.tensor(indices)
        return batch

    def _text_to_image(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """The caption as the generation prompt (dropped to the null prompt like instructions are) and the target."""
        resolution = self.views.generation_resolution
        rows, images = self._decoded(examples, resolution, self.views.target_fit)
        indices = [row[INDEX_KEY] for row in rows]
        targets = [self.views.square(image, resolution) for image in images]
        dropped = [self.sampler.draw(index, self.epoch)[1] for index in indices]
        captions = [
            self.adapter.null_prompt if drop else self._text(row, self._report_index(row), TEXT_TO_IMAGE)[1]
            for row, drop in zip(rows, dropped)
        ]
        batch = self._prepare(self.adapter.prepare_text_to_image, captions, targets, dropped=dropped)
        batch["dataset_index"] = torch.tensor(indices)
        batch["prompt_dropped"] = torch.tensor(dropped)
        return batch

    @staticmethod
    def _prepare(method, *inputs, dropped: list[bool]) -> dict[str, Any]:
        """``method(*inputs, dropped=dropped)``; an adapter written before ``dropped=`` gets the inputs alone."""
        parameters = inspect.signature(method).parameters
        if "dropped" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return method(*inputs, dropped=dropped)
        return method(*inputs)

    @staticmethod
    def _report_index(row: dict[str, Any]) -> int:
        """The row number to name in errors: the row of its own dataset where known, else the slot index."""
        return int(row.get(ROW_KEY, row[INDEX_KEY]))

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """A RecA batch: reconstruction inputs at the top level, other tasks' inputs under their task name."""
        self._batch_skips = {}
        by_task: dict[str, list[dict[str, Any]]] = {}
        for example in examples:
            task = example.get(TASK_KEY, RECONSTRUCTION)
            if task not in TASKS:
                raise ValueError(f"unknown task {task!r} in a batch row; tasks are {', '.join(TASKS)}")
            by_task.setdefault(task, []).append(example)
        batch = self._reconstruction(by_task[RECONSTRUCTION]) if RECONSTRUCTION in by_task else {}
        if IMAGE_TO_TEXT in by_task:
            batch[IMAGE_TO_TEXT] = self._image_to_text(by_task[IMAGE_TO_TEXT])
        if TEXT_TO_IMAGE in by_task:
            batch[TEXT_TO_IMAGE] = self._text_to_image(by_task[TEXT_TO_IMAGE])
        if self._batch_skips:  # found here, in the worker that decoded them; the trainer counts distinct rows
            batch[SKIPPED_KEY] = {source: sorted(rows) for source, rows in self._batch_skips.items()}
        return batch


_MAX_REPLACEMENTS = 16  # bad rows in a row before a dataset counts as broken


def _row_name(example: dict[str, Any], index: int) -> str:
    """``"train dataset row 8"`` for rows tagged by :func:`~reca_hf.data.as_source`, else ``"dataset row N"``."""
    if SOURCE_KEY in example and ROW_KEY in example:
        return f"{example[SOURCE_KEY]} dataset row {example[ROW_KEY]}"
    return f"dataset row {index}"


def _message_text(message: dict[str, Any]) -> str:
    content = message.get("content", "")
    if isinstance(content, str):
        return content
    return " ".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")
