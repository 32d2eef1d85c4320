"""The `reca` command: `reca train RECIPE [--field value ...]`, `reca validate RECIPE [--field value ...]`,
`reca push OUTPUT_DIR --repo-id ID` and `reca card OUTPUT_DIR`.

Recipes are YAML files whose keys are `RecAConfig` fields (plus an optional `env:` block). Both `reca train`
and `reca validate` read them with :func:`reca_hf.recipe.load_recipe` (trl's `TrlParser`): command-line flags
override the recipe, and unknown keys, wrong types and YAML syntax errors are all reported, each by its key.
`reca train RECIPE --accelerate_config NAME [--num_processes N ...]` relaunches the run through
`accelerate launch`, as `trl sft --accelerate_config` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from importlib import import_module
from pathlib import Path

import yaml

# optional packages a run may use (trackers, sharding, quantisation, attention kernels), listed by `reca env`
OPTIONAL_PACKAGES = ("tensorboard", "wandb", "deepspeed", "bitsandbytes", "flash-attn")

# `reca convert <name>`: each architecture's reca_hf/models/<name>/convert.py provides build_parser(parser) and
# run(args); a port adds its line here.
CONVERTERS = {
    "harmon": (
        "a Harmon .pth and the MAR kl16.ckpt",
        "Convert a released Harmon .pth (harmon_0.5b.pth, harmon_1.5b.pth, or a RecA release in that format) and the "
        "MAR kl16.ckpt autoencoder into a HarmonModel folder.",
    ),
    "bagel": (
        "the authors' BAGEL folder (llm/vit configs, ema or RecA weights, ae.safetensors)",
        "Convert the authors' BAGEL folder (llm_config.json, vit_config.json, ema.safetensors or --weights, "
        "ae.safetensors) into a BagelModel folder.",
    ),
    "openuni": (
        "an OpenUni .pth on top of InternVL3 and SANA",
        "Convert a released OpenUni .pth (meta_queries, connector, projector, transformer) on top of the public "
        "InternVL3-*-hf and SANA checkpoints into an OpenUniModel folder.",
    ),
    "showo": (
        "a Show-o release (VQ or CLIP variant) with its MAGVIT-v2, or MAGVIT-v2 alone",
        "Convert the authors' Show-o folder (show-o, show-o-512x512, show-o-w-clip-vit(-512x512), the RecA releases) "
        "with showlab/magvitv2 (and CLIP ViT-L/14-336 for the CLIP variant) into a ShowoModel folder, or "
        "showlab/magvitv2 alone into a MagvitV2 folder (--magvit-only).",
    ),
}


def _parser():
    """The parser of `reca train` and `reca validate` (:func:`reca_hf.recipe.recipe_parser`)."""
    from .recipe import recipe_parser

    return recipe_parser()


def parse_recipe(recipe: str | None, overrides: list[str] | None = None):
    """Parse a recipe (or none: flags alone) plus command-line overrides into a `RecAConfig`
    (:func:`reca_hf.recipe.load_recipe`); every problem found is one ``SystemExit`` listing them all."""
    from .recipe import RecipeError, load_recipe

    try:
        return load_recipe(recipe, overrides)
    except RecipeError as error:
        raise SystemExit(_problems_text(recipe, error.problems)) from None


def _problems_text(recipe: str | None, problems: list[str]) -> str:
    """``reca: RECIPE: N problem(s):`` and one ``  - problem`` line each (the same lines as reca validate)."""
    where = recipe or "flags"
    if len(problems) == 1:
        return f"reca: {where}: {problems[0]}"
    return f"reca: {where}: {len(problems)} problem(s):\n" + "\n".join(f"  - {problem}" for problem in problems)


def train(recipe: str | None, overrides: list[str]) -> None:
    from .freeze import format_table
    from .hub import HubPushError
    from .trainer import NonFiniteLossError, NonFiniteWeightsError, RecATrainer

    config = parse_recipe(recipe, overrides)
    if not config.model_name_or_path or not config.dataset_name:
        raise SystemExit(
            "reca train: set model_name_or_path and dataset_name (in a recipe, or as --model_name_or_path ... "
            "--dataset_name ...)"
        )
    dataset = _recipe_dataset(config, "train")
    extra = {f"{source}_dataset": data for source in ("i2t", "t2i", "eval")
             if (data := _recipe_dataset(config, source)) is not None}  # fmt: skip
    trainer = RecATrainer(config.model_name_or_path, args=config, train_dataset=dataset, **extra)
    _check_processes_train_together(trainer)
    main_process = trainer.is_world_process_zero()  # the summary lines are the main process's alone
    if main_process:
        print(
            format_table(trainer.parameter_table, f"RecA parameters ({trainer.adapter.name}, freeze={config.freeze!r})")
        )
    try:
        trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
        trainer.save_state()
        trainer.save_model()  # with push_to_hub, also the final push (card included)
    except (HubPushError, NonFiniteLossError, NonFiniteWeightsError) as error:
        raise SystemExit(f"reca train: {error}") from None
    if not config.push_to_hub:
        trainer.create_model_card()
    if not main_process:
        return
    for name in ("reconstruction_loss", "image_to_text_loss", "text_to_image_loss"):
        losses = [log[name] for log in trainer.state.log_history if name in log]
        if losses:
            print(f"{name}: {losses[0]:.4f} (first log) -> {losses[-1]:.4f} (last log)")
    print(f"Saved to {config.output_dir}")


_SYNTHETIC_SEED_OFFSETS = {"train": 0, "i2t": 1, "t2i": 1, "eval": 2}  # synthetic shapes: other images per role


def _recipe_dataset(config, source: str):
    """The dataset a recipe names for ``source`` (train, i2t, t2i or eval: ``dataset_name``, ``i2t_dataset_name``,
    ...), with its config, split, image column and sample cap; None when it names none. Image-to-text and
    text-to-image sets read captions; the eval set is never streamed (64 synthetic shapes by default)."""
    from .data import SYNTHETIC, load_image_dataset

    prefix = "" if source == "train" else f"{source}_"
    name = getattr(config, f"{prefix}dataset_name")
    if not name:
        return None
    max_samples = {
        "train": config.max_train_samples,
        "eval": config.max_eval_samples or (64 if name == SYNTHETIC else None),
    }.get(source)
    return load_image_dataset(
        name,
        getattr(config, f"{prefix}dataset_config"),
        getattr(config, f"{prefix}dataset_split"),
        config.image_columns[source],
        max_samples,
        seed=config.seed + _SYNTHETIC_SEED_OFFSETS[source],
        text_column=config.caption_column if source in ("i2t", "t2i") else None,
        source=source,
        streaming=config.dataset_streaming and source != "eval",
    )


DATASET_NAME_FIELDS = ("dataset_name", "i2t_dataset_name", "t2i_dataset_name", "eval_dataset_name")

# ---- multi-process launches ----

ACCELERATE_CONFIGS = Path(__file__).resolve().parent / "accelerate_configs"
_SHARDED = ("FSDP", "DEEPSPEED")


def accelerate_config_path(name: str) -> Path:
    """An accelerate config file: a path as given, or the name of one shipped in reca_hf/accelerate_configs
    (e.g. 'multi_gpu', 'fsdp2', 'zero3'), as trl's --accelerate_config resolves names."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = ACCELERATE_CONFIGS / f"{name.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in ACCELERATE_CONFIGS.glob("*.yaml")))
    raise SystemExit(
        f"reca train: --accelerate_config {name!r} is neither a file nor a config shipped with reca_hf; "
        f"give a path to an accelerate config file or one of: {names}"
    )


