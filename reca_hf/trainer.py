"""`RecATrainer`: a `transformers.Trainer` that trains a unified model with RecA."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from . import __version__
from .adapters import adapter_class_for, get_adapter, unwrap_model
from .adapters.helpers import IGNORE_INDEX, eval_mode
from .callbacks import CollapseDetector, PromptEpochCallback, ReconstructionGridCallback, RunTotals, StreamPosition
from .cards import PAPER_ID, PAPER_TITLE, known_base_model
from .checks import bf16_without_accelerator, check_run
from .collator import SKIPPED_KEY, RecACollator, resolve_dropout
from .config import RESUME_LATEST, RecAConfig
from .data import IMAGE_COLUMN_FIELDS, ROW_KEY, SOURCE_KEY, synthetic_shapes
from .factory import load_model_and_processor
from .flops import FlopCounter, resolve_peak_flops
from .freeze import apply_freeze, format_table, parameter_table
from .frozen_cache import (
    FrozenFeatureCache,
    cache_components,
    cache_key,
    default_cache_root,
    frozen_share,
    resolve_frozen_cache,
)
from .hub import HubPushError, HubResilienceMixin, write_run_card
from .images import ViewSpec, views_from_config
from .loading import is_hub_id, save_module_config
from .lora import (
    check_publishable,
    leaves_understanding_intact,
    lora_record,
    prepare_peft_model,
    write_reca_adapter_file,
)
from .sharding import forward_as as _forward_as
from .sharding import forward_only
from .tasks import (
    IMAGE_TO_TEXT,
    INDEX_KEY,
    RECONSTRUCTION,
    TASK_KEY,
    TASKS,
    TEXT_TO_IMAGE,
    EvalTasksDataset,
    IndexedDataset,
    indexed,
    prepare_datasets,
)
from .threads import apply_cpu_threads

logger = logging.getLogger(__name__)

FREEZE_TABLE_FILE = "reca_parameters.json"
DERIVED_PROBE_FACTOR = 2  # a derived condition is probed this many times as often
PROBE_SEED = 20250909  # synthetic probe images: a seed no training set of synthetic shapes uses by default
RESUME_FROM_HUB_DIR = "_resume_from_hub"  # under output_dir; "_*" keeps it out of the output dir's pushes
__all__ = ["FREEZE_TABLE_FILE", "HubPushError", "IndexedDataset", "NonFiniteLossError", "NonFiniteWeightsError",
           "RecATrainer"]  # fmt: skip


class NonFiniteLossError(RuntimeError):
    """Training met a NaN or inf loss or gradient norm (``nonfinite_action``). The message names the step, the
    task and a fix; the weights are those of the last good step, and nothing non-finite was saved."""


class NonFiniteWeightsError(RuntimeError):
    """``save_model`` refused to write weights holding NaN or inf; the message names the tensors."""


class RecATrainer(HubResilienceMixin, Trainer):
    """Trainer for RecA post-training of unified multimodal models.

    It wires the rooms of reca_hf together: the architecture adapter (``self.adapter``), the run's views
    (``self.views``, read by the collator, the card, the LoRA side file and the collapse probe), the datasets
    and task mix (:func:`reca_hf.tasks.prepare_datasets`), the freeze policy and LoRA, the callbacks, the RecA
    loss, the Hub resilience (:class:`reca_hf.hub.HubResilienceMixin`) and the run record behind the card.

    Args:
        model: a model instance, or a hub id / local folder loaded with `from_pretrained` (the processor
            is loaded from the same place unless `processing_class` is given).
        args: a [`RecAConfig`]; `None` gives the defaults, a plain `TrainingArguments` is converted.
        data_collator: `None` builds a [`RecACollator`] from the adapter, the processor and `args`.
        train_dataset, eval_dataset: datasets whose `args.image_column` (`args.eval_image_column`) holds images;
            `i2t_dataset` and `t2i_dataset` (captioned images) are mixed in by `args.task_ratios`.
        processing_class: the model's processor (tokenizer and image processor).
        peft_config: a `peft.PeftConfig` to train a LoRA adapter instead of the weights; it wins over the
            `use_peft` / `lora_*` fields of `args`. Every base parameter stays frozen.
    """

    _tag_names = ["reca", "unified-multimodal", "text-to-image"]
    _name = "RecA"
    _paper = {"title": PAPER_TITLE, "id": PAPER_ID}

    def __init__(
        self,
        model,
        args: RecAConfig | TrainingArguments | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
        i2t_dataset=None,
        t2i_dataset=None,
        **kwargs,
    ):
        follow_transformers_logging(getattr(args, "log_level", "passive"))
        if isinstance(model, str):
            model_id = model
            model, loaded_processor = load_model_and_processor(
                model,
                getattr(args, "model_dtype", "float32"),
                adapter=getattr(args, "adapter", None),
                trust_remote_code=getattr(args, "trust_remote_code", False),
                revision=getattr(args, "model_revision", None),
                attn_implementation=getattr(args, "attn_implementation", None),
            )
            processing_class = processing_class if processing_class is not None else loaded_processor
        else:
            config = getattr(model, "config", None)
            model_id = (
                getattr(config, "_name_or_path", None) or getattr(config, "model_type", None) or type(model).__name__
            )
            if processing_class is None:
                if getattr(args, "adapter", None) is None:  # "no adapter for this model" before "no processor"
                    adapter_class_for(getattr(config, "model_type", None))
                processing_class = processor_of(model)
        args = _as_reca_config(args, model_id)
        self.adapter = get_adapter(model, processing_class, adapter=args.adapter)
        check_run(args, self.adapter)  # what the config cannot check alone: the same checks as `reca validate`
        self.base_model_id = args.base_model_id or model_id
        if data_collator is None:
            data_collator = RecACollator.from_config(self.adapter, args)
        is_reca_collator = isinstance(data_collator, RecACollator)
        # The run's views: the collator's, or (for the user's own collator) the configured ones, guarded alike.
        self.views: ViewSpec = data_collator.views if is_reca_collator else views_from_config(self.adapter, args)
        data = prepare_datasets(self.adapter, args, train_dataset, eval_dataset, i2t_dataset, t2i_dataset)
        self.task_ratios, self.task_weights = data.task_ratios, data.task_weights
        self._train_source = data.sources.get("train")  # the rows the frozen-tower cache is keyed by
        self.frozen_cache: FrozenFeatureCache | None = None
        if is_reca_collator:  # where bad_image_policy="skip" finds replacement rows
            data_collator.add_sources(data.sources)
        if isinstance(data.train_dataset, torch.utils.data.IterableDataset):
            _read_streams_in_every_process(args)
        apply_freeze(model, self.adapter, args.freeze)
        model = prepare_peft_model(model, self.adapter, args, peft_config, model_id)
        self.parameter_table = parameter_table(model, self.adapter)
        self._check_understanding_data(model, args)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=data.train_dataset,
            eval_dataset=data.eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            **kwargs,
        )
        apply_cpu_threads(getattr(args, "cpu_threads", "auto"), model, self.args.device)
        # Our loss is a mean over the batch: let the Trainer divide by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}  # name -> [(sum, count)]
        self.run_totals = RunTotals(dict.fromkeys(TASKS, 0))  # samples per task, wall time: saved in checkpoints
        self.add_callback(self.run_totals)
        self._nonfinite: dict[str, torch.Tensor] = {}  # task -> a non-finite loss since the last optimizer step
        self._skipping_step = False
        self._pending_losses = {"train": [], "eval": []}  # per step: (device loss sums per task, host counts)
        self.flop_counter = FlopCounter().attach(unwrap_model(self.model))
        self.task_flos = dict.fromkeys(TASKS, 0)  # FLOPs of the training steps per task (this process)
        self._step_flos = self._window_flos = 0
        self._window_start = time.time()
        self.peak_flops_per_second = resolve_peak_flops(args)
        self._pending_skipped: list[list[int]] = []  # per step, with several processes: skipped images per dataset
        self._epochs = PromptEpochCallback(data_collator, data.train_dataset) if is_reca_collator else None
        if self._epochs is not None:
            self.add_callback(self._epochs)
        self._stream_position = None
        if isinstance(data.train_dataset, torch.utils.data.IterableDataset):
            self._stream_position = StreamPosition()
            self.add_callback(self._stream_position)
        self._add_grid_callback(train_dataset, eval_dataset)
        self.collapse_detector = self._collapse_detector(eval_dataset)
        if self.adapter.condition_relation == "derived":
            self._warn_derived_condition()
        if self.is_world_process_zero():
            title = f"RecA parameters ({self.adapter.name}, freeze={args.freeze!r})"
            logger.info("%s", format_table(self.parameter_table, title))

    # ---- callbacks ----

    def _add_grid_callback(self, train_dataset, eval_dataset=None) -> None:
        """The reconstruction grid and validation samples (ReconstructionGridCallback): of the first eval images
        when there is an eval set, else of the first training images."""
        args = self.args
        prompts = list(args.validation_prompts or [])
        if prompts and not self.adapter.supports_text_to_image_sampling():
            logger.warning(
                "validation_prompts are not sampled: the %s architecture adapter has no text-to-image sampler.",
                self.adapter.name,
            )
            prompts = []
        source = eval_dataset if _has_rows(eval_dataset) else train_dataset
        count = args.num_reconstruction_images if source is not None else 0
        if (count == 0 and not prompts) or not isinstance(self.data_collator, RecACollator):
            return
        if self.is_fsdp_enabled and not getattr(self.accelerator, "is_fsdp2", False):
            logger.warning(
                "Reconstruction grid off: under FSDP1 (fsdp_version 1) a wrapped block's weights are whole only inside "
                "its own forward, and generation reads some elsewhere (e.g. a VQ codebook lookup). Use FSDP2 "
                "(fsdp_version 2, as the shipped fsdp2 config), where every rank draws the grid together."
            )
            return
        column = args.image_columns["eval" if source is eval_dataset else "train"]
        if source is None:
            rows = []
        elif isinstance(source, torch.utils.data.IterableDataset):  # a stream: its first rows
            rows = list(itertools.islice(iter(source), count))
        else:
            rows = [source[i] for i in range(min(count, len(source)))]
        images = [row[column] for row in rows]
        if not images and not prompts:
            return
        generation = dict(args.reconstruction_kwargs or {})
        from .sampling import sampler_settings

        sampler = {k: v for k, v in generation.items() if k in {"guidance_scale", *sampler_settings(self.adapter)}}
        grid = ReconstructionGridCallback(
            self.adapter,
            self.views,
            images,
            seed=args.seed,
            every_steps=args.reconstruction_steps,
            prompts=prompts,
            trackers=self.callback_handler.callbacks,
            sample_kwargs=sampler if prompts else None,
            **generation,
        )
        self.add_callback(self._shard_aware(grid))

    @property
    def is_sharded(self) -> bool:
        """Whether no rank holds the whole model (FSDP, DeepSpeed), so forward-only work needs every rank."""
        return bool(self.is_fsdp_enabled or self.is_deepspeed_enabled)

    def _shard_aware(self, callback):
        """Under FSDP and DeepSpeed, let the grid or the detector run on every rank (:meth:`sharded_forward`)."""
        if self.is_sharded:
            callback.sharded_forward = self.sharded_forward
        return callback

    def sharded_forward(self, function):
        """``function(model)`` on the whole model, forward only, on every rank together: the collapse probe and the
        reconstruction grid of a sharded run (FSDP, DeepSpeed). See :func:`reca_hf.sharding.forward_only`."""
        return forward_only(self.model_wrapped, function)

    def _collapse_detector(self, eval_dataset) -> CollapseDetector | None:
        """The user's CollapseDetector if they passed one, else the default one (None when it cannot run)."""
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, (CollapseDetector, ReconstructionGridCallback)):
                self._shard_aware(callback)  # the user's own: every rank runs it too under sharding
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, CollapseDetector):
                return callback
        args = self.args
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
            images = [eval_dataset[i][args.image_columns["eval"]] for i in range(min(count, len(eval_dataset)))]
        else:
            images = []
        if len(images) < 2:  # no held-out images: shapes this model has never seen
            images = synthetic_shapes(count, size=self.views.generation_resolution, seed=PROBE_SEED)["image"]
        probe_steps = args.collapse_probe_steps
        if self.adapter.condition_relation == "derived":  # copyable by learning: probe twice as often
            probe_steps = max(1, probe_steps // DERIVED_PROBE_FACTOR)
        detector = CollapseDetector(
            self.adapter, self.views, images, action=args.collapse_action, probe_steps=probe_steps
        )
        self.add_callback(self._shard_aware(detector))
        return detector

    def _warn_derived_condition(self) -> None:
        """A derived condition is trained, not refused: say why it is risky and what the detector does about it."""
        detector = self.collapse_detector
        watch = (
            f"the collapse probe runs twice as often (every {detector.probe_steps} steps instead of "
            f"{self.args.collapse_probe_steps}); watch condition_gain"
            if detector is not None and detector.probe_steps < self.args.collapse_probe_steps
            else "watch reconstruction_loss and condition_gain for a fall toward copying"
        )
        logger.warning(
            "The %s architecture adapter derives its condition from the target (condition_relation 'derived': a "
            "trainable encoder reads the target's own latents at the target's resolution, as Harmon does). Such an "
            "encoder can learn to pass the target through, and RecA then collapses into copying; the run is not "
            "refused, because a trained encoder is no copy to begin with, but %s.",
            self.adapter.name,
            watch,
        )

    def _check_understanding_data(self, model, args) -> None:
        """The guide's third rule: a shared LLM trained without image-to-text data loses understanding."""
        if self.adapter.parameter_sharing != "shared":
            return
        if leaves_understanding_intact(model, self.adapter):  # e.g. a generation-only LoRA
            if self.task_ratios[IMAGE_TO_TEXT] > 0:
                logger.warning(
                    "This run trains a generation-only LoRA adapter, which leaves understanding exactly intact; its "
                    "image-to-text samples only train that adapter on captions. Set task_ratios image_to_text "
                    "to 0 unless that is what you want."
                )
            return
        if self.task_ratios[IMAGE_TO_TEXT] > 0:
            return
        message = (
            f"{self.adapter.name} uses one language model to understand and to generate, and this run trains it "
            "with no image-to-text data. Reconstruction alone pulls that shared model toward generation: its "
            "captioning and question answering degrade, and its representation can collapse. Mix image-to-text "
            "data in: pass i2t_dataset= (recipes: i2t_dataset_name) with task_ratios such as "
            '{"reconstruction": 1, "image_to_text": 1}, the 1:1 mix of the public RecA configs.'
        )
        if args.require_understanding_data:
            raise ValueError("require_understanding_data=True: " + message)
        logger.warning(message)

    # ---- data ----

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = [*dict.fromkeys(self.args.image_columns.values()), self.args.caption_column,
                                       INDEX_KEY, TASK_KEY, SOURCE_KEY, ROW_KEY]  # fmt: skip

    def _get_dataloader(self, dataset, *args, **kwargs):
        return super()._get_dataloader(indexed(dataset), *args, **kwargs)  # also a dataset given to evaluate()

    # ---- loss ----

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._count_skipped(inputs.pop(SKIPPED_KEY, None))
        # Every entry the collator made reaches the adapter, tensors or not (lists, variable-size entries).
        batches = {RECONSTRUCTION: {k: v for k, v in inputs.items() if k not in (IMAGE_TO_TEXT, TEXT_TO_IMAGE)}}
        batches.update({task: inputs[task] for task in (IMAGE_TO_TEXT, TEXT_TO_IMAGE) if task in inputs})
        batches = {task: batch for task, batch in batches.items() if batch}
        base = unwrap_model(model)
        task_losses: dict[str, torch.Tensor] = {}
        caption_share = self._caption_token_share(batches, "train" if model.training else "eval")

        def forward(**batches):  # one forward call of the (possibly wrapped) model computes every task's loss
            for task, batch in batches.items():
                task_losses[task] = self._task_loss(base, task, batch)
                flops = self.flop_counter.pop()  # this task's forward and the backward it will cause
                self.task_flos[task] += flops
                self._step_flos += flops
            if caption_share is not None and IMAGE_TO_TEXT in task_losses:
                share, factor = caption_share
                task_losses[IMAGE_TO_TEXT] = task_losses[IMAGE_TO_TEXT] * share
                return self._combine({**task_losses, IMAGE_TO_TEXT: task_losses[IMAGE_TO_TEXT] * factor}, batches)
            return self._combine(task_losses, batches)

        if model.training:
            self.flop_counter.start()
        try:
            with _forward_as(base, forward), self.accelerator.autocast():
                loss = model(**batches)
        finally:
            self.flop_counter.stop()
        if model.training:
            self._flag_nonfinite(task_losses)
        self._record_task_losses("train" if model.training else "eval", task_losses, batches)
        return (loss, {"loss": loss}) if return_outputs else loss

    def _count_skipped(self, skipped: dict[str, int] | None) -> None:
        """Add a batch's skipped bad images (counted by the collator, in whichever worker made the batch) to
        :attr:`skipped_rows`. Host numbers: one process adds them at once; several keep them until the next
        :meth:`_flush_task_losses` sums them over the processes (no device read in the step)."""
        counts = [int((skipped or {}).get(name, 0)) for name in IMAGE_COLUMN_FIELDS]
        if self.accelerator.num_processes > 1:
            self._pending_skipped.append(counts)
        else:
            self._add_skipped(counts)

    def _add_skipped(self, counts) -> None:
        totals = self._totals().skipped_rows
        for name, count in zip(IMAGE_COLUMN_FIELDS, counts):
            if count:
                totals[name] = totals.get(name, 0) + int(count)

    @property
    def skipped_rows(self) -> dict[str, int]:
        """Bad images skipped per dataset (``bad_image_policy: skip``), over all processes, dataloader workers and
        the resumed parts of the run."""
        return self._totals().skipped_rows

    def skipped_summary(self) -> str | None:
        """``"train 2, i2t 1"``: the bad images skipped so far per dataset (None when none were)."""
        if not self.skipped_rows:
            return None
        return ", ".join(f"{name} {count:,}" for name, count in sorted(self.skipped_rows.items()))

    def _caption_token_share(self, batches, mode: str) -> tuple[torch.Tensor, torch.Tensor | float] | None:
        """Make the image-to-text loss of a multi-process step the mean over all processes' answer tokens, as one
        process training on the whole global batch computes it (what transformers does with num_items_in_batch).

        Each process's caption loss is a mean over its own answer tokens; the processes' token counts differ, so
        averaging their gradients weighs tokens unequally. Returns ``(share, factor)``: this process's loss times
        ``share`` (its tokens per sample over the global tokens per sample) is what it logs, and, times ``factor``
        as well, what it trains on (1 for ``task_loss_reduction="sample_mean"``, whose task weights are the
        process's own sample shares; world size x the process's share of the samples for the others). None in a
        single process, when no process trains image-to-text, or on a process without captions in this batch.
        One gather per step on every process, and no host-device sync (the counts stay on the device); with
        gradient accumulation each micro-batch is normalised by its own global token count."""
        if self.accelerator.num_processes == 1 or not self._captions_active(mode):
            return None
        device = self.accelerator.device
        batch = batches.get(IMAGE_TO_TEXT)
        labels = batch.get("labels") if batch else None
        samples = self.adapter.batch_size(batch) if labels is not None else 0
        tokens = (
            (labels[:, 1:] != IGNORE_INDEX).sum().float().to(device)  # the positions answer_loss scores
            if labels is not None
            else torch.zeros((), device=device)
        )
        local = torch.stack([torch.tensor(float(samples), device=device), tokens])
        all_samples, all_tokens = self.accelerator.gather(local[None]).sum(0).unbind()
        if not samples:
            return None
        share = (tokens / samples) * (all_samples / all_tokens.clamp(min=1))
        if self.args.task_loss_reduction == "sample_mean":
            return share, 1.0
        return share, self.accelerator.num_processes * samples / all_samples

    def _captions_active(self, mode: str) -> bool:
        """Whether any process may score captions this step (the same answer on all: the collectives match)."""
        if self.task_ratios[IMAGE_TO_TEXT] > 0:
            return True
        return (
            mode == "eval"
            and isinstance(self.eval_dataset, EvalTasksDataset)
            and (IMAGE_TO_TEXT in self.eval_dataset.tasks)
        )

    def _task_loss(self, model, task: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if task == IMAGE_TO_TEXT:
            return self.adapter.image_to_text_loss(model, batch)
        if task == TEXT_TO_IMAGE:
            return self.adapter.text_to_image_loss(model, batch)
        return self.adapter.loss(model, batch)

    def _combine(self, losses: dict[str, torch.Tensor], batches) -> torch.Tensor:
        """One loss from the task losses, by ``task_loss_reduction`` (each times its task's weight):
        ``sample_mean``, each sample counts once; ``task_mean``, each task's mean times its share of the task
        ratios; ``sum``, the task means added up."""
        weighted = {task: self.task_weights[task] * loss for task, loss in losses.items()}
        reduction = self.args.task_loss_reduction
        if reduction == "sum":
            return sum(weighted.values())
        if reduction == "task_mean":
            total = sum(self.task_ratios.values())
            return sum(self.task_ratios[task] / total * loss for task, loss in weighted.items())
        sizes = {task: self.adapter.batch_size(batches[task]) for task in losses}
        total = sum(sizes.values())
        return sum(sizes[task] / total * loss for task, loss in weighted.items())

    def _record_task_losses(self, mode: str, losses: dict[str, torch.Tensor], batches) -> None:
        """Keep this step's per-task loss sums on the device and their sample counts on the host: nothing is read
        off the device (no host-device sync) until :meth:`_flush_task_losses`, at the next log or checkpoint."""
        device = self.accelerator.device
        sizes = [self.adapter.batch_size(batches[task]) if task in losses else 0 for task in TASKS]
        sums = [losses[task].detach().float().to(device) * size if task in losses else torch.zeros((), device=device)
                for task, size in zip(TASKS, sizes)]  # fmt: skip
        self._pending_losses[mode].append((torch.stack(sums), sizes))

    def _flush_task_losses(self, mode: str) -> None:
        """Gather the pending steps' task losses of every process (one collective for all of them, so every process
        must call it at the same points: log() and checkpoints) into the metrics and ``task_counts``."""
        device = self.accelerator.device
        skipped, self._pending_skipped = self._pending_skipped, []
        if skipped:  # several processes: each one's skipped images of the steps since the last flush
            summed = self.accelerator.gather(torch.tensor(skipped, dtype=torch.float32, device=device)[None]).sum(0)
            for counts in summed.tolist():
                self._add_skipped(counts)
        pending, self._pending_losses[mode] = self._pending_losses[mode], []
        if not pending:
            return
        sums = torch.stack([step_sums for step_sums, _ in pending])  # (steps, tasks)
        counts = torch.tensor([sizes for _, sizes in pending], dtype=torch.float32, device=device)
        pairs = torch.stack([sums, counts], dim=-1)  # (steps, tasks, 2)
        gathered = self.accelerator.gather(pairs).view(-1, *pairs.shape).sum(0)  # summed over processes
        for step in gathered.tolist():
            for task, (total, count) in zip(TASKS, step):
                if count:
                    self._metrics[mode][f"{task}_loss"].append((total, count))
                if mode == "train":
                    self.task_counts[task] += int(count)

    @property
    def task_counts(self) -> dict[str, int]:
        """Training samples seen per task, over all processes and every resumed part of the run."""
        return self._totals().task_counts

    def _totals(self) -> RunTotals:
        # restore_callback_states_from_checkpoint=True replaces the callback by a new instance: look it up
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, RunTotals):
                return callback
        return self.run_totals

    # ---- non-finite losses and gradients ----

    def _flag_nonfinite(self, losses: dict[str, torch.Tensor]) -> None:
        """Remember, on the device (no host sync), which task losses were not finite."""
        for task, loss in losses.items():
            bad = ~torch.isfinite(loss.detach()).all()
            self._nonfinite[task] = bad if task not in self._nonfinite else self._nonfinite[task] | bad

    def _get_grad_norm(self, model, grad_norm=None):
        # The stock loop computes the gradient norm right before the optimizer step: the one place to check.
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._check_finite(grad_norm)
        return grad_norm

    def _check_finite(self, grad_norm) -> None:
        """Before each optimizer step: stop, or skip the step, when a task loss since the last step or the
        gradient norm is not finite (``nonfinite_action``)."""
        if self._skipping_step:  # the previous step was skipped: accelerate's flag of a skipped step goes back
            self.optimizer._is_overflow = False
            self._skipping_step = False
        problem = self._nonfinite_problem(grad_norm)
        if problem is None:
            return
        step, args, totals = self.state.global_step + 1, self.args, self._totals()
        fix = (
            f"Fix: lower learning_rate (now {args.learning_rate:g}; try {args.learning_rate / 10:g}), clip gradients "
            f"with max_grad_norm (now {args.max_grad_norm:g}), or train in fp32/bf16 rather than fp16."
        )
        if args.nonfinite_action == "skip" and totals.nonfinite_skipped_steps < args.max_nonfinite_steps:
            totals.nonfinite_skipped_steps += 1
            self._skip_optimizer_step()
            if self.is_world_process_zero():
                logger.warning(
                    "Step %d skipped: %s (nonfinite_action='skip'; %d of at most max_nonfinite_steps=%d skipped). %s",
                    step, problem, totals.nonfinite_skipped_steps, args.max_nonfinite_steps, fix,
                )  # fmt: skip
            return
        reason = "nonfinite_action='stop'"
        if args.nonfinite_action == "skip":
            reason = (f"more than max_nonfinite_steps={args.max_nonfinite_steps} non-finite steps "
                      f"({totals.nonfinite_skipped_steps} skipped before)")  # fmt: skip
        last = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"training stopped at step {step} before the optimizer step ({reason}): {problem}. Nothing of this step "
            f"was applied or saved; {kept}. {fix} nonfinite_action='skip' skips such steps instead."
        )

    def _nonfinite_problem(self, grad_norm) -> str | None:
        """What is not finite in this step (None when all is): one host sync per optimizer step, the task flags
        and the norm in one tensor, averaged over the processes so that every rank decides alike."""
        device = self.accelerator.device
        flags = [self._nonfinite.get(task, torch.zeros((), dtype=torch.bool, device=device)) for task in TASKS]
        self._nonfinite.clear()
        norm = torch.as_tensor(0.0 if grad_norm is None else grad_norm, device=device).detach().float()
        values = torch.stack([*(flag.to(device).float() for flag in flags), (~torch.isfinite(norm)).float(), norm])
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="mean")
        *task_flags, norm_flag, norm_value = values.tolist()
        bad_tasks = [f"{task}_loss" for task, flag in zip(TASKS, task_flags) if flag > 0]
        if bad_tasks:
            return f"{' and '.join(bad_tasks)} not finite (gradient norm {norm_value})"
        return f"the gradient norm is {norm_value} (every task loss was finite)" if norm_flag else None

    def _skip_optimizer_step(self) -> None:
        """Make the coming optimizer step a no-op, reported as skipped: the weights, the optimizer's moments and
        the learning-rate schedule all stay as they are (accelerate's flag for a skipped step, which the stock
        loop and the accelerated scheduler read, as for an fp16 overflow)."""
        optimizer = self.optimizer

        def skipped_step(*args, **kwargs):
            del optimizer.step  # the class's own step again
            optimizer._is_overflow = True

        optimizer.step = skipped_step
        self._skipping_step = True

    def _maybe_log_save_evaluate(self, tr_loss, *args, **kwargs):
        logged = self._globalstep_last_logged
        super()._maybe_log_save_evaluate(tr_loss, *args, **kwargs)
        if self._globalstep_last_logged != logged:  # a log reset the running loss, but NaN - NaN stays NaN
            tr_loss.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """The FLOPs of the training step just run (the Trainer asks after each one, for ``total_flos``): every
        task's forward through trained and frozen modules and the backward autograd runs, as
        :class:`reca_hf.flops.FlopCounter` counted them (per task in ``task_flos``), instead of transformers'
        ``6 x parameters x input_ids``."""
        flops, self._step_flos = self._step_flos, 0
        self._window_flos += flops
        return flops

    def _throughput(self) -> dict[str, float]:
        """``mfu`` since the last training log: this process's counted FLOPs per second over its accelerator's peak
        (``peak_flops_per_second``); nothing without a known peak."""
        now = time.time()
        elapsed, flops = now - self._window_start, self._window_flos
        self._window_start, self._window_flos = now, 0
        if self.peak_flops_per_second is None or elapsed <= 0 or flops == 0:
            return {}
        return {"mfu": flops / elapsed / self.peak_flops_per_second}

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        self._flush_task_losses(mode)
        metrics = {
            name: sum(total for total, _ in pairs) / sum(count for _, count in pairs)
            for name, pairs in self._metrics[mode].items()
            if pairs
        }
        if mode == "eval":
            metrics = {f"eval_{name}": value for name, value in metrics.items()}
        elif "loss" in logs or "train_loss" in logs:  # a regular training log, or the end-of-training one
            if "loss" in logs:
                metrics.update(self._throughput())
            if self.collapse_detector is not None:
                metrics.update(self.collapse_detector.pop_metrics())
            if self._totals().nonfinite_skipped_steps:
                metrics["nonfinite_skipped_steps"] = self._totals().nonfinite_skipped_steps
        logs.update(metrics)  # in place, so evaluate() returns these metrics too
        super().log(logs, start_time)
        self._metrics[mode].clear()

    def train(self, *args, **kwargs):
        problem = bf16_without_accelerator(self.args)  # the config allows it, so that recipes validate anywhere
        if problem:
            raise ValueError(problem)
        if self.args.nonfinite_action == "skip" and self.is_deepspeed_enabled:
            raise ValueError(
                "nonfinite_action='skip' does not work under DeepSpeed (its engine steps the optimizer itself): use "
                "nonfinite_action='stop'."
            )
        args, kwargs = self._resolve_resume(args, kwargs)
        self.setup_frozen_cache()
        self._window_start, self._window_flos = time.time(), 0  # the mfu's first window starts here
        with _plain_config_tolerated(self.model):
            output = super().train(*args, **kwargs)
        if self.skipped_rows:
            logger.warning(
                "bad_image_policy: skip: %d bad image(s) were skipped and replaced in this run (%s); the warnings "
                "above name each row and file. Run reca validate --check-images to list them all.",
                sum(self.skipped_rows.values()),
                self.skipped_summary(),
            )
        return output

    def _resolve_resume(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """``resume_from_checkpoint`` as the stock Trainer takes it: 'true' / 'latest' (any case) and True become
        the newest checkpoint in output_dir, an error naming the folder when there is none; 'false' is None.
        Without one, ``resume_from_hub`` downloads the pushed checkpoint and resumes from it."""
        if args:
            kwargs["resume_from_checkpoint"], args = args[0], args[1:]
        resume = kwargs.get("resume_from_checkpoint")
        if isinstance(resume, str) and resume.strip().lower() in ("false", "none", ""):
            resume = None
        if resume is True or (isinstance(resume, str) and resume.strip().lower() in RESUME_LATEST):
            output_dir = self.args.output_dir
            resume = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
            if resume is None:
                raise ValueError(
                    f"resume_from_checkpoint={kwargs['resume_from_checkpoint']!r}: {output_dir} holds no checkpoint-N "
                    "folder to resume from. Give a checkpoint folder's path, or train without resume_from_checkpoint."
                )
        elif isinstance(resume, str) and not Path(resume).is_dir():
            raise ValueError(
                f"resume_from_checkpoint={resume!r}: no such folder. Give a checkpoint folder (e.g. "
                f"{Path(self.args.output_dir) / 'checkpoint-500'}), or 'latest' for the newest one in output_dir."
            )
        if resume is None and self.args.resume_from_hub:
            resume = download_checkpoint(self.args.resume_from_hub, Path(self.args.output_dir) / RESUME_FROM_HUB_DIR,
                                         token=self.args.hub_token, revision=self.args.hub_revision)  # fmt: skip
        kwargs["resume_from_checkpoint"] = resume
        return args, kwargs

    # ---- the frozen-tower cache (reca_hf.frozen_cache) ----

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

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint,
                             trial):  # fmt: skip
        """The Trainer's (epochs trained, batches to skip), but for a resumed stream from its saved position: the
        pass it was in and the batches of that pass already trained on (see :class:`StreamPosition`)."""
        epochs, batches = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        )
        saved = (self.state.stateful_callbacks or {}).get(StreamPosition.__name__)
        if self._stream_position is not None:  # restore_callback_states_from_checkpoint may have replaced it
            self._stream_position = next(c for c in self.callback_handler.callbacks if isinstance(c, StreamPosition))
        if self._stream_position is not None and resume_from_checkpoint is not None and isinstance(saved, dict):
            position = saved.get("attributes", {})
            epochs = max(0, int(position.get("epoch", 0)))
            self._stream_position.epoch = epochs - 1  # on_epoch_begin counts the resumed pass again
            if not self.args.ignore_data_skip:
                done = self.state.global_step - int(position.get("epoch_start_step", 0))
                batches = done * self.args.gradient_accumulation_steps
        if self._epochs is not None:
            self._epochs.next_epoch = epochs
        return epochs, batches

    # ---- outputs: the run record (reca_run.json) and the side files written from it ----

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        self._check_finite_weights()
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            folder = Path(output_dir or self.args.output_dir)
            run = self.run_record()
            base = unwrap_model(self.model)
            if run["lora"] is None and not isinstance(base, PreTrainedModel):
                # A plain torch.nn.Module: the Trainer saved its weights alone; its config makes the folder
                # loadable again (reca_hf.loading.load_module).
                save_module_config(base, folder)
            (folder / FREEZE_TABLE_FILE).write_text(json.dumps(run["parameter_table"], indent=2) + "\n")
            if run["lora"] is not None:
                write_reca_adapter_file(folder, run)
            self._write_run_card(folder, run)  # our card over PEFT's; in a checkpoint, before its push

    def _check_finite_weights(self) -> None:
        """Refuse to save NaN or inf weights. Each process checks the tensors it holds (one host sync); sharded
        runs (FSDP, DeepSpeed) decide together, since every rank holds other values."""
        named = [*self.model.named_parameters(), *self.model.named_buffers()]
        tensors = {name: getattr(t, "to_local", lambda t=t: t)().detach() for name, t in named}  # a DTensor's shard
        tensors = {name: t for name, t in tensors.items() if t.is_floating_point() and t.numel()}
        if not tensors:
            return
        bad = torch.stack([~torch.isfinite(t).all() for t in tensors.values()]).any().float()
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            bad = self.accelerator.reduce(bad.to(self.accelerator.device), reduction="sum")
        if not bad.item():
            return
        names = [name for name, t in tensors.items() if not torch.isfinite(t).all()]
        raise NonFiniteWeightsError(
            f"save_model refused to write weights with NaN or inf values: {len(names)} of {len(tensors)} tensors "
            f"(on this process){', e.g. ' + ', '.join(names[:5]) if names else ''}. The run diverged: lower "
            f"learning_rate (now {self.args.learning_rate:g}) and keep nonfinite_action='stop' (the default), which "
            "stops before such a step."
        )

    def _save_checkpoint(self, model, trial) -> None:
        self._flush_task_losses("train")  # the card's task counts up to this step
        if self.output_dir_free():  # never while an upload reads the output dir (HubResilienceMixin)
            self.create_model_card()  # first, so that the checkpoint's push carries the current card (as TRL does)
        with _own_parameter_names(self.accelerator.unwrap_model(self.model)):
            super()._save_checkpoint(model, trial)

    def push_to_hub(self, *args, **kwargs):
        """Upload the model, its card and the run's files (:meth:`reca_hf.hub.HubResilienceMixin.push_to_hub`).
        A LoRA adapter whose base model is only a local path is refused first: it would load nowhere else."""
        check_publishable(self.model)
        return super().push_to_hub(*args, **kwargs)

    def run_record(self, model_name=None, dataset_name=None, tags=None, license=None) -> dict[str, Any]:  # noqa: A002
        """What ``reca_run.json`` records about this run, the one source of its side files and card: the
        architecture, the base model, the views and prompts (``reca``), the LoRA adapter (``lora``, None for a
        full model), the parameter table, and the card's settings and metadata."""
        args = self.args
        names = [dataset_name or args.dataset_name, args.i2t_dataset_name, args.t2i_dataset_name]
        datasets = list(dict.fromkeys(name for name in names if is_hub_id(name)))  # every training dataset, once
        loaded_from = getattr(unwrap_model(self.model), "name_or_path", None) or None
        return {
            "reca_hf_version": __version__,
            "model_name": model_name or Path(self.args.hub_model_id or self.args.output_dir).name,
            "repo_id": self.hub_model_id or self.args.hub_model_id,
            "base_model": known_base_model(self.base_model_id or loaded_from),
            "pipeline_tag": self.adapter.pipeline_tag,
            "architecture": self.adapter.name,
            "generation_target": self.adapter.generation_target.kind,  # names the loss (the loss plot's axis)
            "model_class": type(unwrap_model(self.model)).__name__,
            "reca": self._reca_settings(),
            "settings": self.run_settings(),
            "parameter_table": self.parameter_table,
            "datasets": datasets or None,
            "tags": sorted({*(tags or []), *self._tag_names}),
            "license": license or args.license,
            "eval_results": self.args.eval_results,
            "lora": lora_record(self.model, self.adapter),
            "skipped_rows": dict(self.skipped_rows),
        }

    @property
    def cond_dropout_prob(self) -> float:
        """The prompt dropout this run trains with (``"auto"`` resolved by the architecture adapter)."""
        sampler = getattr(self.data_collator, "sampler", None)
        if sampler is not None:
            return sampler.dropout_prob
        return resolve_dropout(self.adapter, self.args.cond_dropout_prob)

    def _reca_settings(self) -> dict[str, Any]:
        """The run's RecA settings as values: the views, the bottleneck and the prompts."""
        sampler = getattr(self.data_collator, "sampler", None)
        return {
            "condition_resolution": self.views.condition_resolution,
            "generation_resolution": self.views.generation_resolution,
            "condition_bottleneck": self.views.bottleneck,
            "blur_factor": self.views.blur_factor,
            "target_fit": self.views.target_fit,
            "condition_fit": self.views.condition_fit,
            "condition_source": self.views.condition_source,
            "condition_interpolation": self.views.condition_interpolation,
            "prompt_templates": self.args.prompt_templates,
            "num_prompts": len(sampler.prompts) if sampler else None,
            "null_prompt": self.adapter.null_prompt,
            "cond_dropout_prob": self.cond_dropout_prob,
        }

    def run_settings(self) -> dict[str, Any]:
        """The settings that define this run, as the model card and logs show them."""
        args, views = self.args, self.views
        sampler = getattr(self.data_collator, "sampler", None)
        trainable = sum(c["trainable"] for c in self.parameter_table.values())
        settings = {
            "architecture adapter": self.adapter.name,
            "condition resolution": views.condition_resolution,
            "condition bottleneck": views.bottleneck
            + (f" (factor {views.blur_factor})" if views.bottleneck == "blur" else ""),
            "generation resolution": views.generation_resolution,
            "view fits": f"target {views.target_fit}, condition {views.condition_fit}",
            "condition source": views.condition_resize,
            "prompt templates": len(sampler.prompts) if sampler else args.prompt_templates,
            "prompt dropout": self.cond_dropout_prob,
            "null prompt": _null_prompt_text(self.adapter.null_prompt),
            "freeze": f"{args.freeze} ({trainable:,} trainable parameters)",
            "task mix": self._task_mix_summary(),
            "steps": self.state.global_step,
            "effective batch size": args.per_device_train_batch_size
            * args.gradient_accumulation_steps
            * max(1, args.world_size),
            "learning rate": args.learning_rate,
            "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
            "hardware": _hardware(),
        }
        totals = self._totals()
        elapsed = totals.elapsed()
        if elapsed is not None:
            settings["wall time"] = f"{elapsed:.0f} s"
        if totals.nonfinite_skipped_steps:
            settings["non-finite steps skipped"] = totals.nonfinite_skipped_steps
        if args.bad_image_policy == "skip":
            settings["bad images skipped"] = self.skipped_summary() or "none"
        grid = next((c for c in self.callback_handler.callbacks if isinstance(c, ReconstructionGridCallback)), None)
        if grid is not None and grid.seconds:
            seconds = sum(grid.seconds.values())
            settings["reconstruction grid"] = f"{len(grid.images)} images, {len(grid.seconds)} grids, {seconds:.1f} s"
        return settings

    def _task_mix_summary(self) -> str:
        """Each task's share of the training samples and how many it has seen, e.g. 'reconstruction 50% (1,024
        samples), image_to_text 50% (1,024 samples)'."""
        total = sum(self.task_ratios.values()) or 1.0
        return ", ".join(
            f"{task} {share / total:.0%} ({self.task_counts[task]:,} samples)"
            for task, share in self.task_ratios.items()
            if share > 0
        )

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, tags=None, **kwargs):
        """Write README.md (the model card), training_loss.png and reca_run.json (what the card is rendered from)
        into the output dir. ``license`` may be given as a keyword."""
        self._write_run_card(
            self.args.output_dir, self.run_record(model_name, dataset_name, tags, kwargs.get("license"))
        )

    def _write_run_card(self, folder, run: dict[str, Any]) -> None:
        if self.is_world_process_zero():
            write_run_card(folder, run, self.state.log_history)


