"""Model cards for RecA runs, rendered from run metadata (plain data, not live objects)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ._resources import resource_dir
from .loading import is_hub_id

PAPER_ID = "2509.07295"
PAPER_TITLE = "Reconstruction Alignment Improves Unified Multimodal Models"
CITATION = """@article{xie2025reconstruction,
  title   = {Reconstruction Alignment Improves Unified Multimodal Models},
  author  = {Xie, Ji and Darrell, Trevor and Zettlemoyer, Luke and Wang, XuDong},
  journal = {arXiv preprint arXiv:2509.07295},
  year    = {2025}
}"""
MODEL_TEMPLATE = "model_card.md"  # a full model
ADAPTER_TEMPLATE = "adapter_card.md"  # a LoRA adapter
_PACKAGES = ("reca-hf", "transformers", "torch", "peft", "trl", "datasets", "accelerate", "huggingface_hub")


def framework_versions() -> dict[str, str]:
    versions = {}
    for package in _PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions


def known_base_model(name: str | None) -> str | None:
    """The Hub id of a base model whenever it can be known: a Hub id as it is; a folder in the Hub cache
    (``.../models--org--name/snapshots/<commit>``) as ``org/name``; a RecA run folder (``reca_run.json``) or a
    folder whose card names its ``base_model``, as that. Otherwise the name as given (a local folder, a 'tiny:'
    spec), which the card names without metadata."""
    import json
    import re

    if not name or is_hub_id(name):
        return name
    folder = Path(name).expanduser()
    cached = re.search(r"models--([^/]+?)--([^/]+)/snapshots/[^/]+/?$", folder.as_posix())
    if cached:
        return f"{cached.group(1)}/{cached.group(2)}"
    run = folder / "reca_run.json"
    if run.is_file():
        recorded = json.loads(run.read_text()).get("base_model")
        if is_hub_id(recorded):
            return recorded
    if (folder / "README.md").is_file():
        recorded = ModelCard.load(folder / "README.md").data.to_dict().get("base_model")
        if isinstance(recorded, str) and is_hub_id(recorded):
            return recorded
    return name


def score_of(entry: float | dict[str, Any]) -> float:
    """The number of an ``eval_results`` entry (a score, or a mapping with its ``value``)."""
    return entry["value"] if isinstance(entry, dict) else entry


def eval_result_entries(eval_results: dict[str, Any] | None, model_name: str) -> list[EvalResult] | None:
    """``model-index`` entries for user-supplied scores ({benchmark: score}), all text-to-image benchmarks."""
    if not eval_results:
        return None
    return [
        EvalResult(
            task_type="text-to-image",
            dataset_type=entry.get("dataset_id", benchmark.lower()) if isinstance(entry, dict) else benchmark.lower(),
            dataset_name=benchmark,
            metric_type=benchmark.lower(),
            metric_name=benchmark,
            metric_value=score_of(entry),
        )
        for benchmark, entry in eval_results.items()
    ]


EVAL_RESULTS_FOLDER = ".eval_results"  # the Hub's eval-results files (huggingface_hub's EvalResultEntry)


def eval_result_files(eval_results: dict[str, Any] | None) -> dict[str, str]:
    """``.eval_results/<benchmark>.yaml`` files (path -> YAML) for the entries that name their benchmark's Hub
    dataset (``{"value", "dataset_id", "task_id"}``): the format current huggingface_hub documents, which puts
    the score on the model page and on the benchmark's leaderboard."""
    import re

    import yaml
    from huggingface_hub import EvalResultEntry, eval_result_entries_to_yaml

    files = {}
    for benchmark, entry in (eval_results or {}).items():
        if not isinstance(entry, dict) or "dataset_id" not in entry:
            continue
        result = EvalResultEntry(
            dataset_id=entry["dataset_id"],
            task_id=entry.get("task_id", "default"),
            value=entry["value"],
            notes=entry.get("notes"),
            source_url=entry.get("source_url"),
        )
        slug = re.sub(r"[^a-z0-9]+", "-", benchmark.lower()).strip("-") or "benchmark"
        files[f"{EVAL_RESULTS_FOLDER}/{slug}.yaml"] = yaml.safe_dump(
            eval_result_entries_to_yaml([result]), sort_keys=False
        )
    return files


