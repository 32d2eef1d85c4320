"""Loading a model and its processor from a hub id, a local folder, or a tiny built-in spec."""

from __future__ import annotations

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
    ``from_pretrained`` with the transformers class the detected adapter names.
    """
    if name_or_path.startswith(TINY_PREFIX):
        from .testing import tiny_umm

        return tiny_umm(name_or_path[len(TINY_PREFIX) :])
    import transformers

    config = transformers.AutoConfig.from_pretrained(name_or_path)
    model_class = getattr(transformers, adapter_class_for(config.model_type).model_class)
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = model_class.from_pretrained(name_or_path, dtype=torch_dtype)
    processor = transformers.AutoProcessor.from_pretrained(name_or_path)
    return model, processor
