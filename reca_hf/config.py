"""`RecAConfig`: the training arguments of a RecA run."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
from dataclasses import dataclass, field

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import TrainingArguments
from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

from .data import IMAGE_COLUMN_FIELDS
from .images import (
    AUTO,
    BOTTLENECKS,
    CONDITION_SOURCES,
    DEFAULT_MAX_IMAGE_PIXELS,
    FITS,
    INTERPOLATIONS,
    interpolation_error,
)
from .tasks import TASKS

logger = logging.getLogger(__name__)

# Each set of choices, defined once.
CACHE_MODES = ("auto", "true", "false")  # cache_frozen_features
DTYPES = ("auto", "float32", "bfloat16", "float16")
COLLAPSE_ACTIONS = ("warn", "stop", "off")
NONFINITE_ACTIONS = ("stop", "skip")
RESUME_LATEST = ("true", "latest")  # resume_from_checkpoint values meaning the newest checkpoint in output_dir
TASK_LOSS_REDUCTIONS = ("sample_mean", "task_mean", "sum")
LORA_TARGET_MODES = ("generation", "generation+llm")
# An adapter name ('janus') or a class path ('my_pkg.my_module:MyAdapter', 'my_pkg.my_module.MyAdapter').
_ADAPTER_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*(:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*)?$")
MAX_GRID_IMAGES = 16  # num_reconstruction_images at most: each is generated twice (reca_hf.callbacks)
TINY_PREFIX = "tiny:"  # model_name_or_path "tiny:<arch>": the architecture's tiny builder
_JSON_FIELDS = ("reconstruction_kwargs", "task_ratios", "task_weights", "eval_results")


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
        adapter (`str` or `None`, *optional*, defaults to `None`):
            Architecture adapter of the model: a registered name ('janus', or one an installed plug-in registers
            through the 'reca_hf.adapters' entry points) or a class as 'my_pkg.my_module:MyAdapter'. Unset: detected
            from the model config's model_type.
        trust_remote_code (`bool`, *optional*, defaults to `False`):
            Allow loading a model (and processor) whose code lives in its Hub repository; the code runs on this
            machine, so only for repositories you trust.
        model_revision (`str` or `None`, *optional*, defaults to `None`):
            Revision of the model to load: a branch, a tag or a commit hash (unset: the default branch).
        attn_implementation (`str` or `None`, *optional*, defaults to `None`):
            Attention implementation the model is loaded with, e.g. 'eager', 'sdpa' or 'flash_attention_2' (unset:
            transformers' default).
        dataset_name (`str` or `None`, *optional*, defaults to `None`):
            Training images: a datasets hub id, a local dataset folder (save_to_disk), a folder of image files, or
            'synthetic_shapes' (coloured shapes built in code, no download).
        dataset_config (`str` or `None`, *optional*, defaults to `None`):
            Configuration name of the dataset, when it has several.
        dataset_split (`str`, *optional*, defaults to `"train"`):
            Split of the dataset to train on.
        image_column (`str`, *optional*, defaults to `"image"`):
            Column holding the images (PIL images, file paths, or datasets Image values).
        bad_image_policy (`str`, *optional*, defaults to `"error"`):
            What an image that cannot be decoded (corrupt, truncated, over max_image_pixels) does: 'error' stops with
            the dataset, row and file named; 'skip' replaces the row by a good row drawn at random from the same
            dataset, counts and logs each bad row once.
        max_image_pixels (`int`, *optional*, defaults to `89478485`):
            Largest image (width x height) decoded; larger ones are bad images (a decompression-bomb guard).
        cpu_threads (`int` or `str`, *optional*, defaults to `"auto"`):
            Torch intra-op threads of a run on the CPU: 'auto' uses 1 for a tiny model (under 50M parameters, where
            more threads only add overhead and slow tenfold on a busy machine) unless OMP_NUM_THREADS is set, and
            torch's default otherwise; 0 keeps torch's default; a number sets it.
        max_train_samples (`int` or `None`, *optional*, defaults to `None`):
            Use at most this many training images (for 'synthetic_shapes': how many to make; default 256).
        i2t_dataset_name (`str` or `None`, *optional*, defaults to `None`):
            Image-to-text data (images with captions or chat messages) mixed into the run: a datasets hub id, a local
            dataset folder, or 'synthetic_shapes' (shapes with captions saying what is where).
        i2t_dataset_config (`str` or `None`, *optional*, defaults to `None`):
            Configuration name of the image-to-text dataset.
        i2t_dataset_split (`str`, *optional*, defaults to `"train"`):
            Split of the image-to-text dataset.
        t2i_dataset_name (`str` or `None`, *optional*, defaults to `None`):
            Text-to-image data (images with captions) mixed into the run: a datasets hub id, a local dataset folder,
            or 'synthetic_shapes'.
        t2i_dataset_config (`str` or `None`, *optional*, defaults to `None`):
            Configuration name of the text-to-image dataset.
        t2i_dataset_split (`str`, *optional*, defaults to `"train"`):
            Split of the text-to-image dataset.
        eval_dataset_name (`str` or `None`, *optional*, defaults to `None`):
            Held-out images evaluated at each eval_strategy step (eval_reconstruction_loss, and image-to-text too
            when they have captions), probed by the collapse detector and reconstructed into the tracker grids: a
            datasets hub id, a local dataset folder, a folder of image files, or 'synthetic_shapes'.
        eval_dataset_config (`str` or `None`, *optional*, defaults to `None`):
            Configuration name of the eval dataset.
        eval_dataset_split (`str`, *optional*, defaults to `"train"`):
            Split of the eval dataset (a folder of images has one, 'train': the whole folder).
        max_eval_samples (`int` or `None`, *optional*, defaults to `None`):
            Use at most this many eval images (for 'synthetic_shapes': how many to make; default 64).
        caption_column (`str`, *optional*, defaults to `"caption"`):
            Column of the image-to-text, text-to-image and eval datasets holding a caption string or chat-style
            messages (a list of {"role", "content"}; the last assistant turn is the answer).
        i2t_image_column (`str` or `None`, *optional*, defaults to `None`):
            Column of the image-to-text dataset holding its images; unset: image_column.
        t2i_image_column (`str` or `None`, *optional*, defaults to `None`):
            Column of the text-to-image dataset holding its images; unset: image_column.
        eval_image_column (`str` or `None`, *optional*, defaults to `None`):
            Column of the eval dataset holding its images; unset: image_column.
        dataset_streaming (`bool`, *optional*, defaults to `False`):
            Stream every dataset (datasets' streaming=True: rows are read as training goes, nothing is downloaded
            or listed in full first). Needs max_steps; the task mix becomes an iterable interleave with the same
            shares, and a resumed run starts the stream's current pass again and skips that pass's batches it
            trained on (the stream must give the same rows in the same order when read again).

        > RecA: the reconstruction task

        condition_resolution (`int` or `str`, *optional*, defaults to `"auto"`):
            Resolution of the condition view the understanding encoder sees. 'auto' is the adapter's minimum
            understanding resolution (the information bottleneck of the guide), and for adapters whose condition and
            target share one representation (Emu3) at most half the generation resolution; an integer sets it in
            pixels. Lower than 'auto' also works (Janus at 224 px reads 196 SigLIP tokens instead of 576): fewer
            condition tokens, a tighter bottleneck; the RecA authors found 224-px understanding features better
            than 512 px for BAGEL (GenEval 82.4 vs 79.2).
        generation_resolution (`int` or `str`, *optional*, defaults to `"auto"`):
            Resolution of the target view the generation loss reconstructs. 'auto' is the model's native one.
        condition_bottleneck (`str`, *optional*, defaults to `"resize"`):
            How the condition view is degraded: 'resize' (to condition_resolution; preferred), 'blur' (also
            downscaled by blur_factor and upscaled back: same token count, less information) or 'none'.
        blur_factor (`int`, *optional*, defaults to `4`):
            Downscale factor of the 'blur' bottleneck (the guide's Show-o example uses 8: 512 -> 64 -> 512).
        target_fit (`str`, *optional*, defaults to `"auto"`):
            How an image that is not square becomes the target view: 'center_crop' (the centred square of the shorter
            side), 'random_crop' (a square at a position drawn from seed, epoch and row), 'pad' (the whole image on a
            square of the processor's background colour), 'stretch' (resized to the square, aspect ignored) or 'keep'
            (the aspect kept: the long side at most generation_resolution, the short side and the stride from the
            architecture adapter's bounds, so sizes differ per image; BAGEL's). 'auto' is the architecture adapter's
            target_fit: 'center_crop', 'random_crop' for OpenUni, 'keep' for BAGEL. No RecA author pads a generation
            target: a generator trained on grey bars learns to draw them.
        condition_fit (`str`, *optional*, defaults to `"auto"`):
            How the condition view fits a square where the target does not crop (under a cropping target_fit the
            condition is cut from the target's own square): 'pad', 'stretch', 'center_crop', 'random_crop' (the same
            square a random-crop target would take) or 'keep' (the aspect kept, the long side at most
            condition_resolution). 'auto' follows the model's understanding processor (the adapter's condition_fit:
            'pad' for Janus, 'stretch' for OpenUni, 'keep' for BAGEL).
        group_by_aspect (`bool`, *optional*, defaults to `False`):
            Batch training images of similar aspect ratio together (a map-style train set; the sizes come from the
            image headers, read once at the start): with a 'keep' fit every image has its own size, and a batch of a
            tall and a wide image pads both to the larger height and width.
        condition_source (`str`, *optional*, defaults to `"auto"`):
            Where the condition view's pixels come from: 'image' (the source image, resized by PIL bicubic with
            antialiasing in 8 bit, the way an understanding processor resizes a picture), 'target' (the target
            view's float tensor resampled to condition_resolution by condition_interpolation, not re-quantised:
            the way the OpenUni and Show-o authors make theirs; at the generation resolution the condition is
            the target itself, as Harmon's) or 'auto' (the architecture adapter's condition_source: 'target' for
            OpenUni, 'image' for Janus and Emu3, whose processors' resize is what their understanding path was
            trained with). The blur bottleneck follows it: down to condition_resolution / blur_factor and back
            up, from the target tensor or from the image.
        condition_interpolation (`str`, *optional*, defaults to `"auto"`):
            How a 'target' condition is resampled (torch.nn.functional.interpolate): 'bilinear', 'bicubic',
            'nearest', 'area', 'bilinear_antialias' or 'bicubic_antialias'. 'auto' is the architecture adapter's
            condition_interpolation (bilinear without antialias, as the OpenUni and Show-o authors). Set it only
            with a 'target' condition: an 'image' condition is resized by PIL.
        prompt_templates (`str`, *optional*, defaults to `"default"`):
            Reconstruction instructions: 'default' for the project's templates, or a file with one instruction
            per line or a JSON list of strings.
        cond_dropout_prob (`float` or `str`, *optional*, defaults to `"auto"`):
            Probability that an example's instruction is replaced by the adapter's null prompt (the image
            condition is kept), which trains the branch classifier-free guidance contrasts against. 'auto' is the
            architecture adapter's default_cond_dropout_prob (the authors' value where they published one: 0 for
            OpenUni and Show-o, 0.1 for Harmon and BAGEL; 0.1 for Janus and Emu3).
        freeze (`str` or `list[str]`, *optional*, defaults to `"auto"`):
            Parameters to freeze: 'auto' (the adapter's default: understanding-only modules and image tokenizers),
            'none', or module-name patterns (full regular expressions on dotted names, e.g. 'model.vision_model').
        allow_shortcut (`bool`, *optional*, defaults to `False`):
            Allow a condition view the model can copy: for adapters whose condition and target share one
            representation (Emu3), a condition at or above the generation resolution that is not blurred is
            refused, because the model learns to copy it and collapses. Set True only for a deliberate ablation.

        cache_frozen_features (`str`, *optional*, defaults to `"false"`):
            Compute the outputs of frozen towers (understanding features, VQ codes or autoencoder latents) once per
            training image before the first step, store them under frozen_cache_dir and read them back instead of
            re-encoding: 'true' (refused when a source module trains or the views are drawn per epoch, such as
            OpenUni's random crop), 'auto' (on where the adapter's frozen towers take at least 20 percent of a
            step's FLOPs; off, with the reason logged, where they take less or cannot be cached) or 'false'. Off by
            default: the cache costs a pass over the data and disk space (Janus at 384 px: about 2.4 MB per
            image).
        frozen_cache_dir (`str` or `None`, *optional*, defaults to `None`):
            Folder of the frozen-tower cache; unset is HF_DATASETS_CACHE/reca_frozen. Entries are keyed by the
            model (revision and weights), the views and the dataset, so a changed setting never reads a stale one.

        > LoRA (an explicit `peft_config` passed to `RecATrainer` wins over these fields)

        use_peft (`bool`, *optional*, defaults to `False`):
            Train a LoRA adapter instead of the model's weights: every base parameter stays frozen, and the run
            saves adapter_model.safetensors, adapter_config.json and reca_adapter.json (load them with
            reca_hf.load_reca_adapter).
        lora_r (`int`, *optional*, defaults to `16`):
            Rank of the LoRA update matrices.
        lora_alpha (`int`, *optional*, defaults to `32`):
            LoRA scaling numerator: the update is scaled by lora_alpha / lora_r.
        lora_dropout (`float`, *optional*, defaults to `0.05`):
            Dropout probability on the input of the LoRA update.
        lora_target_modules (`str` or `list[str]`, *optional*, defaults to `"generation"`):
            Where LoRA goes: 'generation' (the adapter's generation-only Linear layers; for Janus the generation
            aligner and head), 'generation+llm' (also the shared LLM's attention and MLP projections, active on the
            generation path only, so text outputs stay exactly the base model's), a full regular expression on
            module names, or a list of module names (from Python or YAML). The vision tower, the image tokenizer and
            the other understanding-only modules never get LoRA.
        base_model_id (`str` or `None`, *optional*, defaults to `None`):
            Hub id of the base model (e.g. 'deepseek-community/Janus-Pro-7B'), written into adapter_config.json as
            base_model_name_or_path so anyone can apply the adapter. Needed when the model was loaded from a local
            folder: an adapter whose base is only a local path is refused at push time.

        > The task mix

        task_ratios (`dict`, `str` or `None`, *optional*, defaults to `None`):
            Share of the training samples per task, e.g. {"reconstruction": 1, "image_to_text": 1,
            "text_to_image": 0}; unset gives 1 to every task that has a dataset. A JSON string on the command line.
        task_weights (`dict`, `str` or `None`, *optional*, defaults to `None`):
            Loss weight per task (default 1 each); the loss is the per-sample weighted mean over the batch.
        task_loss_reduction (`str`, *optional*, defaults to `"sample_mean"`):
            How the task losses of a mixed batch become one loss: 'sample_mean' (each sample counts once: the
            per-sample mean, times task_weights), 'task_mean' (each task's own mean times its share of
            task_ratios, whatever number of rows it got in this batch, as Harmon trains), or 'sum' (the task means
            added up, as Show-o trains: with two tasks the gradient is about twice that of the means, so halve a
            learning rate copied from a sample_mean or task_mean run, or double one copied from Show-o into those).
        require_understanding_data (`bool`, *optional*, defaults to `False`):
            Make it an error (instead of a warning) to train a shared-parameter model's language model without
            image-to-text data.

        > Monitoring

        collapse_action (`str`, *optional*, defaults to `"warn"`):
            What the collapse detector does when it finds the model copying its condition: 'warn' (log a warning
            naming the cause and the fix), 'stop' (also save a checkpoint and end training) or 'off' (no detector).
            The rule: the logged reconstruction loss falls below 0.25 x its earlier plateau or below 0.1 x
            ln(codebook size) (continuous targets: 0.1 x the first logged loss), AND the condition-swap probe finds
            at least half of the predictions following the swapped-in condition instead of the target (continuous
            targets: a condition_gain of at least 0.8).
        collapse_probe_steps (`int`, *optional*, defaults to `200`):
            Run the condition-swap probe every this many steps (and at the first log where the loss signal
            appears). The probe pairs image j's condition with image i's teacher-forced target and measures
            whether the predictions follow j (copying) or i; it logs collapse_score, swap_copy_rate and
            swap_target_rate (continuous targets: condition_gain, the use of the condition, which RecA raises).
        collapse_probe_images (`int`, *optional*, defaults to `8`):
            Number of held-out images the probe uses: the first ones of eval_dataset when there is one, else
            synthetic shapes the model has never seen (0 disables the probe, and so the detector).

        nonfinite_action (`str`, *optional*, defaults to `"stop"`):
            What a non-finite (NaN or inf) loss or gradient norm does: 'stop' ends training before the optimizer
            step, with an error naming the step, the task and a fix (nothing non-finite is saved; the checkpoints
            already written stay); 'skip' skips that optimizer step (no weight, optimizer or schedule update),
            counts it (nonfinite_skipped_steps in the logs and the card) and stops once more than
            max_nonfinite_steps steps were skipped.
        max_nonfinite_steps (`int`, *optional*, defaults to `10`):
            With nonfinite_action='skip': how many non-finite steps may be skipped in a run; the next one stops it.

        peak_flops_per_second (`float`, `str` or `None`, *optional*, defaults to `"auto"`):
            Peak FLOP/s of one accelerator, the denominator of the mfu (model FLOPs utilisation) logged with each
            training loss: the FLOPs the step really runs (forward through trained and frozen modules, and the
            backward autograd runs) per second, over this peak. 'auto': the dense bf16 peak of known GPUs (A100
            312e12, H100 and H200 SXM 989e12, L4 121e12, ...) when training in bf16 or fp16, else no mfu; a number
            sets it; null turns it off.
        num_reconstruction_images (`int`, *optional*, defaults to `4`):
            Number of images reconstructed (the first ones of the eval set when there is one, else of the training
            set) at the start, every reconstruction_steps, at each evaluation and at the end: each grid (input |
            condition | tokenizer round trip | reconstruction) goes to every report_to tracker that takes images and
            to output_dir/samples/step-N.png, and the start and end ones to reconstructions.png (0 disables it; at most
            16). The seconds each grid takes are logged, and summed up in the model card.
        reconstruction_steps (`int`, *optional*, defaults to `500`):
            Reconstruct those images (and sample validation_prompts) every this many steps (0: only at the start, at
            evaluations and at the end).
        validation_prompts (`list[str]` or `None`, *optional*, defaults to `None`):
            Prompts sampled text-to-image (seeded) beside each reconstruction grid, into the trackers and
            samples/step-N.png; unset: none.
        reconstruction_kwargs (`dict`, `str` or `None`, *optional*, defaults to `None`):
            Generation settings for those reconstructions, passed to the adapter's reconstruct (e.g.
            {"guidance_scale": 1.0, "do_sample": false}); a JSON string on the command line.

        > The Hub (with `push_to_hub`, `hub_model_id`, `hub_strategy`, `hub_private_repo`)

        hub_optional (`bool`, *optional*, defaults to `False`):
            Keep training when the Hub cannot be reached: a failure to create the repo at start is logged instead of
            raised, the push is retried at each checkpoint and at the end, and every file stays in output_dir. A
            final push that still finds the Hub unreachable logs the command that retries it (reca push) instead of
            raising.
        eval_results (`dict`, `str` or `None`, *optional*, defaults to `None`):
            Evaluation results to publish in the model card, as {benchmark: score}, e.g. {"GenEval": 0.85,
            "DPGBench": 84.2}: a table in the card and model-index metadata. A score may also be {"value": 0.85,
            "dataset_id": "<the benchmark's Hub dataset>", "task_id": "<its task>"}: it is then also written as
            .eval_results/<benchmark>.yaml, the Hub's eval-results format. A JSON string on the command line.
        license (`str` or `None`, *optional*, defaults to `None`):
            License of the trained model for its card's metadata (a Hub license id such as 'mit' or 'apache-2.0',
            or 'other'); unset: none is stated. Respect the base model's license.

        > Resuming (with `resume_from_checkpoint`: `true` or `latest` for the newest checkpoint in output_dir, or a
        > checkpoint folder)

        resume_from_hub (`str` or `None`, *optional*, defaults to `None`):
            Resume from the checkpoint a run pushed to the Hub with hub_strategy 'checkpoint' or 'all_checkpoints':
            a repo id (its last-checkpoint folder, else its newest checkpoint-N folder) is downloaded into
            output_dir/_resume_from_hub and training continues from it.

    Defaults that differ from [`~transformers.TrainingArguments`]: `remove_unused_columns=False` (the
    collator needs the image column), `learning_rate=1e-5`, `adam_beta2=0.95`, `logging_steps=10`,
    `logging_nan_inf_filter=False` (a NaN or inf loss is logged as NaN or inf, never replaced), and
    `dataloader_num_workers="auto"` (:func:`auto_num_workers`: up to 8 collating processes from the cores each
    training process has), with `dataloader_persistent_workers` and `dataloader_prefetch_factor` (2) on
    whenever workers are used, unless set.
    With `bf16=True` on a machine without a bf16-capable accelerator the config still builds (recipes validate
    on a laptop), but training refuses to run on the CPU unless `use_cpu=True` asks for it.
    """

    _VALID_DICT_FIELDS = [
        *TrainingArguments._VALID_DICT_FIELDS,
        "reconstruction_kwargs",
        "task_ratios",
        "task_weights",
        "eval_results",
    ]

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
    adapter: str | None = field(
        default=None,
        metadata={
            "help": "Architecture adapter of the model: a registered name ('janus', or one an installed plug-in "
            "registers through the 'reca_hf.adapters' entry points) or a class as 'my_pkg.my_module:MyAdapter'. "
            "Unset: detected from the model config's model_type."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Allow loading a model (and processor) whose code lives in its Hub repository; the code runs on "
            "this machine, so only for repositories you trust."
        },
    )
    model_revision: str | None = field(
        default=None,
        metadata={
            "help": "Revision of the model to load: a branch, a tag or a commit hash (unset: the default branch)."
        },
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "Attention implementation the model is loaded with, e.g. 'eager', 'sdpa' or "
            "'flash_attention_2' (unset: transformers' default)."
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
    bad_image_policy: str = field(
        default="error",
        metadata={
            "help": "What an image that cannot be decoded (corrupt, truncated, over max_image_pixels) does: 'error' "
            "stops with the dataset, row and file named; 'skip' replaces the row by a good row drawn at random from the "
            "same dataset, counts and logs each bad row once."
        },
    )
    max_image_pixels: int = field(
        default=DEFAULT_MAX_IMAGE_PIXELS,
        metadata={
            "help": "Largest image (width x height) decoded; larger ones are bad images (a decompression-bomb guard)."
        },
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={
            "help": "Use at most this many training images (for 'synthetic_shapes': how many to make; default 256)."
        },
    )

    i2t_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Image-to-text data (images with captions or chat messages) mixed into the run: a datasets hub "
            "id, a local dataset folder, or 'synthetic_shapes' (shapes with captions saying what is where)."
        },
    )
    i2t_dataset_config: str | None = field(
        default=None, metadata={"help": "Configuration name of the image-to-text dataset."}
    )
    i2t_dataset_split: str = field(default="train", metadata={"help": "Split of the image-to-text dataset."})
    t2i_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Text-to-image data (images with captions) mixed into the run: a datasets hub id, a local "
            "dataset folder, or 'synthetic_shapes'."
        },
    )
    t2i_dataset_config: str | None = field(
        default=None, metadata={"help": "Configuration name of the text-to-image dataset."}
    )
    t2i_dataset_split: str = field(default="train", metadata={"help": "Split of the text-to-image dataset."})
    eval_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Held-out images evaluated at each eval_strategy step (eval_reconstruction_loss, and "
            "image-to-text too when they have captions), probed by the collapse detector and reconstructed into the "
            "tracker grids: a datasets hub id, a local dataset folder, a folder of image files, or 'synthetic_shapes'."
        },
    )
    eval_dataset_config: str | None = field(default=None, metadata={"help": "Configuration name of the eval dataset."})
    eval_dataset_split: str = field(
        default="train",
        metadata={"help": "Split of the eval dataset (a folder of images has one, 'train': the whole folder)."},
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={"help": "Use at most this many eval images (for 'synthetic_shapes': how many to make; default 64)."},
    )
    caption_column: str = field(
        default="caption",
        metadata={
            "help": "Column of the image-to-text, text-to-image and eval datasets holding a caption string or "
            'chat-style messages (a list of {"role", "content"}; the last assistant turn is the answer).'
        },
    )
    i2t_image_column: str | None = field(
        default=None,
        metadata={"help": "Column of the image-to-text dataset holding its images; unset: image_column."},
    )
    t2i_image_column: str | None = field(
        default=None,
        metadata={"help": "Column of the text-to-image dataset holding its images; unset: image_column."},
    )
    eval_image_column: str | None = field(
        default=None, metadata={"help": "Column of the eval dataset holding its images; unset: image_column."}
    )
    dataset_streaming: bool = field(
        default=False,
        metadata={
            "help": "Stream every dataset (datasets' streaming=True: rows are read as training goes, nothing is "
            "downloaded or listed in full first). Needs max_steps; the task mix becomes an iterable interleave with "
            "the same shares, and a resumed run starts the stream's current pass again and skips that pass's batches it "
            "trained on (the stream must give the same rows in the same order when read again)."
        },
    )

    # ---- RecA ----
    condition_resolution: int | str = field(
        default="auto",
        metadata={
            "help": "Resolution of the condition view the understanding encoder sees. 'auto' is the adapter's "
            "minimum understanding resolution (the information bottleneck of the guide), and for adapters whose "
            "condition and target share one representation (Emu3) at most half the generation resolution; an "
            "integer sets it in pixels. Lower than 'auto' also works (Janus at 224 px reads 196 SigLIP tokens "
            "instead of 576): fewer condition tokens, a tighter bottleneck; the RecA authors found 224-px "
            "understanding features better than 512 px for BAGEL (GenEval 82.4 vs 79.2)."
        },
    )
    generation_resolution: int | str = field(
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
    target_fit: str = field(
        default=AUTO,
        metadata={
            "help": (
                "How an image that is not square becomes the target view: 'center_crop' (the centred square of the "
                "shorter side), 'random_crop' (a square at a position drawn from seed, epoch and row), 'pad' (the "
                "whole image on a square of the processor's background colour), 'stretch' (resized to the square, "
                "aspect ignored) or 'keep' (the aspect kept: the long side at most generation_resolution, the short "
                "side and the stride from the architecture adapter's bounds, so sizes differ per image; BAGEL's). "
                "'auto' is the architecture adapter's target_fit: 'center_crop', 'random_crop' for OpenUni, 'keep' "
                "for BAGEL. No RecA author pads a generation target: a generator trained on grey bars learns to draw "
                "them."
            ),
            "choices": [AUTO, *FITS],
        },
    )
    condition_fit: str = field(
        default=AUTO,
        metadata={
            "help": (
                "How the condition view fits a square where the target does not crop (under a cropping target_fit the"
                " condition is cut from the target's own square): 'pad', 'stretch', 'center_crop', 'random_crop' "
                "(the same square a random-crop target would take) or 'keep' (the aspect kept, the long side at most "
                "condition_resolution). 'auto' follows the model's understanding processor (the adapter's "
                "condition_fit: 'pad' for Janus, 'stretch' for OpenUni, 'keep' for BAGEL)."
            ),
            "choices": [AUTO, *FITS],
        },
    )
    group_by_aspect: bool = field(
        default=False,
        metadata={
            "help": "Batch training images of similar aspect ratio together (a map-style train set; the sizes come "
            "from the image headers, read once at the start): with a 'keep' fit every image has its own size, and a "
            "batch of a tall and a wide image pads both to the larger height and width."
        },
    )
    condition_source: str = field(
        default=AUTO,
        metadata={
            "help": (
                "Where the condition view's pixels come from: 'image' (the source image, resized by PIL bicubic with "
                "antialiasing in 8 bit, the way an understanding processor resizes a picture), 'target' (the target "
                "view's float tensor resampled to condition_resolution by condition_interpolation, not re-quantised: "
                "the way the OpenUni and Show-o authors make theirs; at the generation resolution the condition is "
                "the target itself, as Harmon's) or 'auto' (the architecture adapter's condition_source: 'target' for "
                "OpenUni, 'image' for Janus and Emu3, whose processors' resize is what their understanding path was "
                "trained with). The blur bottleneck follows it: down to condition_resolution / blur_factor and back "
                "up, from the target tensor or from the image."
            ),
            "choices": [AUTO, *CONDITION_SOURCES],
        },
    )
    condition_interpolation: str = field(
        default=AUTO,
        metadata={
            "help": (
                "How a 'target' condition is resampled (torch.nn.functional.interpolate): 'bilinear', 'bicubic', "
                "'nearest', 'area', 'bilinear_antialias' or 'bicubic_antialias'. 'auto' is the architecture adapter's "
                "condition_interpolation (bilinear without antialias, as the OpenUni and Show-o authors). Set it only "
                "with a 'target' condition: an 'image' condition is resized by PIL."
            ),
            "choices": [AUTO, *INTERPOLATIONS],
        },
    )
    prompt_templates: str = field(
        default="default",
        metadata={
            "help": "Reconstruction instructions: 'default' for the project's templates, or a file with one "
            "instruction per line or a JSON list of strings."
        },
    )
    cond_dropout_prob: float | str = field(
        default=AUTO,
        metadata={
            "help": "Probability that an example's instruction is replaced by the adapter's null prompt (the image "
            "condition is kept), which trains the branch classifier-free guidance contrasts against. 'auto' is the "
            "architecture adapter's default_cond_dropout_prob (the authors' value where they published one: 0 for "
            "OpenUni and Show-o, 0.1 for Harmon and BAGEL; 0.1 for Janus and Emu3)."
        },
    )
    freeze: str | list[str] = field(  # a comma-separated string on the command line
        default="auto",
        metadata={
            "help": "Parameters to freeze: 'auto' (the adapter's default: understanding-only modules and image "
            "tokenizers), 'none', or module-name patterns (full regular expressions on dotted names, e.g. "
            "'model.vision_model')."
        },
    )

    allow_shortcut: bool = field(
        default=False,
        metadata={
            "help": "Allow a condition view the model can copy: for adapters whose condition and target share one "
            "representation (Emu3), a condition at or above the generation resolution that is not blurred is "
            "refused, because the model learns to copy it and collapses. Set True only for a deliberate ablation."
        },
    )

    cache_frozen_features: str = field(
        default="false",
        metadata={
            "help": "Compute the outputs of frozen towers (understanding features, VQ codes or autoencoder latents) "
            "once per training image before the first step, store them under frozen_cache_dir and read them back "
            "instead of re-encoding: 'true' (refused when a source module trains or the views are drawn per epoch, "
            "such as OpenUni's random crop), 'auto' (on where the adapter's frozen towers take at least 20 percent "
            "of a step's FLOPs; off, with the reason logged, where they take less or cannot be cached) or 'false'. "
            "Off by default: the cache costs a pass over the data and disk space (Janus at 384 px: about 2.4 MB "
            "per image).",
            "choices": list(CACHE_MODES),
        },
    )
    frozen_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of the frozen-tower cache; unset is HF_DATASETS_CACHE/reca_frozen. Entries are keyed by "
            "the model (revision and weights), the views and the dataset, so a changed setting never reads a stale "
            "one."
        },
    )

    # ---- LoRA ----
    use_peft: bool = field(
        default=False,
        metadata={
            "help": "Train a LoRA adapter instead of the model's weights: every base parameter stays frozen, and the "
            "run saves adapter_model.safetensors, adapter_config.json and reca_adapter.json (load them with "
            "reca_hf.load_reca_adapter)."
        },
    )
    lora_r: int = field(default=16, metadata={"help": "Rank of the LoRA update matrices."})
    lora_alpha: int = field(
        default=32, metadata={"help": "LoRA scaling numerator: the update is scaled by lora_alpha / lora_r."}
    )
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout probability on the input of the LoRA update."})
    lora_target_modules: str | list[str] = field(
        default="generation",
        metadata={
            "help": "Where LoRA goes: 'generation' (the adapter's generation-only Linear layers; for Janus the "
            "generation aligner and head), 'generation+llm' (also the shared LLM's attention and MLP projections, "
            "active on the generation path only, so text outputs stay exactly the base model's), a full regular "
            "expression on module names, or a list of module names (from Python or YAML). The vision tower, the "
            "image tokenizer and the other understanding-only modules never get LoRA."
        },
    )
    base_model_id: str | None = field(
        default=None,
        metadata={
            "help": "Hub id of the base model (e.g. 'deepseek-community/Janus-Pro-7B'), written into "
            "adapter_config.json as base_model_name_or_path so anyone can apply the adapter. Needed when the model "
            "was loaded from a local folder: an adapter whose base is only a local path is refused at push time."
        },
    )

    # ---- the task mix ----
    task_ratios: dict | str | None = field(
        default=None,
        metadata={
            "help": 'Share of the training samples per task, e.g. {"reconstruction": 1, "image_to_text": 1, '
            '"text_to_image": 0}; unset gives 1 to every task that has a dataset. A JSON string on the command line.'
        },
    )
    task_weights: dict | str | None = field(
        default=None,
        metadata={
            "help": "Loss weight per task (default 1 each); the loss is the per-sample weighted mean over the batch."
        },
    )
    task_loss_reduction: str = field(
        default="sample_mean",
        metadata={
            "help": "How the task losses of a mixed batch become one loss: 'sample_mean' (each sample counts once: the per-sample mean, times task_weights), 'task_mean' (each task's own mean times its share of task_ratios, whatever number of rows it got in this batch, as Harmon trains), or 'sum' (the task means added up, as Show-o trains: with two tasks the gradient is about twice that of the means, so halve a learning rate copied from a sample_mean or task_mean run, or double one copied from Show-o into those).",
            "choices": list(TASK_LOSS_REDUCTIONS),
        },
    )
    require_understanding_data: bool = field(
        default=False,
        metadata={
            "help": "Make it an error (instead of a warning) to train a shared-parameter model's language model "
            "without image-to-text data."
        },
    )

    # ---- monitoring ----
    collapse_action: str = field(
        default="warn",
        metadata={
            "help": "What the collapse detector does when it finds the model copying its condition: 'warn' (log a "
            "warning naming the cause and the fix), 'stop' (also save a checkpoint and end training) or 'off' (no "
            "detector). The rule: the logged reconstruction loss falls below 0.25 x its earlier plateau or below "
            "0.1 x ln(codebook size) (continuous targets: 0.1 x the first logged loss), AND the condition-swap "
            "probe finds at least half of the predictions following the swapped-in condition instead of the "
            "target (continuous targets: a condition_gain of at least 0.8).",
            "choices": list(COLLAPSE_ACTIONS),
        },
    )
    collapse_probe_steps: int = field(
        default=200,
        metadata={
            "help": "Run the condition-swap probe every this many steps (and at the first log where the loss "
            "signal appears). The probe pairs image j's condition with image i's teacher-forced target and "
            "measures whether the predictions follow j (copying) or i; it logs collapse_score, swap_copy_rate "
            "and swap_target_rate (continuous targets: condition_gain, the use of the condition, which RecA "
            "raises)."
        },
    )
    collapse_probe_images: int = field(
        default=8,
        metadata={
            "help": "Number of held-out images the probe uses: the first ones of eval_dataset when there is one, "
            "else synthetic shapes the model has never seen (0 disables the probe, and so the detector)."
        },
    )
    nonfinite_action: str = field(
        default="stop",
        metadata={
            "help": "What a non-finite (NaN or inf) loss or gradient norm does: 'stop' ends training before the "
            "optimizer step, with an error naming the step, the task and a fix (nothing non-finite is saved; the "
            "checkpoints already written stay); 'skip' skips that optimizer step (no weight, optimizer or schedule "
            "update), counts it (nonfinite_skipped_steps in the logs and the card) and stops once more than "
            "max_nonfinite_steps steps were skipped.",
            "choices": list(NONFINITE_ACTIONS),
        },
    )
    max_nonfinite_steps: int = field(
        default=10,
        metadata={
            "help": "With nonfinite_action='skip': how many non-finite steps may be skipped in a run; the next one "
            "stops it."
        },
    )
    peak_flops_per_second: float | str | None = field(
        default=AUTO,
        metadata={
            "help": "Peak FLOP/s of one accelerator, the denominator of the mfu (model FLOPs utilisation) logged with "
            "each training loss: the FLOPs the step really runs (forward through trained and frozen modules, and "
            "the backward autograd runs) per second, over this peak. 'auto': the dense bf16 peak of known GPUs "
            "(A100 312e12, H100 and H200 SXM 989e12, L4 121e12, ...) when training in bf16 or fp16, else no mfu; a "
            "number sets it; null turns it off."
        },
    )
    num_reconstruction_images: int = field(
        default=4,
        metadata={
            "help": "Number of images reconstructed (the first ones of the eval set when there is one, else of the "
            "training set) at the start, every reconstruction_steps, at each evaluation and at the end: each grid "
            "(input | condition | tokenizer round trip | reconstruction) goes to every report_to tracker that takes "
            "images and to output_dir/samples/step-N.png, and the start and end ones to reconstructions.png (0 "
            "disables it; at most 16). The seconds each grid takes are logged, and summed up in the model card."
        },
    )
    reconstruction_steps: int = field(
        default=500,
        metadata={
            "help": "Reconstruct those images (and sample validation_prompts) every this many steps (0: only at the "
            "start, at evaluations and at the end)."
        },
    )
    validation_prompts: list[str] | None = field(
        default=None,
        metadata={
            "help": "Prompts sampled text-to-image (seeded) beside each reconstruction grid, into the trackers and "
            "samples/step-N.png; unset: none."
        },
    )
    reconstruction_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Generation settings for those reconstructions, passed to the adapter's reconstruct (e.g. "
            '{"guidance_scale": 1.0, "do_sample": false}); a JSON string on the command line.'
        },
    )

    # ---- the Hub ----
    hub_optional: bool = field(
        default=False,
        metadata={
            "help": "Keep training when the Hub cannot be reached: a failure to create the repo at start is logged "
            "instead of raised, the push is retried at each checkpoint and at the end, and every file stays in "
            "output_dir. A final push that still finds the Hub unreachable logs the command that retries it (reca "
            "push) instead of raising."
        },
    )
    eval_results: dict | str | None = field(
        default=None,
        metadata={
            "help": 'Evaluation results to publish in the model card, as {benchmark: score}, e.g. {"GenEval": 0.85, '
            '"DPGBench": 84.2}: a table in the card and model-index metadata. A score may also be {"value": 0.85, '
            '"dataset_id": "<the benchmark\'s Hub dataset>", "task_id": "<its task>"}: it is then also written as '
            ".eval_results/<benchmark>.yaml, the Hub's eval-results format. A JSON string on the command line."
        },
    )
    license: str | None = field(
        default=None,
        metadata={
            "help": "License of the trained model for its card's metadata (a Hub license id such as 'mit' or "
            "'apache-2.0', or 'other'); unset: none is stated. Respect the base model's license."
        },
    )

    # ---- resuming ----
    resume_from_hub: str | None = field(
        default=None,
        metadata={
            "help": "Resume from the checkpoint a run pushed to the Hub with hub_strategy 'checkpoint' or "
            "'all_checkpoints': a repo id (its last-checkpoint folder, else its newest checkpoint-N folder) is "
            "downloaded into output_dir/_resume_from_hub and training continues from it."
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
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "Resume training from a checkpoint: 'true' or 'latest' (the newest checkpoint-N folder in "
            "output_dir; an error when there is none) or the path of a checkpoint folder."
        },
    )
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={
            "help": "Kept False: a NaN or inf loss is logged as it is (True would log a running average instead)."
        },
    )
    dataloader_num_workers: int | str = field(
        default=AUTO,
        metadata={
            "help": "Processes that collate batches (decode and resize images, tokenise) beside training; 0 "
            "collates in the training process. 'auto' (resolved to a number when the config is built): the cores "
            "this process may use divided by the training processes on this node (LOCAL_WORLD_SIZE), minus 2 (the "
            "training process and its helper threads), at most 8 and at least 0; so 0 on a 2-core machine and 8 "
            "on a GPU node with 10 or more cores per GPU."
        },
    )
    cpu_threads: int | str = field(
        default=AUTO,
        metadata={
            "help": "Torch intra-op threads of a run on the CPU: 'auto' uses 1 for a tiny model (under 50M "
            "parameters, where more threads only add overhead and slow tenfold on a busy machine) unless "
            "OMP_NUM_THREADS is set, and torch's default otherwise; 0 keeps torch's default; a number sets it."
        },
    )
    dataloader_persistent_workers: bool | None = field(
        default=None,
        metadata={
            "help": "Keep the dataloader workers alive across epochs instead of starting them again each epoch. "
            "Unset: on whenever dataloader_num_workers > 0."
        },
    )
    dataloader_prefetch_factor: int | None = field(
        default=None,
        metadata={
            "help": "Batches each dataloader worker prepares ahead. Unset: 2 whenever dataloader_num_workers > 0 "
            "(PyTorch's default), else none."
        },
    )

    def __post_init__(self):
        self.normalise()
        errors = self.reca_errors()
        if self.bf16 and not self.use_cpu and not _bf16_accelerator_available():
            # So that a GPU recipe still builds (and validates) on a laptop; training refuses it unless use_cpu was
            # asked for (reca_hf.checks.bf16_without_accelerator).
            self.use_cpu = True
            self._bf16_without_accelerator = True
        if not isinstance(self.dataloader_num_workers, int):  # already named in errors; TrainingArguments compares it
            self.dataloader_num_workers = 0
        try:
            super().__post_init__()
        except ValueError as error:
            errors.append(str(error))
        if errors:
            raise ValueError("Invalid RecAConfig:\n" + "\n".join(f"- {e}" for e in errors))

    @property
    def image_columns(self) -> dict[str, str]:
        """The image column of each dataset of a run (train, i2t, t2i, eval); unset ones are ``image_column``."""
        return {source: getattr(self, field) or self.image_column for source, field in IMAGE_COLUMN_FIELDS.items()}

    # ---- normalising: values given as strings (the command line, JSON) become what the fields hold ----

    def normalise(self) -> None:
        """Turn string forms into the values the fields describe: resolutions of digits into ints, a
        comma-separated ``freeze`` into a list, JSON strings into dicts, task numbers into floats, tuples into
        lists. A value that cannot be converted is left as it is, for :meth:`reca_errors` to name."""
        self.condition_resolution = parse_resolution(self.condition_resolution)
        self.generation_resolution = parse_resolution(self.generation_resolution)
        self.freeze = parse_freeze(self.freeze)
        self.cond_dropout_prob = parse_probability(self.cond_dropout_prob)
        if isinstance(self.cache_frozen_features, bool | str):  # YAML's true/false, or "True" from a flag
            self.cache_frozen_features = str(self.cache_frozen_features).strip().lower()
        if isinstance(self.validation_prompts, str):  # one prompt
            self.validation_prompts = [self.validation_prompts]
        elif isinstance(self.validation_prompts, tuple):
            self.validation_prompts = list(self.validation_prompts)
        self.peak_flops_per_second = parse_peak_flops(self.peak_flops_per_second)
        self._normalise_workers()
        if isinstance(self.lora_target_modules, tuple):
            self.lora_target_modules = list(self.lora_target_modules)
        for name in _JSON_FIELDS:
            value = getattr(self, name)
            if isinstance(value, str):
                with contextlib.suppress(json.JSONDecodeError):
                    setattr(self, name, json.loads(value))
        for name in ("task_ratios", "task_weights"):
            value = getattr(self, name)
            if isinstance(value, dict) and all(_is_number(n) for n in value.values()):
                setattr(self, name, {key: float(number) for key, number in value.items()})

    def _normalise_workers(self) -> None:
        """``dataloader_num_workers='auto'`` becomes :func:`auto_num_workers`; with workers, persistent workers and
        prefetching are on unless set (persistent workers are safe: the collator's epoch is shared memory)."""
        workers = parse_workers(self.dataloader_num_workers)
        if workers == AUTO:
            workers = auto_num_workers()
        self.dataloader_num_workers = workers
        if not isinstance(workers, int):
            return  # named by reca_errors
        if self.dataloader_persistent_workers is None:
            self.dataloader_persistent_workers = workers > 0
        if self.dataloader_prefetch_factor is None and workers > 0:
            self.dataloader_prefetch_factor = 2

    # ---- validating: every problem of the (normalised) fields, each naming its field; nothing is changed ----

    def reca_errors(self) -> list[str]:
        """Every problem of the RecA fields that the fields alone show (no file, network or model is read: see
        :func:`reca_hf.checks.run_errors` for those); each names its field."""
        errors = []
        for name in ("condition_resolution", "generation_resolution"):
            value = getattr(self, name)
            if value != AUTO and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                errors.append(f"{name}={value!r}: use 'auto' or a positive number of pixels such as 384.")
        errors += _choice_error("condition_bottleneck", self.condition_bottleneck, BOTTLENECKS)
        errors += _choice_error("target_fit", self.target_fit, (AUTO, *FITS))
        errors += _choice_error("condition_fit", self.condition_fit, (AUTO, *FITS))
        errors += _choice_error("condition_source", self.condition_source, (AUTO, *CONDITION_SOURCES))
        errors += _choice_error("condition_interpolation", self.condition_interpolation, (AUTO, *INTERPOLATIONS))
        if self.condition_source == "image" and self.condition_interpolation in INTERPOLATIONS:
            errors.append(interpolation_error(self.condition_interpolation))
        if not isinstance(self.blur_factor, int) or self.blur_factor < 2:
            errors.append(f"blur_factor={self.blur_factor!r}: use an integer of at least 2 (e.g. 4 or 8).")
        dropout = self.cond_dropout_prob
        if dropout != AUTO and not (_is_number(dropout) and 0.0 <= dropout < 1.0):
            errors.append(f"cond_dropout_prob={dropout!r}: use 'auto' or a probability in [0, 1), e.g. 0.1.")
        errors += self._freeze_errors()
        errors += _choice_error("cache_frozen_features", self.cache_frozen_features, CACHE_MODES)
        errors += _choice_error("model_dtype", self.model_dtype, DTYPES)
        if self.adapter is not None and not _ADAPTER_RE.match(str(self.adapter)):
            errors.append(
                f"adapter={self.adapter!r}: use a registered adapter name such as 'janus' or a class as "
                "'my_pkg.my_module:MyAdapter'."
            )
        peak = self.peak_flops_per_second
        if peak not in (AUTO, None) and not (_is_number(peak) and peak > 0):
            errors.append(f"peak_flops_per_second={peak!r}: use 'auto', null (no mfu) or a FLOP/s number such as "
                          "989e12.")  # fmt: skip
        workers = self.dataloader_num_workers
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            errors.append(f"dataloader_num_workers={workers!r}: use 'auto', 0 (collate in the training process) or a "
                          "positive number of worker processes.")  # fmt: skip
        threads = self.cpu_threads = parse_workers(self.cpu_threads)
        if threads != AUTO and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
            errors.append(f"cpu_threads={threads!r}: use 'auto', 0 (torch's default) or a number of threads.")
        count = self.num_reconstruction_images
        if not isinstance(count, int) or not 0 <= count <= MAX_GRID_IMAGES:
            errors.append(f"num_reconstruction_images={count!r}: use 0 (no grid) up to {MAX_GRID_IMAGES} (each image "
                          "is generated twice, at the start and at the end).")  # fmt: skip
        if not isinstance(self.reconstruction_steps, int) or self.reconstruction_steps < 0:
            errors.append(f"reconstruction_steps={self.reconstruction_steps!r}: use 0 or a positive number of steps.")
        prompts = self.validation_prompts
        if prompts is not None and not (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts)):
            errors.append(f"validation_prompts={prompts!r}: use a list of prompt strings, e.g. ['a red circle'].")
        if self.max_eval_samples is not None and self.max_eval_samples < 1:
            errors.append(f"max_eval_samples={self.max_eval_samples!r}: use a positive integer or leave it unset.")
        for name in _JSON_FIELDS:
            errors += _json_error(name, getattr(self, name))
        if self.reconstruction_kwargs is not None and not isinstance(self.reconstruction_kwargs, dict | str):
            errors.append(f"reconstruction_kwargs={self.reconstruction_kwargs!r}: use a mapping such as {{}}.")
        errors += _choice_error("collapse_action", self.collapse_action, COLLAPSE_ACTIONS)
        if not isinstance(self.collapse_probe_steps, int) or self.collapse_probe_steps < 1:
            errors.append(f"collapse_probe_steps={self.collapse_probe_steps!r}: use a positive integer.")
        if not isinstance(self.collapse_probe_images, int) or self.collapse_probe_images < 0:
            errors.append(f"collapse_probe_images={self.collapse_probe_images!r}: use 0 (off) or a positive integer.")
        errors += _choice_error("nonfinite_action", self.nonfinite_action, NONFINITE_ACTIONS)
        if (
            isinstance(self.max_nonfinite_steps, bool)
            or not isinstance(self.max_nonfinite_steps, int)
            or (self.max_nonfinite_steps < 0)
        ):
            errors.append(f"max_nonfinite_steps={self.max_nonfinite_steps!r}: use 0 or a positive integer such as 10.")
        if self.resume_from_hub is not None and not looks_like_repo_id(self.resume_from_hub):
            errors.append(f"resume_from_hub={self.resume_from_hub!r}: give a Hub repo id such as 'user/my-run'.")
        if self.resume_from_hub is not None and self.resume_from_checkpoint is not None:
            errors.append(
                f"resume_from_hub={self.resume_from_hub!r} and resume_from_checkpoint={self.resume_from_checkpoint!r}: "
                "set only one of them."
            )
        for name in ("task_ratios", "task_weights"):
            errors += self._task_dict_errors(name)
        errors += _choice_error("task_loss_reduction", self.task_loss_reduction, TASK_LOSS_REDUCTIONS)
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                errors.append(f"{name}={value!r}: use a positive integer such as 8.")
        if self.dataset_streaming and not (isinstance(self.max_steps, int) and self.max_steps > 0):
            errors.append(
                f"max_steps={self.max_steps!r}: dataset_streaming needs max_steps (a positive number of optimizer "
                "steps), since a stream has no length to count epochs in; set max_steps, or dataset_streaming: false."
            )
        if self.group_by_aspect and self.dataset_streaming:
            errors.append(
                "group_by_aspect=True: it reads every training image's size before the first step, and a streamed "
                "dataset (dataset_streaming: true) is read in its own order; set one of them to false."
            )
        if self.max_train_samples is not None and self.max_train_samples < 1:
            errors.append(f"max_train_samples={self.max_train_samples!r}: use a positive integer or leave it unset.")
        errors += self._lora_errors()
        errors += self._eval_results_errors()
        return errors

    def _freeze_errors(self) -> list[str]:
        freeze = self.freeze
        if freeze in ("auto", "none"):
            return []
        if not isinstance(freeze, list) or not freeze:
            return [f"freeze={freeze!r}: use 'auto', 'none', or a list of module-name patterns."]
        if {"auto", "none"} & set(freeze):
            return [f"freeze={freeze!r}: 'auto' and 'none' cannot be mixed with patterns."]
        return [f"freeze pattern {pattern!r} {problem}" for pattern in freeze if (problem := _regex_problem(pattern))]

    def _task_dict_errors(self, name: str) -> list[str]:
        value = getattr(self, name)
        if value is None or isinstance(value, str):  # a string is invalid JSON, named by _json_error
            return []
        example = '{"reconstruction": 1, "image_to_text": 1}'
        if not isinstance(value, dict):
            return [f"{name}={value!r}: use a mapping of task to number such as {example}."]
        errors = [f"{name}: unknown task {key!r}; tasks are {', '.join(TASKS)}." for key in value if key not in TASKS]
        for key, number in value.items():
            if not _is_number(number) or number < 0:
                errors.append(f"{name}[{key!r}]={number!r}: use a non-negative number.")
        if not errors and name == "task_ratios" and not any(value.values()):
            errors.append(f"task_ratios={value!r}: at least one task needs a positive share, e.g. {example}.")
        return errors

    def _lora_errors(self) -> list[str]:
        errors = []
        if isinstance(self.lora_r, bool) or not isinstance(self.lora_r, int) or self.lora_r < 1:
            errors.append(f"lora_r={self.lora_r!r}: use a positive integer such as 16.")
        if not _is_number(self.lora_alpha) or self.lora_alpha <= 0:
            errors.append(f"lora_alpha={self.lora_alpha!r}: use a positive number such as 32 (often 2 x lora_r).")
        if not 0.0 <= self.lora_dropout < 1.0:
            errors.append(f"lora_dropout={self.lora_dropout!r}: use a probability in [0, 1), e.g. 0.05.")
        targets = self.lora_target_modules
        if isinstance(targets, list):
            if not targets or not all(isinstance(t, str) and t for t in targets):
                errors.append(f"lora_target_modules={targets!r}: a list must hold one or more module names.")
        elif not isinstance(targets, str) or not targets:
            errors.append(
                f"lora_target_modules={targets!r}: use {' or '.join(map(repr, LORA_TARGET_MODES))}, a regular "
                "expression or a list of module names."
            )
        elif targets not in LORA_TARGET_MODES and (problem := _regex_problem(targets)):
            errors.append(f"lora_target_modules={targets!r} {problem}")
        if self.base_model_id is not None and not looks_like_repo_id(self.base_model_id):
            errors.append(base_model_id_error(self.base_model_id))
        return errors

    def _eval_results_errors(self) -> list[str]:
        value = self.eval_results
        if value is None or isinstance(value, str):  # a string is invalid JSON, named by _json_error
            return []
        example = '{"GenEval": 0.85, "DPGBench": 84.2}'
        if not isinstance(value, dict) or not value:
            return [f"eval_results={value!r}: use a mapping of benchmark name to score such as {example}."]
        errors = []
        for name, score in value.items():
            if not isinstance(name, str) or not name.strip():
                errors.append(f"eval_results: benchmark name {name!r} must be a non-empty string.")
            if isinstance(score, dict):
                errors += _eval_entry_errors(name, score)
            elif not _is_number(score):
                errors.append(f"eval_results[{name!r}]={score!r}: use a number, e.g. {example}.")
        return errors

    def __getstate__(self) -> dict:
        # What pickling writes (training_args.bin, which the Trainer saves into every checkpoint and pushes)
        # carries no hub_token; the token stays on this object only.
        state = dict(self.__dict__)
        state["hub_token"] = None
        return state

    def __copy__(self) -> RecAConfig:
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        return clone

    def __deepcopy__(self, memo: dict) -> RecAConfig:
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))  # __getstate__ is for files: a copy keeps the token
        return clone