@contextlib.contextmanager
def _plain_config_tolerated(model: torch.nn.Module):
    """Let a plain ``torch.nn.Module`` whose ``config`` is not a transformers config train: ``Trainer.train``
    aligns the tokenizer's special tokens into any ``model.config`` and needs ``get_text_config()`` for that,
    which such a config (a dataclass, say) does not have and has no use for."""
    import transformers.trainer

    config = getattr(unwrap_model(model), "config", None)
    if config is None or hasattr(config, "get_text_config"):
        yield
        return
    align = transformers.trainer.align_special_tokens
    transformers.trainer.align_special_tokens = lambda model, processing_class: None
    try:
        yield
    finally:
        transformers.trainer.align_special_tokens = align


def download_checkpoint(repo_id: str, folder: str | Path, token: str | None = None, revision: str | None = None) -> str:
    """Download the checkpoint a run pushed to ``repo_id`` (``last-checkpoint/``, else its newest
    ``checkpoint-N/``) into ``folder``; returns the checkpoint folder to resume from."""
    from huggingface_hub import HfApi, snapshot_download

    files = HfApi(token=token).list_repo_files(repo_id, revision=revision)
    folders = {name.split("/", 1)[0] for name in files if "/" in name}
    if "last-checkpoint" in folders:
        name = "last-checkpoint"
    else:
        steps = [f for f in folders if re.fullmatch(r"checkpoint-\d+", f)]
        if not steps:
            raise ValueError(
                f"resume_from_hub={repo_id!r}: the repo holds no last-checkpoint/ or checkpoint-N/ folder. Runs push "
                "one with hub_strategy='checkpoint' (or 'all_checkpoints') and a save_strategy."
            )
        name = max(steps, key=lambda f: int(f.rsplit("-", 1)[1]))
    snapshot_download(repo_id, revision=revision, token=token, local_dir=folder, allow_patterns=[f"{name}/*"])
    checkpoint = Path(folder) / name
    logger.info("Resuming from %s/%s, downloaded into %s", repo_id, name, checkpoint)
    return str(checkpoint)