def split_launch_args(args: list[str]) -> tuple[str, list[str], list[str]]:
    """Split `reca train` arguments into (the --accelerate_config value, `accelerate launch` flags such as
    --num_processes, recipe overrides). A flag that is both a launch flag and a RecAConfig field
    (--gradient_accumulation_steps, --debug) stays a recipe override, as in trl."""
    from accelerate.commands.launch import launch_command_parser

    from .config import RecAConfig

    fields = {f"--{f.name}" for f in dataclasses.fields(RecAConfig)}
    takes_value = {"--accelerate_config": True}
    for action in launch_command_parser()._actions:
        for option in action.option_strings:
            if option.startswith("--") and option not in fields:
                takes_value[option] = action.nargs != 0
    config, launch, overrides = None, [], []
    rest = iter(args)
    for arg in rest:
        flag, inline, value = arg.partition("=")
        if flag not in takes_value:
            overrides.append(arg)
            continue
        token = [arg]
        if takes_value[flag] and not inline:
            value = next(rest, None)
            if value is None:
                raise SystemExit(f"reca train: {flag} needs a value")
            token.append(value)
        if flag == "--accelerate_config":
            config = value
        else:
            launch += token
    if config is None:
        raise SystemExit("reca train: --accelerate_config needs a value: a shipped config name or a file")
    return config, launch, overrides


