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


def eval_result_entries(eval_results: dict[str, float] | None, model_name: str) -> list[EvalResult] | None:
    """``model-index`` entries for user-supplied scores ({benchmark: score}), all text-to-image benchmarks."""
    if not eval_results:
        return None
    return [
        EvalResult(
            task_type="text-to-image",
            dataset_type=benchmark.lower(),
            dataset_name=benchmark,
            metric_type=benchmark.lower(),
            metric_name=benchmark,
            metric_value=score,
        )
        for benchmark, score in eval_results.items()
    ]


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
    template: str | Path | None = None,
    lora: dict[str, Any] | None = None,
    loss_plot: str | None = None,
    eval_results: dict[str, float] | None = None,
    license: str | None = None,  # noqa: A002 - the card field's name
) -> ModelCard:
    """Render the card of a RecA-trained model from plain run metadata.

    ``lora`` (``lora_target_modules`` and ``generation_scoped``) marks a LoRA adapter: the card then uses the adapter
    template, says ``library_name: peft`` and shows how to apply the adapter instead of how to load a full model.
    ``loss_plot`` and ``grid_file`` are PNG files beside the card; ``eval_results`` ({benchmark: score}) become
    ``model-index`` metadata and a table.
    """
    base_is_hub_id = is_hub_id(base_model)  # a local folder or a 'tiny:' spec is no use to anyone else
    card_data = ModelCardData(
        base_model=base_model if base_is_hub_id else None,
        library_name="peft" if lora else "transformers",
        tags=sorted({"reca", "unified-multimodal", "text-to-image", architecture, *tags}),
        datasets=datasets or None,
        pipeline_tag="text-to-image",
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
        loss_plot=loss_plot,
        eval_results=eval_results,
        model_class=model_class,
        repo_id=repo_id or model_name,
        versions=framework_versions(),
        citation=CITATION,
        lora=lora,
    )
