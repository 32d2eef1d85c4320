"""Loading a model and its processor from a hub id, a local folder, or a tiny built-in spec."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from .adapters import adapter_class_for
from .config import TINY_PREFIX, looks_like_repo_id


def is_hub_id(name: str | None) -> bool:
    """True for a Hub repository id such as 'deepseek-community/Janus-Pro-7B': a namespace and a name, not a
    local path that exists, not a 'tiny:' spec."""
    return looks_like_repo_id(name) and not Path(name).expanduser().exists()


def load_model_and_processor(name_or_path: str, dtype: str = "float32"):
    """Return ``(model, processor)`` for ``name_or_path``.

    ``"tiny:<arch>"`` builds :func:`reca_hf.testing.tiny_umm`; anything else goes through
    ``from_pretrained`` with the class the detected adapter names: a transformers class name, or a dotted
    import path for models outside transformers (``"reca_hf.models.openuni.OpenUniModel"``).
    """
    if name_or_path.startswith(TINY_PREFIX):
        from .testing import tiny_umm

        return tiny_umm(name_or_path[len(TINY_PREFIX) :])
    import transformers

    # The model type from config.json alone: a class outside transformers registers its config on import.
    config, _ = transformers.PretrainedConfig.get_config_dict(name_or_path)
    model_class = model_class_from_name(adapter_class_for(config.get("model_type")).model_class)
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = model_class.from_pretrained(name_or_path, dtype=torch_dtype)
    processor = transformers.AutoProcessor.from_pretrained(name_or_path)
    return model, processor


def model_class_from_name(name: str) -> type:
    """The class an adapter's ``model_class`` names: ``"JanusForConditionalGeneration"`` (in transformers) or
    a dotted path ``"package.module.Class"``."""
    if "." not in name:
        import transformers

        return getattr(transformers, name)
    module_name, _, class_name = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(
            f"model_class={name!r} cannot be imported ({error}); name a class as 'package.module.Class'"
        ) from error