def launch(recipe: str | None, args: list[str]) -> None:
    """Check the recipe here, then run `reca train RECIPE OVERRIDES` in every process that `accelerate launch`
    starts with the chosen config and launch flags."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    name, launch_args, overrides = split_launch_args(args)
    config_file = accelerate_config_path(name)
    settings = yaml.safe_load(config_file.read_text()) or {}
    config = parse_recipe(recipe, overrides)  # recipe errors before any process starts
    on_cpu = bool(settings.get("use_cpu")) or config.use_cpu or "--cpu" in launch_args
    kind = str(settings.get("distributed_type", "NO")).upper()
    if on_cpu and kind in _SHARDED:
        raise SystemExit(
            f"reca train: {config_file} asks for {kind} on CPU processes; accelerate runs FSDP and DeepSpeed only on "
            "accelerators (on CPUs it would fall back to plain DDP without saying so). On CPUs use "
            "--accelerate_config multi_cpu; on GPUs drop use_cpu."
        )
    if on_cpu:
        # The torchrun launcher does not pass use_cpu on; without it CPU-only processes would not form a group.
        os.environ["ACCELERATE_USE_CPU"] = "true"
    train_args = [recipe, *overrides] if recipe is not None else overrides
    command = [*launch_args, "--config_file", str(config_file), "--module", "reca_hf.cli", "train", *train_args]
    launch_command(launch_command_parser().parse_args(command))


def _check_processes_train_together(trainer) -> None:
    """Several launched processes must form one run; otherwise each would train alone into the same output_dir."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    joined = trainer.accelerator.num_processes
    if launched > 1 and joined != launched:
        raise SystemExit(
            f"reca train: {launched} processes were launched (WORLD_SIZE={launched}), but they did not join one "
            f"run ({joined} process in this one): each would train alone. On CPUs set use_cpu: true (--use_cpu "
            "true) or launch with --accelerate_config multi_cpu."
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not trainer.is_fsdp_enabled:
        raise SystemExit(
            f"reca train: FSDP was asked for, but accelerate set up {trainer.accelerator.distributed_type} (FSDP runs "
            "only on accelerators): use a DDP config such as --accelerate_config multi_cpu on CPUs."
        )


def validate(recipe: str | None, check_images: bool = False, overrides: list[str] | None = None) -> list[str]:
    """Every problem of a recipe and its ``--field value`` overrides, found without loading weights (empty when
    the recipe is valid). Parsing is `reca train`'s own (:func:`reca_hf.recipe.load_recipe`: the same parser,
    overrides and ``env:`` block), so both name the same problems; what `train` needs beyond the recipe (the
    trackers installed, the Hub reachable, a token to push) is checked too (:mod:`reca_hf.preflight`).

    ``check_images`` also decodes every image of every dataset the recipe names, reporting each one that fails
    by dataset, row and file (one decode per row: slow on large datasets).
    """
    return validate_report(recipe, check_images, overrides)[0]


def validate_report(
    recipe: str | None, check_images: bool = False, overrides: list[str] | None = None
) -> tuple[list[str], list[str]]:
    """``(problems, notes)``: :func:`validate`'s problems, and what could not be checked (offline), in words."""
    from .preflight import preflight
    from .recipe import RecipeError, load_recipe

    try:
        config = load_recipe(recipe, overrides)
    except RecipeError as error:
        return [*error.problems, *_dataset_errors(error.values.get)], []
    notes: list[str] = []
    errors = _model_errors(config, notes) + _dataset_errors(lambda name: getattr(config, name, None))
    if not config.dataset_name:
        errors.append("dataset_name is not set: give a datasets hub id, a local folder or 'synthetic_shapes'")
    service_errors, service_notes = preflight(config)
    errors += service_errors
    notes += service_notes
    if check_images and not errors:
        errors += _image_errors(config)
    return errors, notes


def _bf16_note(recipe: str | None, overrides: list[str] | None = None) -> str | None:
    """On a machine without an accelerator, what training a bf16 recipe here would need (validating is fine)."""
    from .checks import bf16_without_accelerator

    return bf16_without_accelerator(parse_recipe(recipe, overrides))


def _image_errors(config) -> list[str]:
    """Every image of the recipe's datasets that does not decode, by dataset field, row and file."""
    from .data import find_bad_images, load_image_dataset

    errors = []
    for source, field in zip(("train", "i2t", "t2i", "eval"), DATASET_NAME_FIELDS):
        name = getattr(config, field)
        if name is None:
            continue
        prefix = field.removesuffix("dataset_name")
        column = config.image_columns[source]
        dataset = load_image_dataset(
            name, getattr(config, f"{prefix}dataset_config"), getattr(config, f"{prefix}dataset_split"), column,
            source=source,
        )  # fmt: skip
        errors += [f"{field}={name!r} {problem}" for problem in find_bad_images(dataset, column,
                                                                                 config.max_image_pixels)]  # fmt: skip
    return errors


def _model_errors(config, notes: list[str] | None = None) -> list[str]:
    """The trainer's own checks of the fields that need the model (reca_hf.checks), on its config alone. A Hub
    model that cannot be read because the Hub is switched off goes into ``notes`` as not checked."""
    from .adapters import adapter_class_for, get_adapter, resolve_adapter_class
    from .checks import file_errors, run_errors
    from .config import TINY_PREFIX

    name = config.model_name_or_path
    if not name:
        return ["model_name_or_path is not set: give a hub id, a local folder or 'tiny:janus'", *file_errors(config)]
    try:
        cls = resolve_adapter_class(config.adapter) if config.adapter is not None else None
        if name.startswith(TINY_PREFIX):
            from .factory import tiny_umm

            model, processor = tiny_umm(name[len(TINY_PREFIX) :])
            adapter = get_adapter(model.config, processor, adapter=config.adapter)
        else:
            from transformers import PretrainedConfig

            options = {"trust_remote_code": config.trust_remote_code, "revision": config.model_revision}
            if cls is None:
                values, _ = PretrainedConfig.get_config_dict(name, revision=config.model_revision)
                cls = adapter_class_for(values.get("model_type"))
            adapter = cls(cls.load_config(name, **options))
    except (ValueError, TypeError) as error:
        return [*str(error).splitlines(), *file_errors(config)]
    except OSError as error:
        from .preflight import offline_model_note

        note = offline_model_note(name)
        if note is not None and notes is not None:
            notes.append(note)
            return file_errors(config)
        return [f"model_name_or_path={name!r}: its config could not be read ({error})", *file_errors(config)]
    return run_errors(config, adapter)


def _dataset_errors(get) -> list[str]:
    """Missing and empty local dataset folders (``get(field)`` reads a field's value)."""
    from .data import local_dataset_problem

    problems = [local_dataset_problem(get(field), field) for field in DATASET_NAME_FIELDS]
    return [problem for problem in problems if problem]


def _eval_results(text: str | None) -> dict | None:
    """A --eval-results value, checked as RecAConfig checks its eval_results field."""
    if text is None:
        return None
    from .config import RecAConfig

    try:
        return RecAConfig(output_dir="unused", report_to="none", eval_results=text).eval_results
    except ValueError as error:
        raise SystemExit(f"reca: --eval-results: {str(error).splitlines()[-1].removeprefix('- ')}") from None


def push(
    output_dir: str,
    repo_id: str,
    private: bool,
    adapter_only: bool,
    eval_results: str | None,
    license: str | None = None,  # noqa: A002 - the card field's name
) -> None:
    from .hub import hub_errors, push_run, retry_command

    try:
        info = push_run(output_dir, repo_id, private=private, adapter_only=adapter_only,
                        eval_results=_eval_results(eval_results), license=license)  # fmt: skip
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"reca push: {error}") from None
    except hub_errors() as error:
        raise SystemExit(
            f"reca push: the push to {repo_id} failed ({type(error).__name__}: {error}). Nothing was changed in "
            f"{output_dir}; run again: {retry_command(output_dir, repo_id)}"
        ) from None
    print(f"Pushed {output_dir} to {info.commit_url}")