# ---- the string forms, parsed once: by RecAConfig.normalise and by the `reca` command line ----------------


def parse_resolution(value: int | str) -> int | str:
    """A resolution given as a string of digits becomes an int; anything else is returned as it is."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return value


def parse_probability(value: float | str) -> float | str:
    """A probability given as a number string becomes a float; anything else ('auto') is returned as it is."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    return value


def parse_freeze(value: str | list[str] | tuple[str, ...]) -> str | list[str]:
    """``freeze`` as the field holds it: 'auto', 'none', or a list of patterns (a comma-separated string is split)."""
    if isinstance(value, str):
        patterns = [p.strip() for p in value.split(",") if p.strip()]
        return patterns[0] if patterns in (["auto"], ["none"]) else patterns
    if isinstance(value, list | tuple):
        patterns = list(value)
        return patterns[0] if patterns in (["auto"], ["none"]) else patterns
    return value


def parse_peak_flops(value: float | str | None) -> float | str | None:
    """``peak_flops_per_second`` as a string: a number ('989e12') becomes a float, 'none'/'null' None."""
    if isinstance(value, str) and value.strip().lower() in ("none", "null", ""):
        return None
    return parse_probability(value)


def parse_workers(value: int | str) -> int | str:
    """``dataloader_num_workers`` given as a string of digits becomes an int; 'auto' and the rest stay as they are."""
    return parse_resolution(value)


