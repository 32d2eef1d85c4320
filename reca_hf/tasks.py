"""The task mix of a RecA run: reconstruction, plus image-to-text and text-to-image data.

Shared-parameter models (one LLM that understands and generates) keep their understanding only if
image-to-text data stays in the mix; text-to-image data keeps the ordinary generation task alive.
:class:`MixedTaskDataset` interleaves the tasks' datasets so that every task gets its configured share
of the samples; the collator then splits each batch by task and the trainer sums the per-task losses.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from .data import IMAGE_COLUMN_FIELDS, SourceRows, as_source, source_tags

logger = logging.getLogger(__name__)

RECONSTRUCTION, IMAGE_TO_TEXT, TEXT_TO_IMAGE = "reconstruction", "image_to_text", "text_to_image"
TASKS = (RECONSTRUCTION, IMAGE_TO_TEXT, TEXT_TO_IMAGE)
TASK_KEY = "__reca_task__"  # which task a row belongs to (added by the datasets below)
INDEX_KEY = "__reca_index__"  # the row's index, from which the collator draws its instruction


class SharedEpoch:
    """An epoch number the training process sets and dataloader workers read.

    It lives in shared memory, so persistent workers (started once, not per epoch) and workers started before
    a change see the epoch the trainer set at :meth:`~transformers.TrainerCallback.on_epoch_begin`; a plain
    attribute would stay at the value the workers were started with.
    """

    def __init__(self, epoch: int = 0):
        self._value = torch.tensor(int(epoch), dtype=torch.int64).share_memory_()

    def get(self) -> int:
        return int(self._value)

    def set(self, epoch: int) -> None:
        self._value.fill_(int(epoch))


DEFAULT_CAPTION_COLUMN = "caption"
_CAPTION_FALLBACKS = ("text", "messages")  # read when the default caption column is absent


def caption_column_in(columns, configured: str) -> str | None:
    """The column holding captions among ``columns``: ``configured``, or, when that is the default
    ``"caption"`` and absent, ``"text"`` or ``"messages"``; None when there is none."""
    candidates = [configured, *(_CAPTION_FALLBACKS if configured == DEFAULT_CAPTION_COLUMN else ())]
    return next((column for column in candidates if column in columns), None)


def resolve_task_ratios(ratios: dict[str, float] | None, available: dict[str, bool]) -> dict[str, float]:
    """The task shares of a run: ``ratios`` as given (missing tasks get 0), or by default 1 for every task
    that has a dataset. A positive share for a task without a dataset is an error naming the fix."""
    if ratios is None:
        ratios = {task: 1.0 for task in TASKS if available.get(task)}
    resolved = {task: float(ratios.get(task, 0.0)) for task in TASKS}
    missing = [task for task, share in resolved.items() if share > 0 and not available.get(task)]
    if missing:
        keywords = {RECONSTRUCTION: "train_dataset", IMAGE_TO_TEXT: "i2t_dataset", TEXT_TO_IMAGE: "t2i_dataset"}
        raise ValueError(
            f"task_ratios={ratios!r} gives a share to {missing} but no dataset was given for "
            f"{', '.join(keywords[t] for t in missing)}; pass it (recipes: {', '.join(_recipe_key(t) for t in missing)}) "
            "or set that ratio to 0"
        )
    if not any(resolved.values()):
        raise ValueError(f"task_ratios={ratios!r}: at least one task needs a positive share")
    return resolved


def _recipe_key(task: str) -> str:
    return {RECONSTRUCTION: "dataset_name", IMAGE_TO_TEXT: "i2t_dataset_name", TEXT_TO_IMAGE: "t2i_dataset_name"}[task]


class MixedTaskDataset(Dataset):
    """One epoch of interleaved task slots; slot ``i`` is a row of one task's dataset, tagged with the task.

    The epoch is one pass over the reconstruction images (or, without reconstruction, over the largest
    other dataset); each task gets ``round(length * share)`` slots, spread evenly through the epoch so
    that any stretch of consecutive slots, and any shuffled epoch, respects the shares. A task's rows are
    visited in a seeded random order that continues across epochs (set by :meth:`set_epoch`, which the
    Trainer's dataloader calls), so a large image-to-text set is not cut to its first rows.
    """

    reca_indexed = True

    def __init__(self, datasets: dict[str, Any], ratios: dict[str, float], seed: int = 0):
        self.datasets = {task: datasets[task] for task in TASKS if ratios.get(task, 0) > 0}
        total_share = sum(ratios[task] for task in self.datasets)
        self.shares = {task: ratios[task] / total_share for task in self.datasets}
        if RECONSTRUCTION in self.datasets:
            length = math.ceil(len(self.datasets[RECONSTRUCTION]) / self.shares[RECONSTRUCTION])
        else:
            length = max(math.ceil(len(ds) / self.shares[task]) for task, ds in self.datasets.items())
        self.counts = _apportion(length, self.shares)
        keys = np.concatenate([(np.arange(n) + 0.5) / n for n in self.counts.values()])
        tasks = np.concatenate([np.full(n, i) for i, n in enumerate(self.counts.values())])
        ranks = np.concatenate([np.arange(n) for n in self.counts.values()])
        order = np.argsort(keys, kind="stable")
        self._task_names = list(self.counts)
        self._slot_task = tasks[order]
        self._slot_rank = ranks[order]
        self.seed = seed
        self._epoch = SharedEpoch()
        self._permutations: dict[tuple[str, int], np.ndarray] = {}

    @property
    def epoch(self) -> int:
        return self._epoch.get()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.set(epoch)

    def __len__(self) -> int:
        return len(self._slot_task)

    def task_of(self, index: int) -> str:
        return self._task_names[self._slot_task[index]]

    def row_of(self, index: int) -> int:
        """The row of its task's dataset that slot ``index`` reads in the current epoch."""
        task = self.task_of(index)
        size = len(self.datasets[task])
        position = self.epoch * self.counts[task] + int(self._slot_rank[index])
        cycle, offset = divmod(position, size)
        return int(self._permutation(task, cycle)[offset])

    def _permutation(self, task: str, cycle: int) -> np.ndarray:
        key = (task, cycle)
        if key not in self._permutations:
            if len(self._permutations) > 8:
                self._permutations.clear()
            rng = np.random.default_rng([self.seed, TASKS.index(task), cycle])
            self._permutations[key] = rng.permutation(len(self.datasets[task]))
        return self._permutations[key]

    def __getitem__(self, index: int) -> dict[str, Any]:
        task = self.task_of(index)
        return {**self.datasets[task][self.row_of(index)], TASK_KEY: task, INDEX_KEY: index}


class EvalTasksDataset(Dataset):
    """An eval set of captioned images, each evaluated on reconstruction and on image-to-text."""

    reca_indexed = True
    tasks = (RECONSTRUCTION, IMAGE_TO_TEXT)

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset) * len(self.tasks)

    def __getitem__(self, index: int) -> dict[str, Any]:
        task_number, row = divmod(index, len(self.dataset))
        return {**self.dataset[row], TASK_KEY: self.tasks[task_number], INDEX_KEY: index}