def card(output_dir: str, eval_results: str | None, license: str | None = None) -> None:  # noqa: A002
    from .hub import CARD_FILE, update_run_card

    try:
        update_run_card(output_dir, eval_results=_eval_results(eval_results), license=license)
    except FileNotFoundError as error:
        raise SystemExit(f"reca card: {error}") from None
    print(f"Wrote {Path(output_dir) / CARD_FILE}")


def _load_for_generation(model: str, dtype: str, device: str | None):
    from .factory import load_for_generation

    try:
        return load_for_generation(model, dtype=dtype, device=device)
    except (OSError, ValueError) as error:
        raise SystemExit(
            f"reca: MODEL {model!r} could not be loaded ({error}); give a saved run folder, a Hub id, a LoRA adapter "
            "folder or 'tiny:<arch>'"
        ) from None


def _json_mapping(text: str | None, flag: str) -> dict:
    import json

    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise SystemExit(
            f"reca: {flag}: not JSON ({error.msg}); e.g. {flag} '{{\"num_inference_steps\": 20}}'"
        ) from None
    if not isinstance(value, dict):
        raise SystemExit(f"reca: {flag}: give a JSON object such as '{{\"temperature\": 1.0}}'")
    return value


def sample(args) -> None:
    """`reca sample MODEL --prompts FILE --layout L --out DIR`: text-to-image in a benchmark's folder layout."""
    from .sampling import read_prompts, sample_prompts

    try:
        prompts = read_prompts(args.prompts, args.layout)
    except (OSError, ValueError) as error:
        raise SystemExit(f"reca sample: {error}") from None
    _, _, adapter = _load_for_generation(args.model, args.dtype, args.device)
    try:
        stats = sample_prompts(
            adapter,
            prompts,
            args.out,
            args.layout,
            num_images_per_prompt=args.num_images_per_prompt,
            batch_size=args.batch_size,
            seed=args.seed if args.seed is not None else 0,
            guidance_scale=args.guidance_scale,
            resolution=args.resolution,
            **_json_mapping(args.sampler, "--sampler"),
        )
    except (ValueError, NotImplementedError) as error:
        raise SystemExit(f"reca sample: {error}") from None
    print(
        f"{args.out}: {stats['images']} images for {stats['sampled']} prompts ({stats['skipped']} of "
        f"{stats['prompts']} already done), {args.layout} layout"
    )


