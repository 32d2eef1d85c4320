"""The run record on disk: ``reca_run.json`` (what a run was: architecture, base model, views, prompts, LoRA,
parameters, settings), and the files written from it at every save: the model card, ``reca_parameters.json``,
``reca_adapter.json`` for a LoRA adapter, ``config.json`` for a plain module. Pushing them is :mod:`reca_hf.hub`'s.

A mixin of :class:`~reca_hf.RecATrainer`, which provides ``adapter``, ``views``, ``parameter_table``,
``base_model_id``, ``task_ratios`` and the metering (:mod:`reca_hf.metering`).
"""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from . import __version__
from .adapters.helpers import unwrap_model
from .callbacks import ReconstructionGridCallback
from .cards import known_base_model
from .collator import resolve_dropout
from .hub import write_run_card
from .loading import is_hub_id, save_module_config
from .lora import lora_record, peft_base_config_note, write_reca_adapter_file

FREEZE_TABLE_FILE = "reca_parameters.json"


class RunRecordMixin:
    """``save_model`` and checkpoints write the run record and its side files; :meth:`run_record` is their source."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        self._check_finite_weights()
        with peft_base_config_note(shown=getattr(self, "_saved_before", False)):  # PEFT's note at the first save only
            super().save_model(output_dir, _internal_call)
        self._saved_before = True
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

    def _save_checkpoint(self, model, trial) -> None:
        self._flush_task_losses("train")  # the card's task counts up to this step
        if self.output_dir_free():  # never while an upload reads the output dir (HubResilienceMixin)
            self.create_model_card()  # first, so that the checkpoint's push carries the current card (as TRL does)
        with _own_parameter_names(self.accelerator.unwrap_model(self.model)):
            super()._save_checkpoint(model, trial)

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
            "output_dir": str(self.args.output_dir),  # the usage snippet of a card not pushed yet loads from here
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
            "collapse_probe": self.collapse_detector.describe() if self.collapse_detector is not None else None,
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
            "seed": self.args.seed,
            "reconstruction_kwargs": dict(self.args.reconstruction_kwargs or {}),  # what the grid generated with
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
            "steps": self._steps_text(),
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
        settings.update(final_losses(self.state.log_history))
        detector = self.collapse_detector
        settings["collapse detector"] = detector.verdict() if detector is not None else "off"
        grid = next((c for c in self.callback_handler.callbacks if isinstance(c, ReconstructionGridCallback)), None)
        if grid is not None and grid.seconds:
            seconds = sum(grid.seconds.values())
            settings["reconstruction grid"] = f"{len(grid.images)} images, {len(grid.seconds)} grids, {seconds:.1f} s"
        return settings

    def _steps_text(self) -> int | str:
        """The optimizer steps trained; while training (a checkpoint's card), of how many, and that the run had
        not ended, so that the card of a run that died later does not read as a finished run."""
        step = self.state.global_step
        if not self.training_in_progress:
            return step
        return f"{step} of {self.state.max_steps} (written during training, at a checkpoint; the run had not ended)"

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


def final_losses(log_history: list[dict[str, Any]]) -> dict[str, str]:
    """``{"final training loss": "reconstruction 0.41, image_to_text 2.03 (step 300)", "final eval loss": ...}``:
    the last logged value of each task's loss, training and eval, with the step it was logged at."""
    lines = {}
    for label, prefix in (("final training loss", ""), ("final eval loss", "eval_")):
        last: dict[str, tuple[int, float]] = {}
        for entry in log_history:
            for key, value in entry.items():
                if key.startswith(prefix) and key.endswith("_loss") and key not in (f"{prefix}loss", "train_loss"):
                    task = key[len(prefix) : -len("_loss")]
                    if prefix or not key.startswith("eval_"):
                        last[task] = (entry.get("step", 0), float(value))
        if last:
            step = max(step for step, _ in last.values())
            values = ", ".join(f"{task} {value:.4g}" for task, (_, value) in last.items())
            lines[label] = f"{values} (step {step})"
    return lines


def _null_prompt_text(null_prompt: str | None) -> str:
    """What a dropped prompt becomes, as the card says it."""
    return "none: a dropped prompt leaves the instruction out" if null_prompt is None else repr(null_prompt)


def _hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return "CPU"