def _apportion(total: int, shares: dict[str, float]) -> dict[str, int]:
    """Split ``total`` slots by ``shares`` (largest remainder), at least one slot per task."""
    exact = {task: total * share for task, share in shares.items()}
    counts = {task: max(1, math.floor(value)) for task, value in exact.items()}
    by_remainder = sorted(exact, key=lambda task: exact[task] - math.floor(exact[task]), reverse=True)
    for task in by_remainder[: max(0, total - sum(counts.values()))]:
        counts[task] += 1
    return counts


class IndexedDataset(Dataset):
    """Adds each row's index under ``__reca_index__``, from which the collator draws its instruction."""

    reca_indexed = True

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[index], INDEX_KEY: index}


def indexed(dataset):
    """``dataset`` with its row indices (:class:`IndexedDataset`; for a ``datasets.IterableDataset``, each row's
    position in the stream), unless it has them or cannot be indexed."""
    import datasets

    if dataset is None or isinstance(dataset, dict) or getattr(dataset, "reca_indexed", False):
        return dataset
    if isinstance(dataset, datasets.IterableDataset):
        dataset = dataset.map(_stream_index, with_indices=True)
        dataset.reca_indexed = True
        return dataset
    if isinstance(dataset, IterableDataset):
        return dataset
    return IndexedDataset(dataset)


def check_column(dataset, field: str, column: str, name: str) -> None:
    """A dataset with column names must hold the image column, or a caption column (with its fallbacks)."""
    columns = getattr(dataset, "column_names", None)
    if not isinstance(columns, list):
        return
    present = caption_column_in(columns, column) is not None if field == "caption_column" else column in columns
    if not present:
        what = "captions (or chat messages)" if field == "caption_column" else "images"
        raise ValueError(
            f"{name} has no column {field}={column!r} (columns: {columns}); set {field} to the column that holds "
            f"the {what}"
        )


@dataclass
class RunData:
    """The datasets of a run as the Trainer reads them, and the task mix they were built for."""

    train_dataset: Any  # the reconstruction set, or the task mix; indexed
    eval_dataset: Any  # the eval set, evaluated on image-to-text too when it has captions; indexed
    task_ratios: dict[str, float]
    task_weights: dict[str, float]
    sources: dict[str, Any]  # "train", "eval", "i2t", "t2i": each dataset undecoded, its rows tagged (data.as_source)


