"""`RecATrainer`: a `transformers.Trainer` that trains a unified model with RecA.

The trainer wires; each service has its room and is composed here: the non-finite guard (:mod:`reca_hf.nonfinite`),
per-task metering (:mod:`reca_hf.metering`), the run record and card on disk (:mod:`reca_hf.run_record`), resume
(:mod:`reca_hf.resume`), the frozen-tower cache (:mod:`reca_hf.frozen_cache`), the Hub's resilience
(:mod:`reca_hf.hub`) and the callbacks, which build themselves (:mod:`reca_hf.callbacks`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import time

import torch
from transformers import Trainer, TrainingArguments

from .adapters import adapter_class_for, get_adapter, unwrap_model
from .buckets import AspectGroupedSampler, aspect_ratios
from .callbacks import CollapseDetector, PromptEpochCallback, ReconstructionGridCallback, StreamPosition
from .cards import PAPER_ID, PAPER_TITLE
from .checks import bf16_without_accelerator, check_run, check_understanding_data
from .collator import SKIPPED_KEY, RecACollator
from .config import RecAConfig
from .data import ROW_KEY, SOURCE_KEY
from .factory import load_model_and_processor, processor_of
from .freeze import apply_freeze, format_table, matches, parameter_table
from .frozen_cache import FrozenCacheMixin, FrozenFeatureCache
from .hub import HubPushError, HubResilienceMixin
from .images import ViewSpec
from .lora import check_publishable, prepare_peft_model
from .metering import TaskMeteringMixin
from .nonfinite import NonFiniteGuardMixin, NonFiniteLossError, NonFiniteWeightsError
from .resume import ResumeMixin
from .run_record import FREEZE_TABLE_FILE, RunRecordMixin
from .sharding import forward_as as _forward_as
from .sharding import forward_only
from .tasks import (
    IMAGE_TO_TEXT,
    INDEX_KEY,
    RECONSTRUCTION,
    TASK_KEY,
    TEXT_TO_IMAGE,
    IndexedDataset,
    indexed,
    prepare_datasets,
)
from .threads import apply_cpu_threads

logger = logging.getLogger(__name__)

__all__ = ["FREEZE_TABLE_FILE", "HubPushError", "IndexedDataset", "NonFiniteLossError", "NonFiniteWeightsError",
           "RecATrainer"]  # fmt: skip


class RecATrainer(
    NonFiniteGuardMixin,
    TaskMeteringMixin,
    RunRecordMixin,
    ResumeMixin,
    FrozenCacheMixin,
    HubResilienceMixin,
    Trainer,
):
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

    training_in_progress = False  # True inside train(): the cards of its checkpoints say the run had not ended

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
        # What the config cannot check alone (the same checks as `reca validate`), then the run's views, resolved
        # once and handed to the collator, the grid, the probe, the frozen cache and the run record (a RecACollator
        # of the user's brings its own).
        self.views: ViewSpec = check_run(args, self.adapter)
        self.base_model_id = args.base_model_id or model_id
        if data_collator is None:
            data_collator = RecACollator.from_config(self.adapter, args, views=self.views)
        is_reca_collator = isinstance(data_collator, RecACollator)
        if is_reca_collator:
            self.views = data_collator.views
        data = prepare_datasets(self.adapter, args, train_dataset, eval_dataset, i2t_dataset, t2i_dataset)
        self.task_ratios, self.task_weights = data.task_ratios, data.task_weights
        if args.ddp_find_unused_parameters is None and sum(r > 0 for r in self.task_ratios.values()) > 1:
            # A micro-batch may hold one task's rows only, leaving the other tasks' modules without a gradient, which
            # DDP refuses unless it looks for unused parameters (transformers turns that off under checkpointing).
            args.ddp_find_unused_parameters = True
        self._train_source = data.sources.get("train")  # the rows the frozen-tower cache is keyed by
        self.frozen_cache: FrozenFeatureCache | None = None
        if is_reca_collator:  # where bad_image_policy="skip" finds replacement rows
            data_collator.add_sources(data.sources)
        if isinstance(data.train_dataset, torch.utils.data.IterableDataset):
            _read_streams_in_every_process(args)
        apply_freeze(model, self.adapter, args.freeze)
        model = prepare_peft_model(model, self.adapter, args, peft_config, model_id)
        self.parameter_table = parameter_table(model, self.adapter)
        check_understanding_data(self.adapter, model, self.task_ratios, args.require_understanding_data)
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
        if self.args.dataloader_pin_memory and self.args.device.type == "cpu":
            self.args.dataloader_pin_memory = False  # pinning only speeds copies to an accelerator; torch warns on CPU
        # Our loss is a mean over the batch: let the Trainer divide by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self._init_metering()
        self._init_nonfinite_guard()
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
        """The reconstruction grid and validation samples (:meth:`ReconstructionGridCallback.for_run`), with a
        :class:`RecACollator` and not under FSDP1."""
        if not isinstance(self.data_collator, RecACollator):
            return
        trackers = self.callback_handler.callbacks
        grid = ReconstructionGridCallback.for_run(self.args, self.adapter, self.views, train_dataset, eval_dataset,
                                                  trackers=trackers)  # fmt: skip
        if grid is None:
            return
        if self.is_fsdp_enabled and not getattr(self.accelerator, "is_fsdp2", False):
            logger.warning(
                "Reconstruction grid off: under FSDP1 (fsdp_version 1) a wrapped block's weights are whole only inside "
                "its own forward, and generation reads some elsewhere (e.g. a VQ codebook lookup). Use FSDP2 "
                "(fsdp_version 2, as the shipped fsdp2 config), where every rank draws the grid together."
            )
            return
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
        detector = CollapseDetector.for_run(self.args, self.adapter, self.views, eval_dataset)
        if detector is not None:
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

    # ---- data ----

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = [*dict.fromkeys(self.args.image_columns.values()), self.args.caption_column,
                                       INDEX_KEY, TASK_KEY, SOURCE_KEY, ROW_KEY]  # fmt: skip

    def get_decay_parameter_names(self, model) -> list[str]:
        """transformers' rule (no decay on biases and norm weights), less the adapter's ``no_weight_decay`` modules."""
        names = super().get_decay_parameter_names(model)
        if not self.adapter.no_weight_decay:
            return names
        return [n for n in names if not matches(n.removeprefix("base_model.model."), self.adapter.no_weight_decay)]

    def _get_train_sampler(self, train_dataset=None):
        """Under ``group_by_aspect``, batches of similar aspect ratio (:class:`~reca_hf.buckets.AspectGroupedSampler`)."""
        if not self.args.group_by_aspect:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            raise ValueError(
                "group_by_aspect: true needs a map-style train dataset (it reads every image's size first); a streamed "
                "one is read in its own order: set group_by_aspect or dataset_streaming to false"
            )
        aspects = aspect_ratios(dataset, self.args.image_columns, self.args.image_column)
        return AspectGroupedSampler(aspects, self.args.train_batch_size, seed=self.args.seed)

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
        mode = "train" if model.training else "eval"
        # Losses that are means over tokens, made means over every process's tokens (None: one process, or not so)
        shares = {IMAGE_TO_TEXT: self._caption_token_share(batches, mode),
                  RECONSTRUCTION: self._loss_token_share(batches, mode)}  # fmt: skip

        def forward(**batches):  # one forward call of the (possibly wrapped) model computes every task's loss
            for task, batch in batches.items():
                task_losses[task] = self._task_loss(base, task, batch)
                flops = self.flop_counter.pop()  # this task's forward and the backward it will cause
                self.task_flos[task] += flops
                self._step_flos += flops
            trained = dict(task_losses)
            for task, shared in shares.items():
                if shared is not None and task in task_losses:
                    share, factor = shared
                    task_losses[task] = task_losses[task] * share  # what is logged
                    trained[task] = task_losses[task] * factor
            return self._combine(trained, batches)

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

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = self._logged_metrics(mode)
        if mode == "train" and ("loss" in logs or "train_loss" in logs):  # a regular log, or the end-of-training one
            if "loss" in logs:
                metrics.update(self._throughput())
            if self.collapse_detector is not None:
                metrics.update(self.collapse_detector.pop_metrics())
            if self._totals().nonfinite_skipped_steps:
                metrics["nonfinite_skipped_steps"] = self._totals().nonfinite_skipped_steps
        logs.update(metrics)  # in place, so evaluate() returns these metrics too
        super().log(logs, start_time)

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
        self.training_in_progress = True  # cards written meanwhile (checkpoints) say the run had not ended
        try:
            with _plain_config_tolerated(self.model):
                output = super().train(*args, **kwargs)
        finally:
            self.training_in_progress = False
        if self.skipped_rows:
            logger.warning(
                "bad_image_policy: skip: %d bad image(s) were skipped and replaced in this run (%s); the warnings "
                "above name each row and file. Run reca validate --check-images to list them all.",
                sum(self.skipped_rows.values()),
                self.skipped_summary(),
            )
        return output

    def push_to_hub(self, *args, **kwargs):
        """Upload the model, its card and the run's files (:meth:`reca_hf.hub.HubResilienceMixin.push_to_hub`).
        A LoRA adapter whose base model is only a local path is refused first: it would load nowhere else."""
        check_publishable(self.model)
        return super().push_to_hub(*args, **kwargs)


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


LOG_HANDLER = "reca_hf"  # the name of the stderr handler reca_hf's log lines go through


class _StderrHandler(logging.StreamHandler):
    """A stream handler writing to ``sys.stderr`` as it is when a line is logged (so a redirection made after
    set-up, a notebook's or a test's capture, is followed)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; the current sys.stderr is always used
        pass


def follow_transformers_logging(log_level: str = "passive") -> None:
    """Give reca_hf's loggers a stderr handler of their own ("[reca_hf] ..."), and ``log_level`` set reca_hf's level with
    transformers' (``"passive"`` changes no level), so that ``--log_level info`` shows reca_hf's INFO too."""
    from transformers.utils import logging as hf_logging

    library = logging.getLogger("reca_hf")
    if log_level != "passive":  # "passive" leaves every level as the user (or a test harness) set it
        hf_logging.set_verbosity(hf_logging.log_levels[log_level])
        library.setLevel(hf_logging.log_levels[log_level])
    if not any(handler.get_name() == LOG_HANDLER for handler in library.handlers):
        handler = _StderrHandler()  # stderr, as transformers' own, but under reca_hf's name
        handler.set_name(LOG_HANDLER)
        handler.setFormatter(logging.Formatter("[reca_hf] %(message)s"))
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
