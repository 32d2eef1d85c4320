"""The checks of a RecA run that a `RecAConfig` cannot make alone: those that read the file system or need the
model's architecture adapter. `reca validate` and `RecATrainer` both run them, so they say the same thing.

`RecAConfig` only describes (its own checks look at the field values and nothing else); these look outside it:

- files: ``prompt_templates`` must exist, and ``base_model_id`` must not name a local folder;
- the model: both resolutions must suit it (``"auto"`` resolved by its adapter), the condition view must not be
  one it can copy (the shortcut guard, unless ``allow_shortcut``), a ``condition_interpolation`` needs a condition
  made from the target (``condition_source`` resolved by the adapter), a ``keep`` fit needs an adapter that takes
  views of different sizes, and the LoRA target mode must exist for it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .adapters.base import UMMAdapter
from .config import RecAConfig, base_model_id_error
from .images import ViewSpec, keep_errors, resolve_condition_source, shortcut_error, views_from_config
from .loading import is_hub_id
from .lora import leaves_understanding_intact, resolve_target_modules
from .tasks import IMAGE_TO_TEXT

logger = logging.getLogger(__name__)


def file_errors(args: RecAConfig) -> list[str]:
    """Problems of the fields that name files."""
    errors = []
    templates = args.prompt_templates
    if templates != "default" and not Path(templates).expanduser().is_file():
        errors.append(
            f"prompt_templates={templates!r}: no such file; give a file with one instruction per line, a JSON list, "
            "or 'default'."
        )
    if args.base_model_id is not None and not is_hub_id(args.base_model_id):
        errors.append(base_model_id_error(args.base_model_id))
    return errors


def model_errors(args: RecAConfig, adapter: UMMAdapter) -> list[str]:
    """Problems of the fields that depend on the model, as its architecture adapter judges them."""
    errors = []
    try:
        condition, generation = adapter.resolve_resolutions(args.condition_resolution, args.generation_resolution)
    except ValueError as error:
        errors += str(error).splitlines()
    else:
        shortcut = shortcut_error(adapter, condition, generation, args.condition_bottleneck)
        if shortcut and not args.allow_shortcut:
            errors.append(shortcut)
    errors += keep_errors(adapter, args.target_fit, args.condition_fit)
    if args.condition_source == "auto":  # an explicit 'image' with an interpolation is RecAConfig's own error
        try:
            resolve_condition_source(adapter, args.condition_source, args.condition_interpolation)
        except ValueError as error:
            errors.append(f"{error} (condition_source 'auto' is the {adapter.name} adapter's 'image')")
    if args.use_peft:
        try:
            resolve_target_modules(adapter, args.lora_target_modules)
        except ValueError as error:
            errors.append(str(error))
    return errors


def run_errors(args: RecAConfig, adapter: UMMAdapter | None = None) -> list[str]:
    """Every problem :func:`file_errors` and (with an adapter) :func:`model_errors` find."""
    return file_errors(args) + (model_errors(args, adapter) if adapter is not None else [])


def bf16_without_accelerator(args: RecAConfig) -> str | None:
    """Why a ``bf16`` run would train on the CPU without having asked to (None when it would not)."""
    if not getattr(args, "_bf16_without_accelerator", False):
        return None
    return (
        "bf16=True, but no bf16-capable accelerator (a CUDA GPU or a TPU) is visible to this process, so the run "
        "would train on the CPU. To train on the CPU on purpose, set use_cpu: true (bf16 autocast on the CPU) or "
        "bf16: false; on a GPU machine, check that torch sees the GPU (reca env, CUDA_VISIBLE_DEVICES)."
    )


def check_run(args: RecAConfig, adapter: UMMAdapter) -> ViewSpec:
    """Raise one ValueError listing every problem of :func:`run_errors` (the trainer calls this first); without
    one, the run's views (:func:`reca_hf.images.views_from_config`), which the trainer hands to every part."""
    errors = run_errors(args, adapter)
    if len(errors) == 1:
        raise ValueError(errors[0])
    if errors:
        raise ValueError(f"Invalid RecAConfig for this {adapter.name} model:\n" + "\n".join(f"- {e}" for e in errors))
    return views_from_config(adapter, args)


def check_understanding_data(adapter: UMMAdapter, model, task_ratios: dict[str, float], require: bool) -> None:
    """The guide's third rule: a shared LLM trained without image-to-text data loses understanding (a warning,
    or with ``require`` (``require_understanding_data``) an error)."""
    if adapter.parameter_sharing != "shared":
        return
    if leaves_understanding_intact(model, adapter):  # e.g. a generation-only LoRA
        if task_ratios[IMAGE_TO_TEXT] > 0:
            logger.warning(
                "This run trains a generation-only LoRA adapter, which leaves understanding exactly intact; its "
                "image-to-text samples only train that adapter on captions. Set task_ratios image_to_text "
                "to 0 unless that is what you want."
            )
        return
    if task_ratios[IMAGE_TO_TEXT] > 0:
        return
    message = (
        f"{adapter.name} uses one language model to understand and to generate, and this run trains it "
        "with no image-to-text data. Reconstruction alone pulls that shared model toward generation: its "
        "captioning and question answering degrade, and its representation can collapse. Mix image-to-text "
        "data in: pass i2t_dataset= (recipes: i2t_dataset_name) with task_ratios such as "
        '{"reconstruction": 1, "image_to_text": 1}, the 1:1 mix of the public RecA configs.'
    )
    if require:
        raise ValueError("require_understanding_data=True: " + message)
    logger.warning(message)
