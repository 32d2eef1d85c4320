"""`RecATrainer`: a `transformers.Trainer` that trains a unified model with RecA."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from .adapters import get_adapter, unwrap_model
from .callbacks import GRID_FILE, PromptEpochCallback, ReconstructionGridCallback
from .cards import PAPER_ID, PAPER_TITLE, render_model_card
from .collator import INDEX_KEY, RecACollator
from .config import RecAConfig
from .freeze import apply_freeze, format_table, parameter_table
from .loading import load_model_and_processor

logger = logging.getLogger(__name__)

FREEZE_TABLE_FILE = "reca_parameters.json"


class IndexedDataset(Dataset):
    """Adds each row's index under ``__reca_index__``, from which the collator draws its instruction."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[index], INDEX_KEY: index}


@contextlib.contextmanager
def _forward_as(module: torch.nn.Module, function):
    """Temporarily make ``module``'s forward compute the RecA loss.

    Calling the (possibly DDP / FSDP / DeepSpeed wrapped) training model then runs the loss inside the
    wrapper's own forward, which is what gradient synchronisation hooks onto.
    """
    previous = module.__dict__.get("forward")
    module.forward = function
    try:
        yield
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous


class RecATrainer(Trainer):
    """Trainer for RecA post-training of unified multimodal models.

    Args:
        model: a model instance, or a hub id / local folder loaded with `from_pretrained` (the processor
            is loaded from the same place unless `processing_class` is given).
        args: a [`RecAConfig`]; `None` gives the defaults, a plain `TrainingArguments` is converted.
        data_collator: `None` builds a [`RecACollator`] from the adapter, the processor and `args`.
        train_dataset, eval_dataset: datasets whose `args.image_column` holds images.
        processing_class: the model's processor (tokenizer and image processor).
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
        **kwargs,
    ):
        if isinstance(model, str):
            model_id = model
            model, loaded_processor = load_model_and_processor(model, getattr(args, "model_dtype", "float32"))
            processing_class = processing_class if processing_class is not None else loaded_processor
        else:
            model_id = getattr(model.config, "_name_or_path", None) or model.config.model_type
        args = _as_reca_config(args, model_id)
        self.adapter = get_adapter(model, processing_class)
        self.base_model_id = model_id
        if data_collator is None:
            data_collator = RecACollator(
                self.adapter,
                condition_resolution=args.condition_resolution,
                generation_resolution=args.generation_resolution,
                condition_bottleneck=args.condition_bottleneck,
                blur_factor=args.blur_factor,
                prompts=args.prompt_templates,
                cond_dropout_prob=args.cond_dropout_prob,
                image_column=args.image_column,
                seed=args.seed,
            )
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            _check_image_column(dataset, args.image_column, name)
        apply_freeze(model, self.adapter, args.freeze)
        self.parameter_table = parameter_table(model, self.adapter)
        if self.adapter.parameter_sharing == "shared":
            logger.warning(
                "%s shares one language model between understanding and generation, and this run trains it on "
                "reconstruction only. The RecA guide mixes image-to-text data into such runs so that "
                "understanding does not degrade and the representation does not collapse; image-to-text "
                "mixing is not in reca_hf yet, so keep runs short and check understanding afterwards.",
                self.adapter.name,
            )
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            **kwargs,
        )
        # Our loss is a mean over the batch: let the Trainer divide by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._train_start_time: float | None = None
        if isinstance(data_collator, RecACollator):
            self.add_callback(PromptEpochCallback(data_collator))
            self._add_grid_callback(data_collator, train_dataset)
        if self.is_world_process_zero():
            print(format_table(self.parameter_table, f"RecA parameters ({self.adapter.name}, freeze={args.freeze!r})"))

    def _add_grid_callback(self, collator: RecACollator, train_dataset) -> None:
        count = min(self.args.num_reconstruction_images, len(train_dataset) if train_dataset is not None else 0)
        if count == 0:
            return
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            logger.info("Reconstruction grid skipped: sharded models cannot generate on one rank alone.")
            return
        images = [train_dataset[i][self.args.image_column] for i in range(count)]
        self.add_callback(
            ReconstructionGridCallback(
                self.adapter,
                collator.views,
                images,
                seed=self.args.seed,
                **(self.args.reconstruction_kwargs or {}),
            )
        )

    # ---- data ----

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = [self.args.image_column, INDEX_KEY]

    def _get_dataloader(self, dataset, *args, **kwargs):
        if not isinstance(dataset, torch.utils.data.IterableDataset) and not isinstance(dataset, IndexedDataset):
            dataset = IndexedDataset(dataset)
        return super()._get_dataloader(dataset, *args, **kwargs)

    # ---- loss ----

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = {key: value for key, value in inputs.items() if isinstance(value, torch.Tensor)}
        base = unwrap_model(model)
        with _forward_as(base, lambda **b: self.adapter.loss(base, b)), self.accelerator.autocast():
            loss = model(**batch)
        mode = "train" if model.training else "eval"
        self._metrics[mode]["reconstruction_loss"].append(
            self.accelerator.gather_for_metrics(loss.detach()).mean().item()
        )
        return (loss, {"loss": loss}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {name: sum(values) / len(values) for name, values in self._metrics[mode].items() if values}
        if mode == "eval":
            metrics = {f"eval_{name}": value for name, value in metrics.items()}
        logs.update(metrics)  # in place, so evaluate() returns these metrics too
        super().log(logs, start_time)
        self._metrics[mode].clear()

    def train(self, *args, **kwargs):
        self._train_start_time = time.time()
        return super().train(*args, **kwargs)

    # ---- outputs ----

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            path = Path(output_dir or self.args.output_dir) / FREEZE_TABLE_FILE
            path.write_text(json.dumps(self.parameter_table, indent=2) + "\n")

    def run_settings(self) -> dict[str, Any]:
        """The settings that define this run, for the model card and logs."""
        args = self.args
        views = self.data_collator.views if isinstance(self.data_collator, RecACollator) else None
        sampler = getattr(self.data_collator, "sampler", None)
        trainable = sum(c["trainable"] for c in self.parameter_table.values())
        settings = {
            "architecture adapter": self.adapter.name,
            "condition resolution": views.condition_resolution if views else args.condition_resolution,
            "condition bottleneck": args.condition_bottleneck
            + (f" (factor {args.blur_factor})" if args.condition_bottleneck == "blur" else ""),
            "generation resolution": views.generation_resolution if views else args.generation_resolution,
            "prompt templates": len(sampler.prompts) if sampler else args.prompt_templates,
            "prompt dropout": args.cond_dropout_prob,
            "freeze": f"{args.freeze} ({trainable:,} trainable parameters)",
            "steps": self.state.global_step,
            "effective batch size": args.per_device_train_batch_size
            * args.gradient_accumulation_steps
            * max(1, args.world_size),
            "learning rate": args.learning_rate,
            "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
            "hardware": _hardware(),
        }
        if self._train_start_time is not None:
            settings["wall time"] = f"{time.time() - self._train_start_time:.0f} s"
        return settings

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, tags=None, **kwargs):
        """Write README.md (the model card) into the output dir."""
        if not self.is_world_process_zero():
            return
        output_dir = Path(self.args.output_dir)
        model_name = model_name or Path(self.args.hub_model_id or output_dir).name
        dataset_name = dataset_name or self.args.dataset_name
        card = render_model_card(
            model_name=model_name,
            base_model=self.base_model_id,
            architecture=self.adapter.name,
            model_class=type(unwrap_model(self.model)).__name__,
            settings=self.run_settings(),
            tags=[*(tags or [])],
            repo_id=self.args.hub_model_id,
            datasets=[dataset_name] if dataset_name and "/" in dataset_name else None,
            parameter_table=self.parameter_table,
            grid_file=GRID_FILE if (output_dir / GRID_FILE).is_file() else None,
        )
        output_dir.mkdir(parents=True, exist_ok=True)
        card.save(output_dir / "README.md")


def _as_reca_config(args, model_id: str) -> RecAConfig:
    if args is None:
        return RecAConfig(output_dir=f"{str(model_id).rstrip('/').split('/')[-1]}-RecA")
    if isinstance(args, RecAConfig):
        return args
    if isinstance(args, TrainingArguments):
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
        return RecAConfig(**values)  # getattr keeps hub_token, which to_dict() would hide
    raise TypeError(f"args must be a RecAConfig or TrainingArguments, got {type(args).__name__}")


def _check_image_column(dataset, column: str, name: str) -> None:
    columns = getattr(dataset, "column_names", None)
    if isinstance(columns, list) and column not in columns:
        raise ValueError(
            f"{name} has no column image_column={column!r} (columns: {columns}); set image_column to the column "
            "that holds the images"
        )


def _hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return "CPU"
