"""`RecAConfig`: the training arguments of a RecA run."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainingArguments

from .images import BOTTLENECKS

logger = logging.getLogger(__name__)

_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class RecAConfig(TrainingArguments):
    r"""
    Configuration of a RecA (Reconstruction Alignment) run: every [`~transformers.TrainingArguments`]
    field, plus the fields below. Each field's help text is repeated here word for word.

    Parameters:
        > Model and data (read by `reca train`; the Python API takes the model and dataset directly)

        model_name_or_path (`str` or `None`, *optional*, defaults to `None`):
            Model to train: a Hugging Face Hub id, a local folder saved with save_pretrained, or 'tiny:<arch>'
            for a tiny random model built in code (e.g. 'tiny:janus').
        model_dtype (`str`, *optional*, defaults to `"float32"`):
            Dtype the weights are loaded in: 'float32' (use with bf16/fp16 mixed precision), 'bfloat16', 'float16'
            or 'auto' (the checkpoint's own dtype).
        dataset_name (`str` or `None`, *optional*, defaults to `None`):
            Training images: a datasets hub id, a local dataset folder (save_to_disk), a folder of image files, or
            'synthetic_shapes' (coloured shapes built in code, no download).
        dataset_config (`str` or `None`, *optional*, defaults to `None`):
            Configuration name of the dataset, when it has several.
        dataset_split (`str`, *optional*, defaults to `"train"`):
            Split of the dataset to train on.
        image_column (`str`, *optional*, defaults to `"image"`):
            Column holding the images (PIL images, file paths, or datasets Image values).
        max_train_samples (`int` or `None`, *optional*, defaults to `None`):
            Use at most this many training images (for 'synthetic_shapes': how many to make; default 256).

        > RecA: the reconstruction task

        condition_resolution (`int` or `str`, *optional*, defaults to `"auto"`):
            Resolution of the condition view the understanding encoder sees. 'auto' is the adapter's minimum
            understanding resolution (the information bottleneck of the guide); an integer sets it in pixels.
        generation_resolution (`int` or `str`, *optional*, defaults to `"auto"`):
            Resolution of the target view the generation loss reconstructs. 'auto' is the model's native one.
        condition_bottleneck (`str`, *optional*, defaults to `"resize"`):
            How the condition view is degraded: 'resize' (to condition_resolution; preferred), 'blur' (also
            downscaled by blur_factor and upscaled back: same token count, less information) or 'none'.
        blur_factor (`int`, *optional*, defaults to `4`):
            Downscale factor of the 'blur' bottleneck (the guide's Show-o example uses 8: 512 -> 64 -> 512).
        prompt_templates (`str`, *optional*, defaults to `"default"`):
            Reconstruction instructions: 'default' for the project's templates, or a file with one instruction
            per line or a JSON list of strings.
        cond_dropout_prob (`float`, *optional*, defaults to `0.1`):
            Probability that an example's instruction is replaced by the adapter's null prompt (the image
            condition is kept), which trains the branch classifier-free guidance contrasts against.
        freeze (`str` or `list[str]`, *optional*, defaults to `"auto"`):
            Parameters to freeze: 'auto' (the adapter's default: understanding-only modules and image tokenizers),
            'none', or module-name patterns (full regular expressions on dotted names, e.g. 'model.vision_model').

        > Monitoring

        num_reconstruction_images (`int`, *optional*, defaults to `4`):
            Number of training images reconstructed before and after training into reconstructions.png in
            output_dir (0 disables it).
        reconstruction_kwargs (`dict`, `str` or `None`, *optional*, defaults to `None`):
            Generation settings for those reconstructions, passed to the adapter's reconstruct (e.g.
            {"guidance_scale": 1.0, "do_sample": false}); a JSON string on the command line.

    Defaults that differ from [`~transformers.TrainingArguments`]: `remove_unused_columns=False` (the
    collator needs the image column), `learning_rate=1e-5`, `adam_beta2=0.95`, `logging_steps=10`.
    With `bf16=True` on a machine without a bf16-capable accelerator, `use_cpu` is set (CPU autocast).
    """

    _VALID_DICT_FIELDS = [*TrainingArguments._VALID_DICT_FIELDS, "reconstruction_kwargs"]

    # ---- model and data ----
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Model to train: a Hugging Face Hub id, a local folder saved with save_pretrained, or "
            "'tiny:<arch>' for a tiny random model built in code (e.g. 'tiny:janus')."
        },
    )
    model_dtype: str = field(
        default="float32",
        metadata={
            "help": "Dtype the weights are loaded in: 'float32' (use with bf16/fp16 mixed precision), 'bfloat16', "
            "'float16' or 'auto' (the checkpoint's own dtype)."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Training images: a datasets hub id, a local dataset folder (save_to_disk), a folder of image "
            "files, or 'synthetic_shapes' (coloured shapes built in code, no download)."
        },
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Configuration name of the dataset, when it has several."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of the dataset to train on."})
    image_column: str = field(
        default="image",
        metadata={"help": "Column holding the images (PIL images, file paths, or datasets Image values)."},
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={
            "help": "Use at most this many training images (for 'synthetic_shapes': how many to make; default 256)."
        },
    )

    # ---- RecA ----
    condition_resolution: str = field(
        default="auto",
        metadata={
            "help": "Resolution of the condition view the understanding encoder sees. 'auto' is the adapter's "
            "minimum understanding resolution (the information bottleneck of the guide); an integer sets it in pixels."
        },
    )
    generation_resolution: str = field(
        default="auto",
        metadata={
            "help": "Resolution of the target view the generation loss reconstructs. 'auto' is the model's native one."
        },
    )
    condition_bottleneck: str = field(
        default="resize",
        metadata={
            "help": "How the condition view is degraded: 'resize' (to condition_resolution; preferred), 'blur' (also "
            "downscaled by blur_factor and upscaled back: same token count, less information) or 'none'.",
            "choices": list(BOTTLENECKS),
        },
    )
    blur_factor: int = field(
        default=4,
        metadata={
            "help": "Downscale factor of the 'blur' bottleneck (the guide's Show-o example uses 8: 512 -> 64 -> 512)."
        },
    )
    prompt_templates: str = field(
        default="default",
        metadata={
            "help": "Reconstruction instructions: 'default' for the project's templates, or a file with one "
            "instruction per line or a JSON list of strings."
        },
    )
    cond_dropout_prob: float = field(
        default=0.1,
        metadata={
            "help": "Probability that an example's instruction is replaced by the adapter's null prompt (the image "
            "condition is kept), which trains the branch classifier-free guidance contrasts against."
        },
    )
    freeze: str = field(  # or a list of patterns (from Python or YAML); a comma-separated string on the CLI
        default="auto",
        metadata={
            "help": "Parameters to freeze: 'auto' (the adapter's default: understanding-only modules and image "
            "tokenizers), 'none', or module-name patterns (full regular expressions on dotted names, e.g. "
            "'model.vision_model')."
        },
    )

    # ---- monitoring ----
    num_reconstruction_images: int = field(
        default=4,
        metadata={
            "help": "Number of training images reconstructed before and after training into reconstructions.png "
            "in output_dir (0 disables it)."
        },
    )
    reconstruction_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Generation settings for those reconstructions, passed to the adapter's reconstruct (e.g. "
            '{"guidance_scale": 1.0, "do_sample": false}); a JSON string on the command line.'
        },
    )

    # ---- TrainingArguments defaults that differ ----
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Kept False: the RecA collator reads the image column, which the model's forward lacks."},
    )
    learning_rate: float = field(default=1e-5, metadata={"help": "The initial learning rate for AdamW."})
    adam_beta2: float = field(default=0.95, metadata={"help": "Beta2 for the AdamW optimizer."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps (or a ratio of the run)."})

    def __post_init__(self):
        errors = self.reca_errors()
        if self.bf16 and not self.use_cpu and not _bf16_accelerator_available():
            logger.info("bf16=True with no bf16-capable accelerator: training on the CPU (use_cpu=True).")
            self.use_cpu = True
        try:
            super().__post_init__()
        except ValueError as error:
            errors.append(str(error))
        if errors:
            raise ValueError("Invalid RecAConfig:\n" + "\n".join(f"- {e}" for e in errors))

    def reca_errors(self) -> list[str]:
        """Check (and normalise) the RecA fields; returns every problem found, each naming its field."""
        errors = []
        for name in ("condition_resolution", "generation_resolution"):
            value = getattr(self, name)
            parsed = _parse_resolution(value)
            if parsed is None:
                errors.append(f"{name}={value!r}: use 'auto' or a positive number of pixels such as 384.")
            else:
                setattr(self, name, parsed)
        if self.condition_bottleneck not in BOTTLENECKS:
            errors.append(
                f"condition_bottleneck={self.condition_bottleneck!r}: choose one of {', '.join(BOTTLENECKS)}."
            )
        if not isinstance(self.blur_factor, int) or self.blur_factor < 2:
            errors.append(f"blur_factor={self.blur_factor!r}: use an integer of at least 2 (e.g. 4 or 8).")
        if not 0.0 <= self.cond_dropout_prob < 1.0:
            errors.append(f"cond_dropout_prob={self.cond_dropout_prob!r}: use a probability in [0, 1), e.g. 0.1.")
        if self.prompt_templates != "default" and not Path(self.prompt_templates).expanduser().is_file():
            errors.append(
                f"prompt_templates={self.prompt_templates!r}: no such file; give a file with one instruction per "
                "line, a JSON list, or 'default'."
            )
        errors += self._normalise_freeze()
        if self.model_dtype not in _DTYPES:
            errors.append(f"model_dtype={self.model_dtype!r}: choose one of {', '.join(_DTYPES)}.")
        if not isinstance(self.num_reconstruction_images, int) or self.num_reconstruction_images < 0:
            errors.append(f"num_reconstruction_images={self.num_reconstruction_images!r}: use 0 or a positive integer.")
        if isinstance(self.reconstruction_kwargs, str):
            try:
                self.reconstruction_kwargs = json.loads(self.reconstruction_kwargs)
            except json.JSONDecodeError as error:
                errors.append(f"reconstruction_kwargs={self.reconstruction_kwargs!r}: not valid JSON ({error}).")
        if self.reconstruction_kwargs is not None and not isinstance(self.reconstruction_kwargs, dict):
            errors.append(f"reconstruction_kwargs={self.reconstruction_kwargs!r}: use a mapping such as {{}}.")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            errors.append(f"max_train_samples={self.max_train_samples!r}: use a positive integer or leave it unset.")
        return errors

    def _normalise_freeze(self) -> list[str]:
        freeze = self.freeze
        if isinstance(freeze, str):
            freeze = [p.strip() for p in freeze.split(",") if p.strip()]
        freeze = list(freeze or [])
        if freeze in (["auto"], ["none"]):
            self.freeze = freeze[0]
            return []
        if not freeze:
            return ["freeze=[]: use 'auto', 'none', or a list of module-name patterns."]
        if {"auto", "none"} & set(freeze):
            return [f"freeze={self.freeze!r}: 'auto' and 'none' cannot be mixed with patterns."]
        errors = []
        for pattern in freeze:
            try:
                re.compile(pattern)
            except re.error as error:
                errors.append(f"freeze pattern {pattern!r} is not a valid regular expression ({error}).")
        self.freeze = freeze
        return errors


def _parse_resolution(value) -> int | str | None:
    """'auto', or a positive integer given as an int or a string of digits; None when it is neither."""
    if value == "auto":
        return "auto"
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _bf16_accelerator_available() -> bool:
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    return is_torch_bf16_gpu_available() or is_torch_xla_available()