@contextlib.contextmanager
def _own_parameter_names(model):
    """Inside the block, ``model.save_pretrained`` writes the model's own parameter names.

    By default transformers writes some architectures (Emu3) under their original checkpoints' names, which the
    Trainer's resume, a plain ``load_state_dict``, does not map back: a resumed run would silently start from the
    base weights. A checkpoint exists to be resumed, so it keeps the names resuming reads (``from_pretrained``
    loads either)."""
    if not isinstance(model, PreTrainedModel):  # a PEFT model saves its adapter under PEFT's names
        yield
        return
    model.save_pretrained = functools.partial(type(model).save_pretrained, model, save_original_format=False)
    try:
        yield
    finally:
        del model.save_pretrained


def _has_rows(dataset) -> bool:
    """A dataset with a length and at least one row (iterable datasets have no rows to pick)."""
    return dataset is not None and hasattr(dataset, "__len__") and len(dataset) > 0


def processor_of(model) -> Any:
    """The processor of a model instance, loaded from where the model was (``config._name_or_path``); a model
    built in code has none to load, which is an error naming the fix."""
    import transformers

    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if name and (Path(name).expanduser().is_dir() or is_hub_id(name)):
        try:
            return transformers.AutoProcessor.from_pretrained(name)
        except (OSError, ValueError) as error:
            problem = f"loading its processor from {name!r} failed ({type(error).__name__}: {error})"
    else:
        problem = "the model was not loaded from a folder or a Hub id, so there is no processor to load"
    raise ValueError(
        f"processing_class=None: {problem}. Pass the model's processor: RecATrainer(model, ..., "
        "processing_class=AutoProcessor.from_pretrained(...)) (for tiny_umm models, the processor it returns)."
    )


