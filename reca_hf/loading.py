"""Reading checkpoints: what :meth:`reca_hf.adapters.UMMAdapter.load` does by default.

``from_pretrained`` for transformers classes, and for a plain ``torch.nn.Module`` with a config object the folder
convention ``RecATrainer`` saves (``config.json`` from the config, ``model.safetensors``). Which architecture a
name is, and what ``tiny:<arch>`` builds, is :mod:`reca_hf.factory`'s part.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import typing
from importlib import import_module
from pathlib import Path
from typing import Any

import torch

from .config import looks_like_repo_id
from .dotted import import_object

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def is_hub_id(name: str | None) -> bool:
    """True for a Hub repository id such as 'deepseek-community/Janus-Pro-7B': a namespace and a name, not a
    local path that exists, not a 'tiny:' spec."""
    return looks_like_repo_id(name) and not Path(name).expanduser().exists()


def load_pretrained(
    model_class: str | type,
    name_or_path: str,
    dtype: str = "float32",
    *,
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str | None = None,
):
    """The default of :meth:`UMMAdapter.load`: ``model_class.from_pretrained`` (or :func:`load_module` for a plain
    ``torch.nn.Module`` class) and ``AutoProcessor.from_pretrained``, with the options passed through."""
    import transformers

    model_class = model_class_from_name(model_class) if isinstance(model_class, str) else model_class
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    if _is_transformers_class(model_class):
        extra = {"attn_implementation": attn_implementation} if attn_implementation is not None else {}
        model = model_class.from_pretrained(
            name_or_path, dtype=torch_dtype, trust_remote_code=trust_remote_code, revision=revision, **extra
        )
    else:
        if attn_implementation is not None:
            logger.warning(
                "attn_implementation=%r is ignored: %s is a plain torch.nn.Module, which chooses its own attention.",
                attn_implementation, model_class.__name__,
            )  # fmt: skip
        model = load_module(model_class, name_or_path, torch_dtype, revision=revision)
    processor = transformers.AutoProcessor.from_pretrained(
        name_or_path, trust_remote_code=trust_remote_code, revision=revision
    )
    return model, processor


def load_pretrained_config(
    model_class: str | type, name_or_path: str, *, trust_remote_code: bool = False, revision: str | None = None
):
    """The default of :meth:`UMMAdapter.load_config`: the config alone, as ``model_class`` reads it."""
    import transformers

    model_class = model_class_from_name(model_class) if isinstance(model_class, str) else model_class
    if _is_transformers_class(model_class):
        return transformers.AutoConfig.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code, revision=revision
        )
    return config_from_dict(model_class, json.loads(Path(_file(name_or_path, CONFIG_FILE, revision)).read_text()))


def model_class_from_name(name: str) -> type:
    """The class an adapter's ``model_class`` names: ``"JanusForConditionalGeneration"`` (in transformers) or
    a dotted path ``"package.module.Class"`` (``"package.module:Class"`` also works)."""
    if "." not in name and ":" not in name:
        import transformers

        return getattr(transformers, name)
    return import_object(name, "model_class")


def _is_transformers_class(model_class: type) -> bool:
    """True for the classes ``from_pretrained`` loads: ``PreTrainedModel`` subclasses and the Auto classes."""
    from transformers import PreTrainedModel
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    return issubclass(model_class, PreTrainedModel | _BaseAutoModelClass)


# ---- plain torch.nn.Module models: config.json from the config object, model.safetensors ----


def config_to_dict(config) -> dict[str, Any]:
    """A plain module's config object as the JSON ``config.json`` holds: its ``to_dict()``, or its fields for a
    dataclass, plus its ``model_type`` (by which the adapter is found again) when it has one."""
    if callable(getattr(config, "to_dict", None)):
        values = dict(config.to_dict())
    elif dataclasses.is_dataclass(config):
        values = dataclasses.asdict(config)
    elif hasattr(config, "__dict__"):
        values = dict(vars(config))
    else:
        raise TypeError(f"the model's config ({type(config).__name__}) has no to_dict(), fields or attributes")
    model_type = getattr(config, "model_type", None)
    if model_type is not None:
        values.setdefault("model_type", model_type)
    return values


def config_from_dict(model_class: type, values: dict[str, Any]):
    """Rebuild a plain module's config from ``config.json``: ``model_class.config_class`` (its ``from_dict``,
    or its constructor with the dataclass fields it declares)."""
    config_class = getattr(model_class, "config_class", None) or _init_config_type(model_class)
    if config_class is None:
        raise TypeError(
            f"{model_class.__name__} is a plain torch.nn.Module without a config_class attribute: set config_class "
            "to its config's class so that a saved folder can rebuild it"
        )
    if callable(getattr(config_class, "from_dict", None)):
        return config_class.from_dict(values)
    if dataclasses.is_dataclass(config_class):
        names = {f.name for f in dataclasses.fields(config_class) if f.init}
        values = {key: value for key, value in values.items() if key in names}
    return config_class(**values)


def _init_config_type(model_class: type) -> type | None:
    """The class annotated on the ``config`` argument of ``model_class.__init__``, if any."""
    try:
        hint = typing.get_type_hints(model_class.__init__).get("config")
    except (NameError, TypeError):
        return None
    return hint if isinstance(hint, type) else None


def save_module_config(model: torch.nn.Module, folder: str | Path) -> Path | None:
    """Write ``config.json`` for a plain module (the Trainer saves its weights as ``model.safetensors``); a
    config that cannot be written as JSON is a warning (the folder then holds the weights alone)."""
    path = Path(folder) / CONFIG_FILE
    try:
        text = json.dumps(config_to_dict(model.config), indent=2, sort_keys=True)
    except (TypeError, ValueError, AttributeError) as error:
        logger.warning(
            "%s is a plain torch.nn.Module whose config cannot be written as %s (%s): %s holds its weights alone. "
            "Make its config a dataclass of JSON values, or give it to_dict() and from_dict().",
            type(model).__name__, CONFIG_FILE, error, folder,
        )  # fmt: skip
        return None
    path.write_text(text + "\n")
    return path


def load_module(model_class: type, name_or_path: str, dtype: torch.dtype | str = torch.float32, *, revision=None):
    """A plain ``torch.nn.Module`` from a folder (or Hub repo) with ``config.json`` and ``model.safetensors``:
    ``model_class(config)`` with the saved weights loaded strictly."""
    from safetensors.torch import load_model

    config = config_from_dict(model_class, json.loads(Path(_file(name_or_path, CONFIG_FILE, revision)).read_text()))
    model = model_class(config)
    load_model(model, _file(name_or_path, WEIGHTS_FILE, revision), strict=True)
    if dtype != "auto":
        model.to(dtype)
    return model


def _file(name_or_path: str, filename: str, revision: str | None) -> str:
    from transformers.utils import cached_file

    return cached_file(name_or_path, filename, revision=revision)


def __getattr__(name: str):
    # Loading by name moved to reca_hf.factory (and the tiny prefix lives with the config); the names still
    # import from here.
    if name in ("load_model_and_processor", "load_for_generation"):
        return getattr(import_module("reca_hf.factory"), name)
    if name == "TINY_PREFIX":
        return getattr(import_module("reca_hf.config"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
