"""The frozen-tower cache: outputs of frozen modules computed once per (model, views, image) and read back.

An architecture adapter names the per-image outputs of frozen modules that its loss reads
(:attr:`~reca_hf.adapters.UMMAdapter.frozen_feature_sources`: Janus' SigLIP features and VQ codes, OpenUni's
InternViT features and DC-AE latents) and computes them (:meth:`~reca_hf.adapters.UMMAdapter.frozen_features`).
With ``cache_frozen_features`` on, the trainer computes them once for every training image before the first
step and stores them as safetensors shards under ``<cache dir>/<key>/``; the collator then puts them into each
batch (``batch["cached_<name>"]``) and the loss skips those modules.

The key hashes everything an entry depends on: the model (name, revision, and a fingerprint of the source
modules' weights), the feature names, the views (resolutions, bottleneck, blur factor, fits, background, condition
source and interpolation), the precision, the image processor's settings and the dataset (its ``datasets``
fingerprint, else a hash of its image values). A change to any of them is a different key, so a stale entry is never read.

Refused (``true``) or turned off (``auto``) where an entry would not be a function of the image alone: a
source module that trains (freeze policy or LoRA), views drawn per epoch (``target_fit="random_crop"``: caching
per crop seed is not supported), an iterable dataset, or a collator other than :class:`~reca_hf.RecACollator`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .adapters.base import UMMAdapter
from .adapters.helpers import cached_key, eval_mode, unwrap_model
from .collator import RecACollator
from .freeze import matches
from .images import source_file

logger = logging.getLogger(__name__)

AUTO_MIN_SHARE = 0.2  # `auto` caches when the frozen towers are at least this share of a step's FLOPs
CACHE_VERSION = 1  # bump when what an adapter stores changes meaning
INDEX_FILE = "index.json"  # written last: a directory without it is incomplete
_SHARD_BYTES = 256 * 2**20


def default_cache_root(frozen_cache_dir: str | None = None) -> Path:
    """``frozen_cache_dir``, else ``<HF_DATASETS_CACHE>/reca_frozen``."""
    if frozen_cache_dir:
        return Path(frozen_cache_dir).expanduser()
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "reca_frozen"


# ---- which features a run may cache ---------------------------------------------------------------


def trainable_sources(model, adapter: UMMAdapter) -> dict[str, list[str]]:
    """Per cacheable feature, the trainable parameters (LoRA ones included) of the modules it comes from."""
    named = list(unwrap_model(model).named_parameters())
    return {
        name: [p for p, parameter in named if parameter.requires_grad and matches(p, patterns)]
        for name, patterns in adapter.frozen_feature_sources.items()
    }


def cache_problems(adapter: UMMAdapter, model, views, dataset, collator_is_reca: bool = True) -> list[str]:
    """Why no feature of this run can be cached (empty when some can)."""
    problems = []
    if not adapter.frozen_feature_sources:
        problems.append(f"the {adapter.name} architecture adapter declares no frozen features to cache")
    if views is not None and views.uses_random_crop:
        problems.append(
            f"the views are cut at a random square per epoch (target_fit={views.target_fit!r}, condition_fit="
            f"{views.condition_fit!r}), so a frozen tower's output changes every epoch; caching per crop seed is not "
            "supported: set target_fit and condition_fit to 'center_crop', 'pad' or 'stretch' to cache"
        )
    if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        problems.append("the training dataset is not a map-style dataset (an iterable or streaming one)")
    if not collator_is_reca:
        problems.append("the run uses its own data collator; only RecACollator puts cached features into batches")
    return problems


def frozen_share(adapter: UMMAdapter, model, batch: dict[str, Any], names: Iterable[str]) -> float:
    """The FLOP share of one training step that the frozen towers behind ``names`` take, counted by
    ``torch.utils.flop_counter`` on ``batch``: ``frozen / (forward + 2 x (forward - frozen))`` (the backward of
    everything that is not cached costs about twice its forward)."""
    with torch.no_grad(), eval_mode(unwrap_model(model)):
        with _TotalFlops() as frozen:
            adapter.frozen_features(model, batch, tuple(names))
        with _TotalFlops() as total:
            adapter.loss(model, batch)
    cached, forward = frozen.get_total_flops(), total.get_total_flops()
    step = forward + 2 * max(forward - cached, 0)
    return cached / step if step else 0.0


class _Everywhere:
    """A module tracker that attributes every operation to the whole model (see :class:`_TotalFlops`)."""

    parents = frozenset({"Global"})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _TotalFlops():  # noqa: N802 - a class, made on use so that importing reca_hf does not import the counter
    """``torch.utils.flop_counter.FlopCounterMode`` counting the total only: its per-module tracker hooks the
    backward of every module output, which fails under ``no_grad`` on a module that returns a bare parameter
    (OpenUni's meta-queries)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _Everywhere()
    return counter


def resolve_frozen_cache(
    mode: str,
    adapter: UMMAdapter,
    model,
    views,
    dataset,
    share: Callable[[tuple[str, ...]], float],
    collator_is_reca: bool = True,
) -> tuple[str, ...]:
    """The features this run caches under ``cache_frozen_features=mode``: ``()`` for none.

    ``true`` refuses (a ValueError naming the field and the fix) what cannot be cached; ``auto`` logs why it
    caches nothing, skips features whose modules train, and caches the rest only when ``share(names)`` (the
    frozen towers' share of a step) is at least ``AUTO_MIN_SHARE``.
    """
    if mode == "false":
        return ()
    field = f"cache_frozen_features={mode!r}"
    problems = cache_problems(adapter, model, views, dataset, collator_is_reca)
    if problems:
        if mode == "true":
            raise ValueError(f"{field}: {'; '.join(problems)}. Set cache_frozen_features to 'false' (or 'auto').")
        logger.info("Frozen-tower cache off (%s): %s.", field, "; ".join(problems))
        return ()
    trainable = {name: params for name, params in trainable_sources(model, adapter).items() if params}
    if trainable and mode == "true":
        detail = "; ".join(
            f"{name} comes from {', '.join(adapter.frozen_feature_sources[name])}, which trains ({params[0]}"
            f"{f' and {len(params) - 1} more' if len(params) > 1 else ''})"
            for name, params in trainable.items()
        )
        raise ValueError(
            f"{field}: {detail}. A trainable module's outputs change every step and cannot be cached: freeze it "
            "(freeze='auto', no LoRA on it) or set cache_frozen_features to 'false' (or 'auto', which caches "
            "the frozen ones only)."
        )
    names = tuple(name for name in adapter.frozen_feature_sources if name not in trainable)
    for name in trainable:
        logger.info("Frozen-tower cache: %s not cached, its modules train.", name)
    if not names:
        return ()
    if mode == "auto":
        fraction = share(names)
        decision = "on" if fraction >= AUTO_MIN_SHARE else "off"
        logger.info(
            "Frozen-tower cache %s (cache_frozen_features='auto'): %s take %.1f%% of a step's FLOPs (threshold "
            "%.0f%%).",
            decision,
            " and ".join(names),
            100 * fraction,
            100 * AUTO_MIN_SHARE,
        )
        if decision == "off":
            return ()
    return names


# ---- the key ----------------------------------------------------------------------------------------


def weights_fingerprint(model, patterns: Iterable[str]) -> str:
    """A hash of the parameters and buffers under ``patterns``: names, shapes, dtypes, sums and a strided sample
    of values (computed where the weights are, in float32, read back once: the same weights on another kind of
    device may hash differently, which only costs a recomputation)."""
    patterns = tuple(patterns)
    module = unwrap_model(model)
    tensors = [
        (name, tensor)
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]
        if matches(name, patterns)
    ]
    digest = hashlib.sha256()
    if not tensors:
        return digest.hexdigest()[:16]
    stats = []
    for name, tensor in tensors:
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        flat = tensor.detach().flatten().float()
        sample = flat[:: max(1, flat.numel() // 16)][:16]
        stats.append(
            torch.cat(
                [flat.sum()[None], flat.abs().sum()[None], torch.nn.functional.pad(sample, (0, 16 - len(sample)))]
            )
        )
    digest.update(torch.stack(stats).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def dataset_fingerprint(dataset, image_column: str) -> str:
    """A ``datasets.Dataset``'s own fingerprint (also under :func:`~reca_hf.data.as_source`'s wrapper), else a hash
    of every row's image value (bytes; a file's path, size and mtime; a PIL image's pixels)."""
    inner = getattr(dataset, "dataset", dataset)
    fingerprint = getattr(inner, "_fingerprint", None)
    if fingerprint:
        return f"datasets:{fingerprint}:{len(inner)}"
    digest = hashlib.sha256()
    for row in range(len(dataset)):
        digest.update(_value_bytes(dataset[row][image_column]))
    return f"content:{digest.hexdigest()[:24]}:{len(dataset)}"


def _value_bytes(value) -> bytes:
    from PIL import Image

    if isinstance(value, Image.Image):
        return f"{value.mode}{value.size}".encode() + value.tobytes()
    if isinstance(value, dict) and value.get("bytes") is not None:
        return bytes(value["bytes"])
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    file = source_file(value)
    if file is not None:
        info = os.stat(file)
        return f"{os.path.abspath(file)}:{info.st_size}:{info.st_mtime_ns}".encode()
    return repr(value).encode()


def cache_components(
    adapter: UMMAdapter, model, views, dataset, names: Iterable[str], *, image_column: str, precision: str,
    max_image_pixels: int,
) -> dict[str, Any]:  # fmt: skip
    """Everything a cache entry depends on (its key is their hash)."""
    config = getattr(unwrap_model(model), "config", None)  # a plain nn.Module model may have none
    names = sorted(names)
    patterns = [pattern for name in names for pattern in adapter.frozen_feature_sources[name]]
    image_processor = getattr(adapter.processor, "image_processor", None)
    processor_settings = image_processor.to_dict() if hasattr(image_processor, "to_dict") else None
    return {
        "version": CACHE_VERSION,
        "adapter": adapter.name,
        "model": getattr(config, "_name_or_path", None),
        "revision": getattr(config, "_commit_hash", None),
        "weights": weights_fingerprint(model, patterns),
        "features": names,
        "views": dataclasses.asdict(views),
        "precision": precision,
        "image_processor": hashlib.sha256(
            json.dumps(processor_settings, sort_keys=True, default=str).encode()
        ).hexdigest()[:16],
        "dataset": dataset_fingerprint(dataset, image_column),
        "image_column": image_column,
        "max_image_pixels": max_image_pixels,
    }


def cache_key(components: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(components, sort_keys=True, default=str).encode()).hexdigest()[:24]


# ---- the store -----------------------------------------------------------------------------------------


class FrozenFeatureCache:
    """Frozen features of the rows of one dataset (``source``, e.g. ``"train"``), stored as safetensors shards in
    ``directory``; picklable for dataloader workers (shards are opened lazily, memory-mapped)."""

    def __init__(self, directory: str | Path, source: str = "train"):
        self.directory = Path(directory)
        self.source = source
        self._index: dict[str, Any] | None = None
        self._positions: tuple[np.ndarray, np.ndarray] | None = None
        self._handles: dict[int, Any] = {}

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}}

    @property
    def complete(self) -> bool:
        return (self.directory / INDEX_FILE).is_file()

    @property
    def index(self) -> dict[str, Any]:
        if self._index is None:
            self._index = json.loads((self.directory / INDEX_FILE).read_text())
        return self._index

    @property
    def names(self) -> list[str]:
        return list(self.index["features"])

    def _locate(self) -> tuple[np.ndarray, np.ndarray]:
        if self._positions is None:
            from safetensors import safe_open

            size = int(self.index["dataset_rows"])
            shard_of, offset_of = np.full(size, -1, np.int64), np.full(size, -1, np.int64)
            for number, file in enumerate(self.index["shards"]):
                with safe_open(self.directory / file, framework="pt") as handle:
                    rows = handle.get_tensor("rows").numpy()
                shard_of[rows], offset_of[rows] = number, np.arange(len(rows))
            self._positions = shard_of, offset_of
        return self._positions

    def _handle(self, shard: int):
        if shard not in self._handles:
            from safetensors import safe_open

            self._handles[shard] = safe_open(self.directory / self.index["shards"][shard], framework="pt")
        return self._handles[shard]

    def lookup(self, rows: list[int]) -> dict[str, torch.Tensor] | None:
        """``{name: (len(rows), ...)}`` for these dataset rows, or None when one of them has no entry."""
        shard_of, offset_of = self._locate()
        if any(not 0 <= row < len(shard_of) or shard_of[row] < 0 for row in rows):
            return None
        return {
            name: torch.cat(
                [
                    self._handle(int(shard_of[r])).get_slice(name)[int(offset_of[r]) : int(offset_of[r]) + 1]
                    for r in rows
                ]
            )  # fmt: skip
            for name in self.names
        }

    def batch_entries(self, rows: list[dict[str, Any]], source_key: str, row_key: str) -> dict[str, torch.Tensor]:
        """The ``cached_<name>`` batch entries of collated ``rows`` (empty unless every row is a cached one)."""
        if not rows or any(row.get(source_key) != self.source or row_key not in row for row in rows):
            return {}
        found = self.lookup([int(row[row_key]) for row in rows])
        return {} if found is None else {cached_key(name): tensor for name, tensor in found.items()}

    def build(
        self,
        batches: Iterable[tuple[list[int], dict[str, torch.Tensor]]],
        compute: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
        components: dict[str, Any],
        dataset_rows: int,
    ) -> int:
        """Compute and store the features of ``batches`` (``(dataset rows, prepared batch)`` pairs) with
        ``compute``; written to a temporary folder renamed into place at the end, so readers never see a part.
        Returns the number of rows stored."""
        partial = self.directory.with_name(f"{self.directory.name}.partial-{socket.gethostname()}-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        shards, pending, pending_rows, pending_bytes, stored, shapes = [], [], [], 0, 0, {}

        def flush():
            nonlocal pending, pending_rows, pending_bytes
            if not pending_rows:
                return
            from safetensors.torch import save_file

            tensors = {name: torch.cat([p[name] for p in pending]).contiguous() for name in pending[0]}
            tensors["rows"] = torch.tensor(pending_rows, dtype=torch.int64)
            file = f"shard-{len(shards):05d}.safetensors"
            save_file(tensors, str(partial / file))
            shards.append(file)
            pending, pending_rows, pending_bytes = [], [], 0

        try:
            for rows, batch in batches:
                if not rows:
                    continue
                features = {name: tensor.detach().cpu() for name, tensor in compute(batch).items()}
                shapes = {
                    name: [str(t.dtype).removeprefix("torch."), list(t.shape[1:])] for name, t in features.items()
                }
                pending.append(features)
                pending_rows += rows
                pending_bytes += sum(t.numel() * t.element_size() for t in features.values())
                stored += len(rows)
                if pending_bytes >= _SHARD_BYTES:
                    flush()
            flush()
        except BaseException:  # interrupted or failed: leave nothing half-written behind
            shutil.rmtree(partial, ignore_errors=True)
            raise
        index = {"components": components, "features": shapes, "shards": shards, "rows": stored,
                 "dataset_rows": dataset_rows}  # fmt: skip
        (partial / INDEX_FILE).write_text(json.dumps(index, indent=2, default=str) + "\n")
        try:
            os.replace(partial, self.directory)
        except OSError:  # another process finished the same key first: theirs is as good
            shutil.rmtree(partial, ignore_errors=True)
        self._index = self._positions = None
        self._handles = {}
        return stored

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.directory.glob("*.safetensors"))


class FrozenCacheMixin:
    """The frozen-tower cache's setup in a run: resolved, built once per node and handed to the collator when
    training starts. A mixin of :class:`~reca_hf.RecATrainer`, which provides ``adapter``, ``views`` and
    ``_train_source`` (the training rows the cache is keyed by)."""

    def setup_frozen_cache(self) -> FrozenFeatureCache | None:
        """Resolve ``cache_frozen_features``; when on, compute the missing cache (the main process of each node
        first, the others then find it) and hand it to the collator. Returns the cache in use, if any."""
        collator, source = self.data_collator, self._train_source
        is_reca = isinstance(collator, RecACollator)
        names = resolve_frozen_cache(
            self.args.cache_frozen_features,
            self.adapter,
            self.model,
            collator.views if is_reca else self.views,
            source,
            self._frozen_share,
            collator_is_reca=is_reca,
        )
        if not names:
            return None
        components = cache_components(
            self.adapter, self.model, collator.views, source, names, image_column=self.args.image_column,
            precision="bf16" if self.args.bf16 else "fp16" if self.args.fp16 else "fp32",
            max_image_pixels=self.args.max_image_pixels,
        )  # fmt: skip
        cache = FrozenFeatureCache(default_cache_root(self.args.frozen_cache_dir) / cache_key(components))
        with self.args.main_process_first(desc="frozen-tower cache"):
            if cache.complete:
                logger.info("Frozen-tower cache hit: %s (%s).", cache.directory, ", ".join(cache.names))
            else:
                started = time.time()
                stored = cache.build(self._frozen_batches(), self._frozen_compute(names), components, len(source))
                logger.info(
                    "Frozen-tower cache built: %s of %s rows (%s) in %.0f s, %.1f MB, in %s.",
                    stored, len(source), ", ".join(names), time.time() - started, cache.nbytes() / 2**20,
                    cache.directory,
                )  # fmt: skip
        collator.frozen_cache = self.frozen_cache = cache
        return cache

    def _frozen_batches(self):
        """The training rows as ``(rows, prepared batch)``, collated in the run's dataloader workers."""
        workers = self.args.dataloader_num_workers
        return torch.utils.data.DataLoader(
            self._train_source,
            batch_size=self.args.per_device_train_batch_size,
            collate_fn=self.data_collator.frozen_inputs,
            num_workers=workers if isinstance(workers, int) else 0,
        )

    def _frozen_compute(self, names: tuple[str, ...]):
        base = unwrap_model(self.model)

        def compute(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            # As in training (autocast included), in eval mode: a frozen tower's output is that of its eval mode.
            with torch.no_grad(), eval_mode(base), self.accelerator.autocast():
                return self.adapter.frozen_features(base, self._prepare_inputs(batch), names)

        return compute

    def _frozen_share(self, names: tuple[str, ...]) -> float:
        """The frozen towers' FLOP share of a step, counted on the first training rows."""
        rows = [self._train_source[i] for i in range(min(2, len(self._train_source)))]
        kept, batch = self.data_collator.frozen_inputs(rows)
        if not kept:  # both bad images, skipped: nothing to count on
            return 0.0
        with self.accelerator.autocast():
            return frozen_share(self.adapter, unwrap_model(self.model), self._prepare_inputs(batch), names)