def prepare_datasets(
    adapter, args, train_dataset=None, eval_dataset=None, i2t_dataset=None, t2i_dataset=None
) -> RunData:
    """Check the datasets' columns, resolve the task mix (shares the architecture adapter supports), mix the
    tasks, add the image-to-text eval task for a captioned eval set, and index every row."""
    given = {"train_dataset": train_dataset, "eval_dataset": eval_dataset, "i2t_dataset": i2t_dataset,
             "t2i_dataset": t2i_dataset}  # fmt: skip
    columns = args.image_columns
    for name, dataset in given.items():
        source = name.removesuffix("_dataset")
        check_column(dataset, IMAGE_COLUMN_FIELDS[source], columns[source], name)
    for name in ("i2t_dataset", "t2i_dataset"):
        check_column(given[name], "caption_column", args.caption_column, name)
    for name, dataset in given.items():
        if dataset is not None and hasattr(dataset, "__len__") and len(dataset) == 0:
            raise ValueError(
                f"{name} is empty (0 rows): check its source (dataset name, split, max_*_samples, a filter that kept "
                "nothing) or leave it out"
            )
    # The collator decodes the images, so that a bad one names its dataset, original row and file.
    sources = {name.removesuffix("_dataset"): as_source(data, name.removesuffix("_dataset"),
                                                        columns[name.removesuffix("_dataset")])
               for name, data in given.items()}  # fmt: skip
    train_dataset, eval_dataset, i2t_dataset, t2i_dataset = sources.values()
    by_task = {RECONSTRUCTION: train_dataset, IMAGE_TO_TEXT: i2t_dataset, TEXT_TO_IMAGE: t2i_dataset}
    ratios = task_mix(adapter, args.task_ratios, {task: data is not None for task, data in by_task.items()})
    weights = {task: float((args.task_weights or {}).get(task, 1.0)) for task in TASKS}
    train = train_dataset
    streamed = any(isinstance(data, IterableDataset) for data in by_task.values())
    if streamed and args.max_steps <= 0:
        raise ValueError(
            f"max_steps={args.max_steps}: a streamed (iterable) training set has no length to count epochs in; set "
            "max_steps to the number of optimizer steps to train"
        )
    if ratios[IMAGE_TO_TEXT] or ratios[TEXT_TO_IMAGE]:
        mix = iterable_task_mix if streamed else MixedTaskDataset
        train = mix(by_task, ratios, seed=args.seed)
    return RunData(indexed(train), indexed(eval_tasks(adapter, eval_dataset, args)), ratios, weights, sources)


def iterable_task_mix(datasets_by_task: dict[str, Any], ratios: dict[str, float], seed: int = 0):
    """The task mix of streamed datasets: ``datasets.interleave_datasets`` drawing each row's task with
    probability equal to its share (seeded), each row tagged with its task, until every task's stream has
    been read once (``all_exhausted``: the shorter ones start again). Map-style members are streamed too."""
    import datasets

    shares = {task: ratios[task] for task in TASKS if ratios.get(task, 0) > 0}
    streams = []
    for task in shares:
        data = datasets_by_task[task]
        if isinstance(data, SourceRows):  # a map-style member of a streamed mix
            data = data.dataset.to_iterable_dataset().map(partial(source_tags, name=data.name), with_indices=True)
        if not isinstance(data, datasets.IterableDataset):
            raise ValueError(
                f"the {task} dataset is a {type(data).__name__}: a streamed task mix interleaves datasets' own "
                "datasets.Dataset / datasets.IterableDataset (load_dataset(..., streaming=True)); convert it, or train "
                "that task alone"
            )
        streams.append(data.map(partial(_task_tag, task=task)))
    total = sum(shares.values())
    return datasets.interleave_datasets(
        streams,
        probabilities=[share / total for share in shares.values()],
        seed=seed,
        stopping_strategy="all_exhausted",
    )


def _task_tag(row: dict[str, Any], task: str) -> dict[str, Any]:
    return {TASK_KEY: task}


def _stream_index(row: dict[str, Any], index: int) -> dict[str, Any]:
    return {INDEX_KEY: int(index)}


def task_mix(adapter, task_ratios: dict[str, float] | None, given: dict[str, bool]) -> dict[str, float]:
    """The task shares of a run with these datasets, refused where the architecture adapter lacks a task."""
    if not any(given.values()):  # evaluation only
        ratios = {task: float(task == RECONSTRUCTION) for task in TASKS}
    else:
        ratios = resolve_task_ratios(task_ratios, given)
    for task, share in ratios.items():
        if share and not adapter.supports(task):
            raise ValueError(
                f"task_ratios gives {task} a share, but the {adapter.name} adapter does not implement "
                f"{task}; set task_ratios[{task!r}] to 0"
            )
    for task, dataset_given in given.items():
        if dataset_given and not ratios[task] and task != RECONSTRUCTION:
            logger.warning("A dataset was given for %s but task_ratios gives it no share: it is not used.", task)
    return ratios


def eval_tasks(adapter, eval_dataset, args):
    """Evaluate image-to-text too when the eval images have captions, starting at step 0 (sets eval_on_start)."""
    columns = getattr(eval_dataset, "column_names", None)
    if not isinstance(columns, list) or caption_column_in(columns, args.caption_column) is None:
        return eval_dataset
    if not adapter.supports(IMAGE_TO_TEXT):
        return eval_dataset
    if not args.eval_on_start:
        logger.info("The eval set has captions: evaluating image-to-text at step 0 too (eval_on_start=True).")
        args.eval_on_start = True
    return EvalTasksDataset(eval_dataset)
