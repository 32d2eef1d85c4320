"""From a name to a ready object: ``tiny:<name>`` specs, Hub ids, run folders and LoRA adapter folders.

The top of the house: it reads the registry, the architecture folders' tiny builders, the checkpoint reading of
:mod:`reca_hf.loading` and the LoRA application of :mod:`reca_hf.lora`; nothing below imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .adapters import adapter_class_for, demo_builders, get_adapter, resolve_adapter_class, tiny_builders
from .config import TINY_PREFIX
from .loading import is_hub_id
from .lora import ADAPTER_CONFIG_FILE, apply_reca_adapter, read_reca_adapter_config

__all__ = [
    "load_for_generation",
    "load_model_and_processor",
    "load_reca_adapter",
    "processor_of",
    "tiny_demo_umm",
    "tiny_umm",
]


def tiny_umm(arch: str, seed: int = 0):
    """A tiny random ``(model, processor)`` by name, built in code with no downloads: what
    ``model_name_or_path: "tiny:<arch>"`` builds.

    ``arch`` is an architecture adapter's name (its builder is the one it registered with,
    ``register_adapter(tiny=...)``), or ``<name>_demo`` for an architecture's demo model (``janus_demo``: the
    Janus whose image tokenizer was trained on synthetic shapes, ``register_adapter(demo=...)``).
    """
    builders = {**tiny_builders(), **demo_builders()}
    if arch not in builders:
        raise ValueError(f"tiny_umm: unknown arch {arch!r}; available: {', '.join(sorted(builders))}")
    return builders[arch](seed)


def tiny_demo_umm(arch: str, seed: int = 0):
    """The demo model of architecture ``arch`` (``tiny:<arch>_demo`` where one is registered, as for Janus),
    else its tiny test model (``tiny:<arch>``)."""
    demo = arch + "_demo"
    return tiny_umm(demo if demo in demo_builders() else arch, seed)


def load_model_and_processor(
    name_or_path: str,
    dtype: str = "float32",
    *,
    adapter=None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str | None = None,
):
    """Return ``(model, processor)`` for ``name_or_path``.

    ``"tiny:<name>"`` builds :func:`tiny_umm` ``(name)`` (``tiny:janus`` the test model,
    ``tiny:janus_demo`` the demo's, with a trained image tokenizer); anything else goes through the architecture
    adapter's :meth:`~reca_hf.adapters.UMMAdapter.load`: the adapter ``adapter`` names (a registered name, an
    installed plug-in's, or ``"my_pkg.my_module:MyAdapter"``), else the one that handles the ``model_type`` of
    the checkpoint's ``config.json``. The keyword arguments pass through to that loading.
    """
    cls = resolve_adapter_class(adapter) if adapter is not None else None  # importing it may register its tiny
    if name_or_path.startswith(TINY_PREFIX):
        return tiny_umm(name_or_path[len(TINY_PREFIX) :])
    if cls is None:
        import transformers

        # The model type from config.json alone: a class outside transformers registers its config on import.
        config, _ = transformers.PretrainedConfig.get_config_dict(name_or_path, revision=revision)
        cls = adapter_class_for(config.get("model_type"))
    options = {"trust_remote_code": trust_remote_code, "revision": revision}
    if attn_implementation is not None:
        options["attn_implementation"] = attn_implementation
    return cls.load(name_or_path, dtype, **options)


def load_reca_adapter(
    adapter: str | Path,
    base_model: torch.nn.Module | str | None = None,
    merge: bool = False,
    *,
    dtype: str = "auto",
    revision: str | None = None,
) -> torch.nn.Module:
    """Apply a RecA LoRA adapter to its base model.

    Args:
        adapter: a Hub id or a local folder holding ``adapter_config.json`` and ``adapter_model.safetensors``.
        base_model: a model (modified in place), a Hub id or local folder to load, or None for the base model
            the adapter records (``base_model_name_or_path``).
        merge: fold the adapter into the weights and return a plain transformers model whose outputs equal the
            unmerged one. For a "generation+llm" adapter the merged LLM delta then also reaches the text path
            (the scoping cannot survive a merge), so understanding outputs are no longer the base model's.
        dtype: dtype of a base model loaded here ('auto' is the checkpoint's own).
        revision: revision of the adapter repository.

    Returns:
        a ``PeftModel`` (with generation scoping for "generation+llm" adapters), or the merged model.
    """
    from peft import PeftConfig

    settings = read_reca_adapter_config(adapter, revision) or {}
    if base_model is None:
        base_model = PeftConfig.from_pretrained(str(adapter), revision=revision).base_model_name_or_path
        base_model = base_model or settings.get("base_model")
        if not base_model:
            raise ValueError(f"the adapter {str(adapter)!r} records no base model: pass base_model=...")
    if isinstance(base_model, str | Path):
        base_model, _ = load_model_and_processor(str(base_model), dtype)
    return apply_reca_adapter(adapter, base_model, merge, settings=settings, revision=revision)


def load_for_generation(name_or_path: str, dtype: str = "float32", device: str | None = None):
    """Return ``(model, processor, adapter)`` ready to generate, for a saved run folder, a Hub id, a LoRA
    adapter folder or repository (``adapter_config.json``: the base model it names, with the adapter applied)
    or a ``tiny:<arch>`` spec. The adapter is bound to the model: ``adapter.text_to_image(prompts)`` and
    ``adapter.reconstruct(images)`` work at once."""
    import transformers

    if _has_file(name_or_path, ADAPTER_CONFIG_FILE):
        from peft import PeftConfig

        model = load_reca_adapter(name_or_path, dtype=dtype)
        try:
            processor = transformers.AutoProcessor.from_pretrained(name_or_path)
        except (OSError, ValueError):  # the adapter folder holds no processor: the base model's
            base = PeftConfig.from_pretrained(name_or_path).base_model_name_or_path
            processor = load_model_and_processor(base)[1] if base.startswith(TINY_PREFIX) else None
            processor = processor or transformers.AutoProcessor.from_pretrained(base)
    else:
        model, processor = load_model_and_processor(name_or_path, dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, processor, get_adapter(model, processor)


def _has_file(name_or_path: str, filename: str) -> bool:
    """Whether a local folder, or else a Hub repository, holds ``filename``."""
    if name_or_path.startswith(TINY_PREFIX):
        return False
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        return (folder / filename).is_file()
    if not is_hub_id(name_or_path):
        raise ValueError(f"{name_or_path!r} is neither a folder nor a Hub id such as 'you/janus-pro-1b-reca'")
    from huggingface_hub import file_exists

    return file_exists(name_or_path, filename)


def processor_of(model) -> Any:
    """The processor of a model instance, loaded from where the model was (``config._name_or_path``); a model
    built in code has none to load, which is an error naming the fix."""
    import transformers

    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if name and (Path(name).expanduser().is_dir() or is_hub_id(name)):
        try:
            return transformers.AutoProcessor.from_pretrained(name)
        except (OSError, ValueError) as error:
            problem = f"loading its processor from {name!r} failed ({type(error).__name__}: {error})"
    else:
        problem = "the model was not loaded from a folder or a Hub id, so there is no processor to load"
    raise ValueError(
        f"processing_class=None: {problem}. Pass the model's processor: RecATrainer(model, ..., "
        "processing_class=AutoProcessor.from_pretrained(...)) (for tiny_umm models, the processor it returns)."
    )