def follow_transformers_logging(log_level: str = "passive") -> None:
    """Make reca_hf's loggers log where transformers' do, and ``log_level`` set reca_hf's level with
    transformers' (``"passive"`` changes no level), so that ``--log_level info`` shows reca_hf's INFO too."""
    from transformers.utils import logging as hf_logging

    library = logging.getLogger("reca_hf")
    if log_level != "passive":  # "passive" leaves every level as the user (or a test harness) set it
        hf_logging.set_verbosity(hf_logging.log_levels[log_level])
        library.setLevel(hf_logging.log_levels[log_level])
    for handler in hf_logging.get_logger("transformers").handlers:
        if handler not in library.handlers:
            library.addHandler(handler)


def _as_reca_config(args, model_id: str) -> RecAConfig:
    if args is None:
        return RecAConfig(output_dir=f"{str(model_id).rstrip('/').split('/')[-1]}-RecA")
    if isinstance(args, RecAConfig):
        return args
    if isinstance(args, TrainingArguments):
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
        return RecAConfig(**values)  # getattr keeps hub_token, which to_dict() would hide
    raise TypeError(f"args must be a RecAConfig or TrainingArguments, got {type(args).__name__}")


def _null_prompt_text(null_prompt: str | None) -> str:
    """What a dropped prompt becomes, as the card says it."""
    return "none: a dropped prompt leaves the instruction out" if null_prompt is None else repr(null_prompt)


def _read_streams_in_every_process(args: RecAConfig) -> None:
    """Turn off accelerate's batch dispatching, its default for iterable datasets: it slices every tensor of a
    batch, those of the nested task batches included, to the size of the first one it finds, which drops rows
    of a mixed batch. Each process then reads the stream and keeps its own share of each batch."""
    config = args.accelerator_config
    if config.dispatch_batches:
        raise ValueError(
            "accelerator_config.dispatch_batches=True: accelerate would cut RecA's mixed-task batches to the size of "
            "their first tensor, dropping rows of the other tasks; set dispatch_batches to false (or leave it unset)"
        )
    config.dispatch_batches = False


def _hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return "CPU"
