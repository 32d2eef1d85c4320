"""`RecATrainer`: a `transformers.Trainer` that trains a unified model with RecA."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import is_peft_model
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import HubStrategy

from .adapters import get_adapter, unwrap_model
from .callbacks import CollapseDetector, PromptEpochCallback, ReconstructionGridCallback
from .cards import PAPER_ID, PAPER_TITLE
from .collator import RecACollator
from .config import RecAConfig
from .data import ROW_KEY, SOURCE_KEY, as_source, synthetic_shapes
from .freeze import apply_freeze, format_table, parameter_table
from .hub import (
    HubPushError,
    PushTracker,
    checkpoint_step,
    describe_error,
    hub_errors,
    is_unreachable,
    retry_command,
    rotation_keeping,
    write_run_card,
)
from .images import ViewSpec
from .loading import is_hub_id, load_model_and_processor
from .lora import (
    check_publishable,
    leaves_understanding_intact,
    lora_card_data,
    prepare_peft_model,
    save_reca_adapter_config,
)
from .tasks import (
    IMAGE_TO_TEXT,
    INDEX_KEY,
    RECONSTRUCTION,
    TASK_KEY,
    TASKS,
    TEXT_TO_IMAGE,
    EvalTasksDataset,
    MixedTaskDataset,
    caption_column_in,
    resolve_task_ratios,
)

logger = logging.getLogger(__name__)

FREEZE_TABLE_FILE = "reca_parameters.json"
PROBE_SEED = 20250909  # synthetic probe images: a seed no training set of synthetic shapes uses by default


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
        peft_config: a `peft.PeftConfig` to train an adapter instead of the weights; it wins over the
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
        if isinstance(model, str):
            model_id = model
            model, loaded_processor = load_model_and_processor(model, getattr(args, "model_dtype", "float32"))
            processing_class = processing_class if processing_class is not None else loaded_processor
        else:
            model_id = getattr(model.config, "_name_or_path", None) or model.config.model_type
        args = _as_reca_config(args, model_id)
        self.adapter = get_adapter(model, processing_class)
        self.base_model_id = args.base_model_id or model_id
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
                allow_shortcut=args.allow_shortcut,
                caption_column=args.caption_column,
                bad_image_policy=args.bad_image_policy,
                max_image_pixels=args.max_image_pixels,
            )
        else:  # the user's own collator: the shortcut guard still applies to the configured views
            self.adapter.check_shortcut(self._configured_views(args), args.allow_shortcut)
        datasets = {"train_dataset": train_dataset, "eval_dataset": eval_dataset, "i2t_dataset": i2t_dataset,
                    "t2i_dataset": t2i_dataset}  # fmt: skip
        for name, dataset in datasets.items():
            _check_column(dataset, "image_column", args.image_column, name)
        for name in ("i2t_dataset", "t2i_dataset"):
            _check_column(datasets[name], "caption_column", args.caption_column, name)
        # the collator decodes images (errors name dataset, original row and file; bad_image_policy applies)
        sources = {name: as_source(datasets[f"{name}_dataset"], name, args.image_column)
                   for name in ("train", "eval", "i2t", "t2i")}  # fmt: skip
        train_dataset, eval_dataset, i2t_dataset, t2i_dataset = sources.values()
        if isinstance(data_collator, RecACollator):
            data_collator.add_sources(sources)
        self.task_ratios, self.task_weights = self._task_mix(args, train_dataset, i2t_dataset, t2i_dataset)
        apply_freeze(model, self.adapter, args.freeze)
        model = prepare_peft_model(model, self.adapter, args, peft_config, model_id)
        self.parameter_table = parameter_table(model, self.adapter)
        self._check_understanding_data(model, args)
        train_data = train_dataset
        if self.task_ratios[IMAGE_TO_TEXT] or self.task_ratios[TEXT_TO_IMAGE]:
            train_data = MixedTaskDataset(
                {RECONSTRUCTION: train_dataset, IMAGE_TO_TEXT: i2t_dataset, TEXT_TO_IMAGE: t2i_dataset},
                self.task_ratios,
                seed=args.seed,
            )
        eval_data = self._eval_tasks(eval_dataset, args)
        self._hub_pushes = PushTracker()  # background pushes: failures surfaced, unpushed checkpoints kept
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_data,
            eval_dataset=eval_data,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            **kwargs,
        )
        # Our loss is a mean over the batch: let the Trainer divide by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}  # name -> [(sum, count)]
        self.task_counts = dict.fromkeys(TASKS, 0)  # training samples seen per task (all processes)
        self._train_start_time: float | None = None
        if isinstance(data_collator, RecACollator):
            self.add_callback(PromptEpochCallback(data_collator, train_data))
            self._add_grid_callback(data_collator, train_dataset)
        self.collapse_detector = self._collapse_detector(data_collator, eval_dataset)
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

    # ---- the task mix ----

    def _task_mix(self, args, train_dataset, i2t_dataset, t2i_dataset):
        given = {RECONSTRUCTION: train_dataset is not None, IMAGE_TO_TEXT: i2t_dataset is not None,
                 TEXT_TO_IMAGE: t2i_dataset is not None}  # fmt: skip
        if not any(given.values()):  # evaluation only
            ratios = {task: float(task == RECONSTRUCTION) for task in TASKS}
        else:
            ratios = resolve_task_ratios(args.task_ratios, given)
        for task, share in ratios.items():
            if share and not self.adapter.supports(task):
                raise ValueError(
                    f"task_ratios gives {task} a share, but the {self.adapter.name} adapter does not implement "
                    f"{task}; set task_ratios[{task!r}] to 0"
                )
        for task, dataset_given in given.items():
            if dataset_given and not ratios[task] and task != RECONSTRUCTION:
                logger.warning("A dataset was given for %s but task_ratios gives it no share: it is not used.", task)
        weights = {task: float((args.task_weights or {}).get(task, 1.0)) for task in TASKS}
        return ratios, weights

    def _check_understanding_data(self, model, args) -> None:
        """The guide's third rule: a shared LLM trained without image-to-text data loses understanding."""
        if self.adapter.parameter_sharing != "shared":
            return
        if leaves_understanding_intact(model, self.adapter):  # e.g. a generation-only LoRA
            if self.task_ratios[IMAGE_TO_TEXT] > 0:
                logger.warning(
                    "This run trains a generation-only adapter, which leaves understanding exactly intact; its "
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

    def _eval_tasks(self, eval_dataset, args):
        """Evaluate image-to-text too when the eval images have captions, starting at step 0."""
        columns = getattr(eval_dataset, "column_names", None)
        if not isinstance(columns, list) or caption_column_in(columns, args.caption_column) is None:
            return eval_dataset
        if not self.adapter.supports(IMAGE_TO_TEXT):
            return eval_dataset
        if not args.eval_on_start:
            logger.info("The eval set has captions: evaluating image-to-text at step 0 too (eval_on_start=True).")
            args.eval_on_start = True
        return EvalTasksDataset(eval_dataset)

    def _configured_views(self, args) -> ViewSpec:
        condition, generation = self.adapter.resolve_resolutions(args.condition_resolution, args.generation_resolution)
        return ViewSpec(
            condition, generation, args.condition_bottleneck, args.blur_factor, self.adapter.background_color
        )

    def _collapse_detector(self, collator, eval_dataset) -> CollapseDetector | None:
        """The user's CollapseDetector if they passed one, else the default one (None when it cannot run)."""
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, CollapseDetector):
                return callback
        args = self.args
        if args.collapse_action == "off" or args.collapse_probe_images < 2:
            return None
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            logger.info("Collapse detector off: the swap probe cannot run on a sharded model.")
            return None
        views = collator.views if isinstance(collator, RecACollator) else self._configured_views(args)
        count = args.collapse_probe_images
        if eval_dataset is not None and not isinstance(eval_dataset, torch.utils.data.IterableDataset):
            images = [eval_dataset[i][args.image_column] for i in range(min(count, len(eval_dataset)))]
        else:
            images = []
        if len(images) < 2:  # no held-out images: shapes this model has never seen
            images = synthetic_shapes(count, size=views.generation_resolution, seed=PROBE_SEED)["image"]
        detector = CollapseDetector(
            self.adapter, views, images, action=args.collapse_action, probe_steps=args.collapse_probe_steps
        )
        self.add_callback(detector)
        return detector

    # ---- data ----

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = [self.args.image_column, self.args.caption_column, INDEX_KEY, TASK_KEY,
                                       SOURCE_KEY, ROW_KEY]  # fmt: skip

    def _get_dataloader(self, dataset, *args, **kwargs):
        if not isinstance(dataset, torch.utils.data.IterableDataset) and not getattr(dataset, "reca_indexed", False):
            dataset = IndexedDataset(dataset)
        return super()._get_dataloader(dataset, *args, **kwargs)

    # ---- loss ----

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batches = {RECONSTRUCTION: {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}}
        batches.update({task: inputs[task] for task in (IMAGE_TO_TEXT, TEXT_TO_IMAGE) if task in inputs})
        batches = {task: batch for task, batch in batches.items() if batch}
        base = unwrap_model(model)
        task_losses: dict[str, torch.Tensor] = {}

        def forward(**batches):  # one forward call of the (possibly wrapped) model computes every task's loss
            losses = {task: self._task_loss(base, task, batch) for task, batch in batches.items()}
            task_losses.update(losses)
            return self._combine(losses, batches)

        with _forward_as(base, forward), self.accelerator.autocast():
            loss = model(**batches)
        self._record_task_losses("train" if model.training else "eval", task_losses, batches)
        return (loss, {"loss": loss}) if return_outputs else loss

    def _task_loss(self, model, task: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if task == IMAGE_TO_TEXT:
            return self.adapter.image_to_text_loss(model, batch)
        if task == TEXT_TO_IMAGE:
            return self.adapter.text_to_image_loss(model, batch)
        return self.adapter.loss(model, batch)

    def _combine(self, losses: dict[str, torch.Tensor], batches) -> torch.Tensor:
        """Per-sample weighted mean of the task losses: each sample counts once, times its task's weight."""
        sizes = {task: _batch_size(batches[task]) for task in losses}
        total = sum(sizes.values())
        return sum(self.task_weights[task] * sizes[task] / total * loss for task, loss in losses.items())

    def _record_task_losses(self, mode: str, losses: dict[str, torch.Tensor], batches) -> None:
        # Every process gathers every active task (a zero count when absent), so the collective calls match.
        device = self.accelerator.device
        active = [task for task in TASKS if self.task_ratios[task] > 0 or task in losses]
        if mode == "eval" and isinstance(self.eval_dataset, EvalTasksDataset):
            active = sorted(set(active) | set(self.eval_dataset.tasks), key=TASKS.index)
        for task in active:
            size = _batch_size(batches[task]) if task in losses else 0
            value = losses[task].detach().float() * size if task in losses else torch.zeros((), device=device)
            pair = torch.stack([value.to(device), torch.tensor(float(size), device=device)])
            total, count = self.accelerator.gather(pair[None]).sum(0).tolist()
            if count:
                self._metrics[mode][f"{task}_loss"].append((total, count))
            if mode == "train":
                self.task_counts[task] += int(count)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {
            name: sum(total for total, _ in pairs) / sum(count for _, count in pairs)
            for name, pairs in self._metrics[mode].items()
            if pairs
        }
        if mode == "eval":
            metrics = {f"eval_{name}": value for name, value in metrics.items()}
        elif self.collapse_detector is not None and "loss" in logs:
            metrics.update(self.collapse_detector.pop_metrics())
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
            if is_peft_model(self.model):
                save_reca_adapter_config(path.parent, self.model, self.adapter, self.args, self.data_collator)
            self._write_run_card(path.parent)  # our card over PEFT's; in a checkpoint, before its push

    # ---- the Hub ----

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        try:
            super().init_hf_repo(token=token, private=private)
        except Exception as error:
            if not (self.args.hub_optional and is_unreachable(error)):
                raise
            self.hub_model_id, self.push_in_progress = None, None
            logger.warning(
                "The Hub is unreachable (%s): training goes on without it (hub_optional=True). Creating the repo and "
                "pushing are retried at each checkpoint and at the end; every file stays in %s.",
                type(error).__name__, self.args.output_dir,
            )  # fmt: skip

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return super()._push_from_checkpoint(checkpoint_folder)
        if self.hub_model_id is None:  # the Hub was unreachable at start (hub_optional): try again
            try:
                super().init_hf_repo()
            except Exception as error:
                if not is_unreachable(error):
                    raise
                self._hub_pushes.fail(checkpoint_folder, error, "creating the repo")
                return
        before = {id(job) for job in (self.push_in_progress.jobs if self.push_in_progress else [])}
        super()._push_from_checkpoint(checkpoint_folder)
        jobs = [job for job in (self.push_in_progress.jobs if self.push_in_progress else []) if id(job) not in before]
        if jobs:
            self._hub_pushes.track(checkpoint_folder, jobs)
        elif self.args.hub_strategy == HubStrategy.ALL_CHECKPOINTS:
            # Skipped while an earlier push runs (hub_always_push=False): this folder has its own place in the repo.
            self._hub_pushes.begin(checkpoint_folder)

    def _save_checkpoint(self, model, trial) -> None:
        self.create_model_card()  # first, so that the checkpoint's push carries the current card (as TRL does)
        with rotation_keeping(self._hub_pushes.unpushed_now):  # save_total_limit spares unpushed ones
            super()._save_checkpoint(model, trial)

    def _finish_current_push(self) -> None:
        super()._finish_current_push()
        self._hub_pushes.wait()  # the end of train(): every push's outcome is recorded (and logged) before it returns

    @property
    def hub_push_failures(self) -> int:
        """How many background pushes (and repo creations) have failed in this run so far."""
        return self._hub_pushes.failure_count

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True, token=None,
                    revision=None, private=None, **kwargs):  # fmt: skip
        """Upload the model, its card and the run's files; first wait for the background pushes and retry the
        checkpoints whose push failed. Raises :class:`reca_hf.hub.HubPushError` (naming ``reca push``) when the
        push fails; with ``hub_optional=True`` an unreachable Hub is logged instead and None returned."""
        check_publishable(self.model)  # an adapter whose base is only a local path would load nowhere else
        if not self.is_world_process_zero():
            return super().push_to_hub(commit_message, blocking, token, revision, private, **kwargs)
        self._hub_pushes.wait()
        try:
            if self.hub_model_id is None:
                self.save_model(_internal_call=True)  # and its card: the stock push saves after creating the repo
                super().init_hf_repo(token=token, private=private)
            self._retry_unpushed_checkpoints(token, revision)
            result = super().push_to_hub(commit_message, blocking, token, revision, private, **kwargs)
        except hub_errors() as error:
            return self._final_push_failed(error)
        if blocking:
            self._hub_pushes.settled(self._hub_pushes.unpushed_now())  # the final push supersedes them
        else:
            self._hub_pushes.track(self.args.output_dir, [result], "final push")
        if self.hub_push_failures:
            logger.warning(
                "%d background push(es) to %s failed during training (%s); the final push sent their content.",
                self.hub_push_failures, self.hub_model_id, self._hub_pushes.summary(),
            )  # fmt: skip
        return result

    def _retry_unpushed_checkpoints(self, token: str | None, revision: str | None) -> None:
        """Checkpoint folders have their own place in the repo with hub_strategy 'checkpoint' (the newest, as
        last-checkpoint/) and 'all_checkpoints' (each): upload again what did not get there."""
        from huggingface_hub import HfApi

        strategy = self.args.hub_strategy
        unpushed = [f for f in self._hub_pushes.unpushed_now() if checkpoint_step(f) >= 0 and os.path.isdir(f)]
        unpushed.sort(key=checkpoint_step)
        if not unpushed or strategy not in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            return
        api = HfApi(token=token if token is not None else self.args.hub_token)
        if strategy == HubStrategy.CHECKPOINT:
            unpushed = unpushed[-1:]
        for folder in unpushed:
            name = "last-checkpoint" if strategy == HubStrategy.CHECKPOINT else os.path.basename(folder)
            logger.info("Retrying the push of %s to %s/%s", folder, self.hub_model_id, name)
            api.upload_folder(repo_id=self.hub_model_id, folder_path=folder, path_in_repo=name, revision=revision,
                              commit_message=f"{os.path.basename(folder)} (retried push)")  # fmt: skip
            self._hub_pushes.settled([folder])

    def _final_push_failed(self, error: BaseException):
        output_dir = self.args.output_dir
        kept = self._hub_pushes.failed()
        message = (
            f"The push to the Hub ({self.hub_model_id or self.args.hub_model_id or 'repo not created'}) failed: "
            f"{describe_error(error)}. Nothing is lost: every file "
            f"is in {output_dir}"
            + (f", including {len(kept)} checkpoint folder(s) whose push failed" if kept else "")
            + f". Retry with: {retry_command(output_dir, self.hub_model_id or self.args.hub_model_id)}"
        )
        if self.hub_push_failures:
            message += (
                f" ({self.hub_push_failures} background push(es) failed during training: {self._hub_pushes.summary()})"
            )
        if self.args.hub_optional and is_unreachable(error):
            logger.error("%s (hub_optional=True: not raised)", message)
            return None
        raise HubPushError(message) from error

    # ---- the model card ----

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
            "task mix": self._task_mix_summary(),
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
        self._write_run_card(self.args.output_dir, model_name, dataset_name, tags, kwargs.get("license"))

    def _write_run_card(self, folder, model_name=None, dataset_name=None, tags=None, license=None) -> None:  # noqa: A002
        if not self.is_world_process_zero():
            return
        dataset_name = dataset_name or self.args.dataset_name
        run = {
            "model_name": model_name or Path(self.args.hub_model_id or self.args.output_dir).name,
            "repo_id": self.hub_model_id or self.args.hub_model_id,
            "base_model": self.base_model_id,
            "architecture": self.adapter.name,
            "model_class": type(unwrap_model(self.model)).__name__,
            "settings": self.run_settings(),
            "parameter_table": self.parameter_table,
            "datasets": [dataset_name] if is_hub_id(dataset_name) else None,
            "tags": sorted({*(tags or []), *self._tag_names}),
            "license": license,
            "eval_results": self.args.eval_results,
            "lora": lora_card_data(self.model, self.adapter),
        }
        write_run_card(folder, run, self.state.log_history)


def _as_reca_config(args, model_id: str) -> RecAConfig:
    if args is None:
        return RecAConfig(output_dir=f"{str(model_id).rstrip('/').split('/')[-1]}-RecA")
    if isinstance(args, RecAConfig):
        return args
    if isinstance(args, TrainingArguments):
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
        return RecAConfig(**values)  # getattr keeps hub_token, which to_dict() would hide
    raise TypeError(f"args must be a RecAConfig or TrainingArguments, got {type(args).__name__}")


def _check_column(dataset, field: str, column: str, name: str) -> None:
    """A dataset with column names must hold the image column, or a caption column (with its fallbacks)."""
    columns = getattr(dataset, "column_names", None)
    if not isinstance(columns, list):
        return
    if field == "caption_column":
        present = caption_column_in(columns, column) is not None
    else:
        present = column in columns
    if not present:
        what = "images" if field == "image_column" else "captions (or chat messages)"
        raise ValueError(
            f"{name} has no column {field}={column!r} (columns: {columns}); set {field} to the column that holds "
            f"the {what}"
        )


def _batch_size(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["input_ids"].shape[0])


def _hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return "CPU"
