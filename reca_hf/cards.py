"""Model cards for RecA runs, rendered from run metadata (plain data, not live objects)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from ._resources import resource_dir

PAPER_ID = "2509.07295"
PAPER_TITLE = "Reconstruction Alignment Improves Unified Multimodal Models"
CITATION = """@article{xie2025reconstruction,
  title   = {Reconstruction Alignment Improves Unified Multimodal Models},
  author  = {Xie, Ji and Darrell, Trevor and Zettlemoyer, Luke and Wang, XuDong},
  journal = {arXiv preprint arXiv:2509.07295},
  year    = {2025}
}"""
_PACKAGES = ("reca-hf", "transformers", "torch", "peft", "trl", "datasets", "accelerate", "huggingface_hub")


def framework_versions() -> dict[str, str]:
    versions = {}
    for package in _PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions


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
) -> ModelCard:
    """Render the card of a RecA-trained model from plain run metadata.

    ``lora`` (``lora_target_modules`` and ``generation_scoped``) marks a LoRA adapter: the card then says
    ``library_name: peft`` and shows how to apply the adapter instead of how to load a full model.
    """
    base_is_hub_id = bool(base_model) and not Path(base_model).exists() and "/" in base_model
    card_data = ModelCardData(
        base_model=base_model if base_is_hub_id else None,
        library_name="peft" if lora else "transformers",
        tags=sorted({"reca", "unified-multimodal", "text-to-image", architecture, *tags}),
        datasets=datasets or None,
        pipeline_tag="text-to-image",
        model_name=model_name,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(template or resource_dir("model_cards") / "model_card.md"),
        model_name=model_name,
        base_model=base_model or "a base model",
        base_model_url=f"https://huggingface.co/{base_model}" if base_is_hub_id else "#",
        paper_id=PAPER_ID,
        settings=settings,
        parameter_table=parameter_table,
        grid_file=grid_file,
        model_class=model_class,
        repo_id=repo_id or model_name,
        versions=framework_versions(),
        citation=CITATION,
        lora=lora,
    )