def reconstruct(args) -> None:
    """`reca reconstruct MODEL IMAGES... --out DIR`: each image through the model's understanding and back, by
    default with the run's own views, seed and grid settings (its reca_run.json), as the card's grid was made."""
    from .images import resolve_views
    from .sampling import reconstruct_files, sampler_settings

    _, _, adapter = _load_for_generation(args.model, args.dtype, args.device)
    settings = _run_reca_settings(args.model)
    grid = settings.get("reconstruction_kwargs") or {}
    generation = {k: v for k, v in grid.items() if k in {"guidance_scale", *sampler_settings(adapter)}}
    generation.update(_json_mapping(args.sampler, "--sampler"))
    if args.guidance_scale is not None:
        generation["guidance_scale"] = args.guidance_scale
    seed = args.seed if args.seed is not None else int(settings.get("seed", 0))
    try:
        views = resolve_views(adapter, *_reconstruction_views(args, settings))
        written = reconstruct_files(adapter, args.images, args.out, views=views, batch_size=args.batch_size,
                                    seed=seed, side_by_side=args.side_by_side, **generation)  # fmt: skip
    except (OSError, ValueError, TypeError) as error:
        raise SystemExit(f"reca reconstruct: {error}") from None
    print(f"{args.out}: {len(written)} reconstructions")