def usage_snippet(architecture: str, repo_id: str, lora: bool = False) -> str | None:
    """The card's code that generates an image with ``repo_id``: the architecture adapter's own (None when the
    architecture is not registered here, or cannot sample from text). A LoRA adapter loads through reca_hf, which
    applies it to its base model."""
    from .adapters import registered_adapters
    from .adapters.base import GENERATION_SNIPPET

    cls = next((c for c in registered_adapters().values() if architecture in (c.name, *c.model_types)), None)
    if cls is None or not cls.supports_text_to_image_sampling():
        return None
    return GENERATION_SNIPPET.format(repo_id=repo_id) if lora else cls.generation_snippet(repo_id)


def render_model_card(
    *,
    model_name: str,
    base_model: str | None,
    architecture: str,
    model_class: str,
    settings: dict[str, Any],
    tags: list[str],
    repo_id: str | None = None,
    datasets: list[str] | None = None,
    parameter_table: dict[str, dict[str, int]] | None = None,
    grid_file: str | None = None,
    text_to_image_file: str | None = None,
    template: str | Path | None = None,
    lora: dict[str, Any] | None = None,
    loss_plot: str | None = None,
    probe_plot: str | None = None,
    probe_caption: str | None = None,
    local_path: str | None = None,
    eval_results: dict[str, Any] | None = None,
    license: str | None = None,  # noqa: A002 - the card field's name
    pipeline_tag: str = "any-to-any",
) -> ModelCard:
    """Render the card of a RecA-trained model from plain run metadata.

    ``lora`` (``lora_target_modules`` and ``generation_scoped``) marks a LoRA adapter: the card then uses the adapter
    template, says ``library_name: peft`` and shows how to apply the adapter instead of how to load a full model.
    ``loss_plot``, ``probe_plot`` (with ``probe_caption`` saying what it measures), ``grid_file`` and
    ``text_to_image_file`` (the validation prompts' samples before and after training) are PNG files beside the
    card; ``local_path`` is the run folder the usage snippet loads when there is no ``repo_id`` yet (the path the
    run was written to, so the snippet works from where the run was started); ``eval_results`` ({benchmark: score}) become
    ``model-index`` metadata and a table. ``pipeline_tag`` is the base model's (the architecture adapter's); the
    usage section generates an image with the architecture adapter's snippet.
    """
    base_is_hub_id = is_hub_id(base_model)  # a local folder or a 'tiny:' spec is no use to anyone else
    card_data = ModelCardData(
        base_model=base_model if base_is_hub_id else None,
        library_name="peft" if lora else "transformers",
        tags=sorted({"reca", "unified-multimodal", "text-to-image", architecture, *tags}),
        datasets=datasets or None,
        pipeline_tag=pipeline_tag,
        model_name=model_name,
        license=license,
        eval_results=eval_result_entries(eval_results, model_name),
    )
    default = ADAPTER_TEMPLATE if lora else MODEL_TEMPLATE
    return ModelCard.from_template(
        card_data,
        template_path=str(template or resource_dir("model_cards") / default),
        model_name=model_name,
        base_model=base_model or "a base model",
        base_model_is_hub_id=base_is_hub_id,
        base_model_url=f"https://huggingface.co/{base_model}" if base_is_hub_id else "#",
        paper_id=PAPER_ID,
        settings=settings,
        parameter_table=parameter_table,
        grid_file=grid_file,
        text_to_image_file=text_to_image_file,
        loss_plot=loss_plot,
        probe_plot=probe_plot,
        probe_caption=probe_caption,
        eval_results={name: score_of(entry) for name, entry in (eval_results or {}).items()} or None,
        model_class=model_class,
        usage=usage_snippet(architecture, repo_id or local_path or model_name, lora=bool(lora)),
        repo_id=repo_id or model_name,
        versions=framework_versions(),
        citation=CITATION,
        lora=lora,
    )