MAX_AUTO_WORKERS = 8  # beyond this, more workers rarely feed one accelerator faster and cost memory each


def auto_num_workers(cores: int | None = None, local_processes: int | None = None) -> int:
    """What ``dataloader_num_workers='auto'`` becomes: the cores each training process on this node may use
    (``os.sched_getaffinity``, the cores this process is allowed, divided by ``LOCAL_WORLD_SIZE``, else
    ``WORLD_SIZE``, else 1), minus 2 for the training process itself and its helper threads (pin memory, the
    accelerator's launch queue), clamped to ``0..8``."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if local_processes is None:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE") or 1)
    return max(0, min(MAX_AUTO_WORKERS, cores // max(1, local_processes) - 2))


# Fields whose command-line string needs a parser of its own (the annotation is a union the argument parser
# cannot express); every other field is parsed by its annotation.
STRING_PARSERS = {
    "condition_resolution": parse_resolution,
    "generation_resolution": parse_resolution,
    "freeze": parse_freeze,
    "cond_dropout_prob": parse_probability,
    "dataloader_num_workers": parse_workers,
    "cpu_threads": parse_workers,
    "peak_flops_per_second": parse_peak_flops,
    "lora_target_modules": str,  # one mode or regular expression; lists come from Python or YAML
}


EVAL_ENTRY_KEYS = ("value", "dataset_id", "task_id", "notes", "source_url")  # an eval_results entry as a mapping


def _eval_entry_errors(name: str, entry: dict) -> list[str]:
    """An eval_results entry given as a mapping: a numeric "value", and the Hub ids of the benchmark."""
    example = '{"value": 0.85, "dataset_id": "org/geneval", "task_id": "overall"}'
    errors = [f"eval_results[{name!r}]: unknown key {key!r} (use {', '.join(EVAL_ENTRY_KEYS)})"
              for key in entry if key not in EVAL_ENTRY_KEYS]  # fmt: skip
    if not _is_number(entry.get("value")):
        errors.append(f"eval_results[{name!r}]: 'value' must be a number, e.g. {example}.")
    for key in EVAL_ENTRY_KEYS[1:]:
        if key in entry and not isinstance(entry[key], str):
            errors.append(f"eval_results[{name!r}][{key!r}]={entry[key]!r}: use a string, e.g. {example}.")
    return errors


def base_model_id_error(value: str) -> str:
    return (
        f"base_model_id={value!r}: give the base model's Hub id such as 'deepseek-community/Janus-Pro-7B' "
        "(not a local path)."
    )


def looks_like_repo_id(name: str | None) -> bool:
    """True for a name the Hub accepts as a repository id: a namespace and a name, not a 'tiny:' spec. (Whether a
    local folder of that name exists, which would make it a path, is :func:`reca_hf.loading.is_hub_id`'s part.)"""
    if not isinstance(name, str) or name.count("/") != 1 or name.startswith(TINY_PREFIX):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _regex_problem(pattern: str) -> str | None:
    try:
        re.compile(pattern)
    except re.error as error:
        return f"is not a valid regular expression ({error})."
    return None


def _choice_error(name: str, value, choices: tuple[str, ...]) -> list[str]:
    return [] if value in choices else [f"{name}={value!r}: choose one of {', '.join(choices)}."]


def _json_error(name: str, value) -> list[str]:
    """A dict field still holding a string after normalising is invalid JSON: say why."""
    if not isinstance(value, str):
        return []
    try:
        json.loads(value)
    except json.JSONDecodeError as error:
        return [f"{name}={value!r}: not valid JSON ({error})."]
    return [f"{name}={value!r}: use a JSON mapping."]


def _bf16_accelerator_available() -> bool:
    return is_torch_bf16_gpu_available() or is_torch_xla_available()