def _run_reca_settings(model: str) -> dict:
    """The ``reca`` block of a saved run's reca_run.json ({} for a model that is not a run folder)."""
    import json

    from .hub import RUN_FILE

    run = Path(model).expanduser() / RUN_FILE
    return json.loads(run.read_text()).get("reca", {}) if run.is_file() else {}


def _reconstruction_views(args, settings: dict) -> tuple:
    """:func:`~reca_hf.images.resolve_views`'s arguments: the flags, else the run's own, else 'auto' and resize."""
    from .config import parse_resolution

    condition = args.condition_resolution or settings.get("condition_resolution", "auto")
    bottleneck = args.condition_bottleneck or settings.get("condition_bottleneck", "resize")
    return (
        parse_resolution(condition),
        settings.get("generation_resolution", "auto"),
        bottleneck,
        settings.get("blur_factor", 4),
        False,
        settings.get("target_fit") or "auto",
        settings.get("condition_fit") or "auto",
        settings.get("condition_source") or "auto",
        settings.get("condition_interpolation") or "auto",
    )


def _generation_parser(commands, name: str, **kwargs):
    """A subcommand that loads MODEL to generate, with the options every such command shares."""
    parser = commands.add_parser(name, **kwargs)
    parser.add_argument("model", help="a saved run folder, a Hub id, a LoRA adapter folder or 'tiny:<arch>'")
    parser.add_argument("--out", required=True, help="the folder to write into")
    parser.add_argument("--seed", type=int, default=None, help="seed of the first batch (batch b draws with seed + "
                        "b); default: the run's seed for a run folder, else 0")  # fmt: skip
    parser.add_argument(
        "--batch_size", type=int, default=1 if name == "sample" else 4, help="prompts or images per call"
    )
    parser.add_argument(
        "--guidance_scale", type=float, default=None, help="classifier-free guidance (default: the architecture's)"
    )
    parser.add_argument(
        "--sampler", help="the architecture's sampler settings as JSON, e.g. '{\"num_inference_steps\": 20}'"
    )
    parser.add_argument(
        "--dtype", default="float32", help="dtype the weights load in (float32, bfloat16, float16, auto)"
    )
    parser.add_argument("--device", default=None, help="e.g. cuda; default: where the weights load (the CPU)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """The `reca` command. Errors are one ``reca: ...`` line; ``reca --debug COMMAND ...`` shows the traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool(argv) and argv[0] == "--debug"  # first only: `train --debug` is TrainingArguments' own field
    try:
        _main(argv[1:] if debug else argv)
    except Exception as error:  # SystemExit and KeyboardInterrupt pass through
        _close_progress_bars()
        if debug:
            raise
        raise SystemExit(f"reca: {type(error).__name__}: {error}\n(run `reca --debug ...` for the traceback)") from None


def _close_progress_bars() -> None:
    """End the progress bars an error interrupted, so that the error starts on a line of its own."""
    tqdm = sys.modules.get("tqdm.auto") or sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def environment() -> str:
    """The versions, devices and accelerate config a bug report needs, one per line."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def versions(packages: tuple[str, ...], missing: str) -> list[str]:
        found = []
        for package in packages:
            try:
                found.append(f"- {package}: {version(package)}")
            except PackageNotFoundError:
                found.append(f"- {package}: {missing}")
        return found

    lines = ["Copy-paste the lines below into your bug report.", "", f"- platform: {platform.platform()}",
             f"- python: {platform.python_version()}"]  # fmt: skip
    lines += versions(("reca-hf", "torch", "transformers", "diffusers", "peft", "trl", "datasets", "accelerate",
                       "huggingface_hub"), "not installed")  # fmt: skip
    lines += versions(OPTIONAL_PACKAGES, "not installed (optional)")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        lines.append(f"- devices: {torch.cuda.device_count()} CUDA ({names}), CUDA {torch.version.cuda}")
    else:
        lines.append("- devices: CPU only (no CUDA device visible)")
    lines.append(f"- cpu threads: {torch.get_num_threads()}")
    from accelerate.commands.config import default_config_file

    found = Path(default_config_file).is_file()
    lines.append(f"- accelerate config: {default_config_file if found else 'none (accelerate config writes one)'}")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """argparse taking both spellings of every long option (``--repo-id`` and ``--repo_id``), as `reca train`'s
    fields do; subcommands' parsers inherit it."""

    def add_argument(self, *names, **kwargs):
        spellings = list(names)
        for name in names:
            if name.startswith("--"):
                for other in ("--" + name[2:].replace("-", "_"), "--" + name[2:].replace("_", "-")):
                    if other not in spellings:
                        spellings.append(other)
        return super().add_argument(*spellings, **kwargs)


def _recipe_from_config_flag(command: str, rest: list[str]) -> list[str]:
    """``reca train --config RECIPE ...`` (TRL's habit) as ``reca train RECIPE ...``."""
    for position, token in enumerate(rest):
        flag, has_value, value = token.partition("=")
        if flag != "--config":
            continue
        if not has_value:
            if position + 1 >= len(rest):
                raise SystemExit(f"reca {command}: --config needs a recipe file")
            value = rest[position + 1]
        others = rest[:position] + rest[position + (1 if has_value else 2) :]
        if others and not others[0].startswith("-"):
            raise SystemExit(
                f"reca {command}: a recipe given twice ({others[0]!r} and --config {value!r}); give one of them"
            )
        return [value, *others]
    return rest


def _main(argv: list[str]) -> None:
    from . import __version__

    if argv and argv[0] in ("train", "validate"):
        argv = [argv[0], *_recipe_from_config_flag(argv[0], argv[1:])]

    if argv and argv[0] == "train":  # a recipe is optional, and every other argument is a RecAConfig flag
        rest = argv[1:]
        if "-h" in rest or "--help" in rest:
            _parser().print_help()
            return
        recipe = rest.pop(0) if rest and not rest[0].startswith("-") else None
        if any(arg.partition("=")[0] == "--accelerate_config" for arg in rest):
            launch(recipe, rest)
        else:
            train(recipe, rest)
        return
    parser = _Parser(prog="reca", description="RecA post-training for unified multimodal models.")
    parser.add_argument("--version", action="version", version=f"reca_hf {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (first argument only)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "train",
        help="train from a recipe and/or --field value flags (reca train --help lists every field)",
        add_help=False,
    )
    commands.add_parser("env", help="print the versions and devices a bug report needs")
    validate_parser = commands.add_parser(
        "validate",
        help="check a recipe (and --field value overrides, as reca train takes them) without loading weights",
        usage="reca validate RECIPE [--check-images] [--field value ...]",
    )
    validate_parser.add_argument("recipe")
    validate_parser.add_argument(
        "--check-images", action="store_true", help="also decode every image of the datasets and report the bad ones"
    )
    results_help = "evaluation results for the card, as JSON {benchmark: score}, e.g. '{\"GenEval\": 0.85}'"
    push_parser = commands.add_parser(
        "push",
        help="push a saved run to the Hub",
        description="Push a saved run (its top-level files, not its checkpoints) to the Hub, regenerating its card.",
    )
    push_parser.add_argument("output_dir", help="the run's output dir")
    push_parser.add_argument("--repo-id", required=True, help="the Hub repo, e.g. you/janus-pro-1b-reca")
    push_parser.add_argument("--private", action="store_true", help="create the repo private (if it is new)")
    push_parser.add_argument(
        "--adapter-only", action="store_true", help="push only the LoRA adapter, its RecA settings and the card"
    )
    license_help = "the model's license for the card's metadata, a Hub license id such as mit or apache-2.0"
    push_parser.add_argument("--eval-results", help=results_help)
    push_parser.add_argument("--license", help=license_help)
    card_parser = commands.add_parser(
        "card", help="render a saved run's model card", description="Re-render README.md and training_loss.png of "
        "a saved run from its reca_run.json and trainer_state.json, without loading weights.",
    )  # fmt: skip
    card_parser.add_argument("output_dir", help="the run's output dir")
    card_parser.add_argument("--eval-results", help=results_help)
    card_parser.add_argument("--license", help=license_help)
    sample_parser = _generation_parser(
        commands, "sample", help="text-to-image samples in GenEval's, DPG-Bench's or a plain folder layout",
        description="Sample every prompt of a benchmark into the folder layout its official evaluator reads "
        "(geneval: OUT/<index:05d>/{metadata.jsonl,samples/<k:05d>.png}; dpgbench: OUT/<item_id>.png, a 2x2 grid; "
        "folder: OUT/<index:05d>_<k>.png and prompts.jsonl). Resumable: prompts already written are skipped.",
    )  # fmt: skip
    sample_parser.add_argument("--prompts", required=True, help="geneval: evaluation_metadata.jsonl; dpgbench: its "
                               "prompts/ folder of <item_id>.txt; folder: a .txt (one per line), .jsonl or folder")  # fmt: skip
    sample_parser.add_argument("--layout", choices=("geneval", "dpgbench", "folder"), default="folder")
    sample_parser.add_argument("--num_images_per_prompt", type=int, default=None,
                               help="images per prompt (default: 4 for geneval and dpgbench, 1 for folder)")  # fmt: skip
    sample_parser.add_argument(
        "--resolution", type=int, default=None, help="default: the model's generation resolution"
    )
    reconstruct_parser = _generation_parser(
        commands, "reconstruct", help="reconstruct image files through the model (OUT/<file stem>.png)",
        description="Reconstruct each image from its condition view (the model's understanding of it), as RecA "
        "trains; writes OUT/<file stem>.png.",
    )  # fmt: skip
    reconstruct_parser.add_argument("images", nargs="+", help="image files")
    reconstruct_parser.add_argument(
        "--side_by_side", action="store_true", help="write each input (its target view) and its reconstruction side by side"
    )
    reconstruct_parser.add_argument(
        "--condition_resolution", default=None, help="the condition view's size (default: the run's, else auto)"
    )
    reconstruct_parser.add_argument(
        "--condition_bottleneck", default=None, help="resize or blur (default: the run's, else resize)"
    )
    convert_parser = commands.add_parser("convert", help="convert published checkpoints into a model folder")
    architectures = convert_parser.add_subparsers(dest="architecture", required=True)
    for name, (summary, description) in CONVERTERS.items():
        converter_parser = architectures.add_parser(name, help=summary, description=description)
        if argv[:2] == ["convert", name]:  # a converter imports torch: only this one, only when used (quick --help)
            import_module(f".models.{name}.convert", __package__).build_parser(converter_parser)
    # validate: its own flags, then --field value overrides that go to the recipe parser as for reca train
    args, overrides = parser.parse_known_args(argv) if argv and argv[0] == "validate" else (parser.parse_args(argv), [])
    if args.command == "env":
        print(environment())
        return
    if args.command == "convert":
        import_module(f".models.{args.architecture}.convert", __package__).run(args)
    elif args.command == "push":
        push(args.output_dir, args.repo_id, args.private, args.adapter_only, args.eval_results, args.license)
    elif args.command == "sample":
        sample(args)
    elif args.command == "reconstruct":
        reconstruct(args)
    elif args.command == "card":
        card(args.output_dir, args.eval_results, args.license)
    else:
        run_validate(args.recipe, overrides, check_images=args.check_images)


def run_validate(recipe: str, overrides: list[str], check_images: bool = False) -> None:
    """`reca validate`: every problem on stderr and exit 1, or OK; then what could not be checked, and a note on
    bf16 without an accelerator."""
    errors, notes = validate_report(recipe, check_images=check_images, overrides=overrides)
    if errors:
        print(f"{recipe}: {len(errors)} problem(s)", file=sys.stderr)
        for error in errors:
            print(f"  - {error}", file=sys.stderr)
        for note in notes:
            print(f"  note: {note}", file=sys.stderr)
        raise SystemExit(1)
    print(f"{recipe}: OK")
    for note in [*notes, _bf16_note(recipe, overrides)]:
        if note:
            print(f"note: {note}")


if __name__ == "__main__":
    main()
