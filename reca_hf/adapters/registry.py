"""The registry of architecture adapters: registering, finding by name or model type, plug-ins, tiny builders.

The built-in adapters live in ``reca_hf/models/<arch>/adapter.py`` and register themselves when imported;
:func:`load_builtin_adapters` imports every such module (``reca_hf.adapters`` calls it once), so a new
architecture is one new folder. Installed packages add theirs through the ``reca_hf.adapters`` entry points.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import pkgutil
import re
import types
from collections.abc import Callable

import torch

from ..dotted import import_object
from .base import UMMAdapter
from .helpers import unwrap_model

logger = logging.getLogger(__name__)

BUILTIN_PACKAGE = "reca_hf.models"  # every <package>.<arch>.adapter module is a built-in adapter

_REGISTRY: dict[str, type[UMMAdapter]] = {}
_TINY_BUILDERS: dict[str, Callable[[int], tuple]] = {}
_DEMO_BUILDERS: dict[str, Callable[[int], tuple]] = {}  # adapter name -> its demo model's builder
DEMO_SUFFIX = "_demo"  # tiny:<name>_demo is the demo model of adapter <name>
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
ENTRY_POINT_GROUP = "reca_hf.adapters"  # third-party packages register their adapters under this group
_LOADED_ENTRY_POINTS: set[tuple[str, str]] = set()  # (name, value) of the entry points already loaded


def register_adapter(
    cls: type[UMMAdapter] | None = None,
    *,
    override: bool = False,
    tiny: Callable[[int], tuple] | None = None,
    demo: Callable[[int], tuple] | None = None,
):
    """Register an architecture adapter class (usable as a decorator). Names are lowercase identifiers, unique.

    ``tiny`` is the architecture's tiny test builder, ``tiny(seed) -> (model, processor)``: a small random model
    built in code. With one, the architecture is reachable as ``tiny:<name>`` (``reca train``, ``reca validate``,
    :func:`reca_hf.factory.tiny_umm`) and the shared adapter tests run on it. ``demo`` is a demo model of the
    architecture that differs from the test model (Janus: a trained image tokenizer), named ``tiny:<name>_demo``.
    """

    def _register(adapter_cls: type[UMMAdapter]) -> type[UMMAdapter]:
        if not (isinstance(adapter_cls, type) and issubclass(adapter_cls, UMMAdapter)):
            raise TypeError(f"register_adapter expects a UMMAdapter subclass, got {adapter_cls!r}")
        name = adapter_cls.name
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(f"adapter name {name!r} must be a lowercase identifier such as 'janus'")
        if not adapter_cls.model_types:
            raise ValueError(f"adapter {name!r} declares no model_types")
        if name in _REGISTRY and _REGISTRY[name] is not adapter_cls and not override:
            raise ValueError(f"an adapter named {name!r} is already registered ({_REGISTRY[name].__name__})")
        for field, builder in (("tiny", tiny), ("demo", demo)):
            if builder is not None and not callable(builder):
                raise TypeError(
                    f"register_adapter({field}=...) for {name!r} must be a callable seed -> (model, processor)"
                )
        _REGISTRY[name] = adapter_cls
        for builders, builder in ((_TINY_BUILDERS, tiny), (_DEMO_BUILDERS, demo)):
            if builder is not None:
                builders[name] = builder
            elif override:
                builders.pop(name, None)
        return adapter_cls

    return _register(cls) if cls is not None else _register


def load_builtin_adapters() -> list[str]:
    """Import every ``reca_hf.models.<arch>.adapter`` module (each registers its adapters); returns their
    architecture folder names. Imported by name, so the contract imports no model code."""
    package = importlib.import_module(BUILTIN_PACKAGE)
    folders = sorted(info.name for info in pkgutil.iter_modules(package.__path__) if info.ispkg)
    loaded = []
    for folder in folders:
        module = f"{BUILTIN_PACKAGE}.{folder}.adapter"
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)
            loaded.append(folder)
    return loaded


def load_entry_points() -> list[str]:
    """Import the adapters that installed packages declare in the ``reca_hf.adapters`` entry-point group.

    Each entry point names an adapter class (``my_pkg.adapter:MyAdapter``, registered here) or a module that
    registers its adapters on import (``my_pkg.adapter``). Called lazily: when a name or model type is not in
    the registry, and when the registry is listed; each entry point is loaded once. One that fails to load is
    skipped with a warning naming it. Returns the names of the entry points loaded by this call.
    """
    from importlib.metadata import entry_points

    loaded = []
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        key = (entry_point.name, entry_point.value)
        if key in _LOADED_ENTRY_POINTS:
            continue
        _LOADED_ENTRY_POINTS.add(key)
        where = f"entry point {entry_point.name!r} = {entry_point.value!r} (group {ENTRY_POINT_GROUP!r}" + (
            f", package {entry_point.dist.name})" if entry_point.dist is not None else ")"
        )
        try:
            target = entry_point.load()
            if isinstance(target, type) and issubclass(target, UMMAdapter):
                register_adapter(target)
            elif not isinstance(target, types.ModuleType):
                raise TypeError(f"it names {target!r}, neither a UMMAdapter subclass nor a module")
        except Exception as error:  # a broken plug-in must not break every other adapter
            logger.warning("Skipped the RecA architecture adapter of %s: %s: %s", where, type(error).__name__, error)
            continue
        loaded.append(entry_point.name)
    return loaded


def registered_adapters() -> dict[str, type[UMMAdapter]]:
    """A copy of the registry, installed plug-ins included: adapter name -> class."""
    load_entry_points()
    return dict(_REGISTRY)


def tiny_builders() -> dict[str, Callable[[int], tuple]]:
    """A copy of the registered tiny test builders (plug-ins included): adapter name -> ``builder(seed) ->
    (model, processor)``."""
    load_entry_points()
    return dict(_TINY_BUILDERS)


def demo_builders() -> dict[str, Callable[[int], tuple]]:
    """The registered demo models: ``<name>_demo`` -> ``builder(seed) -> (model, processor)``."""
    load_entry_points()
    return {name + DEMO_SUFFIX: builder for name, builder in _DEMO_BUILDERS.items()}


def supported_model_types() -> list[str]:
    return sorted({t for cls in registered_adapters().values() for t in cls.model_types})


def _find(model_type: str) -> type[UMMAdapter] | None:
    for cls in _REGISTRY.values():
        if model_type in cls.model_types:
            return cls
    return _REGISTRY.get(model_type)


def adapter_class_for(model_type: str) -> type[UMMAdapter]:
    """The adapter class handling ``model_type`` (first registered match) or a registry name; installed
    plug-ins (the ``reca_hf.adapters`` entry points) are looked at when the registry has none."""
    cls = _find(model_type)
    if cls is None and load_entry_points():
        cls = _find(model_type)
    if cls is not None:
        return cls
    raise ValueError(
        f"no RecA adapter handles model_type={model_type!r}. Supported model types: "
        f"{', '.join(supported_model_types())}. Models outside this list need an adapter: "
        "subclass reca_hf.adapters.UMMAdapter and register it (register_adapter, an entry point in the "
        f"{ENTRY_POINT_GROUP!r} group, or adapter: 'my_pkg.my_module:MyAdapter')."
    )


def resolve_adapter_class(spec: str | type[UMMAdapter]) -> type[UMMAdapter]:
    """The adapter class an explicit ``adapter`` setting names: a registered name (``"janus"``, installed
    plug-ins included), a dotted import path (``"my_pkg.my_module:MyAdapter"`` or ``"my_pkg.my_module.MyAdapter"``)
    or the class itself. An imported class not yet registered is registered, so detection finds it later."""
    if isinstance(spec, type):
        cls = spec
    elif not isinstance(spec, str) or not spec:
        raise TypeError(
            f"adapter={spec!r}: name a registered adapter ('janus') or a class ('my_pkg.my_module:MyAdapter')"
        )
    elif ":" not in spec and "." not in spec:
        if spec not in _REGISTRY:
            load_entry_points()
        if spec not in _REGISTRY:
            raise ValueError(
                f"adapter={spec!r} is not a registered architecture adapter; registered: "
                f"{', '.join(sorted(_REGISTRY))}. Name a class as 'my_pkg.my_module:MyAdapter', or install the "
                f"package whose {ENTRY_POINT_GROUP!r} entry point provides it."
            )
        return _REGISTRY[spec]
    else:
        cls = import_object(spec, "adapter")
    if not (isinstance(cls, type) and issubclass(cls, UMMAdapter)):
        raise TypeError(f"adapter={spec!r} names {cls!r}, which is not a reca_hf.adapters.UMMAdapter subclass")
    if cls.name not in _REGISTRY:
        register_adapter(cls)
    return cls


def get_adapter(model, processor=None, adapter: str | type[UMMAdapter] | None = None) -> UMMAdapter:
    """Build the adapter for ``model`` (a model instance or its config), detected from ``config.model_type``
    unless ``adapter`` names one (see :func:`resolve_adapter_class`).

    A model instance is bound to the adapter, so ``get_adapter(model, processor).reconstruct(images)`` works.
    """
    is_module = isinstance(model, torch.nn.Module)
    config = getattr(unwrap_model(model), "config", None) if is_module else model
    model_type = getattr(config, "model_type", None)
    if adapter is not None:
        cls = resolve_adapter_class(adapter)
        if model_type is not None and model_type not in cls.model_types:
            logger.warning(
                "adapter=%r handles model types %s, but this model's config says model_type=%r: using it as asked.",
                adapter, ", ".join(cls.model_types), model_type,
            )  # fmt: skip
    elif model_type is None:
        raise TypeError(
            f"get_adapter expects a model or config with a model_type, got {type(model).__name__}; "
            "for a model without one, name its adapter (adapter=...)"
        )
    else:
        cls = adapter_class_for(model_type)
    return cls(config, processor=processor, model=model if is_module else None)
