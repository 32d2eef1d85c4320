"""Architecture adapters (not LoRA adapters): the contract (:mod:`.base`), the registry (:mod:`.registry`), the
generation targets (:mod:`.targets`) and the helpers adapters share (:mod:`.helpers`).

Each architecture's adapter lives in its folder, ``reca_hf/models/<arch>/adapter.py``, and registers itself with
its tiny test builder; importing this package registers them all. Their classes are reachable here by name
(``from reca_hf.adapters import JanusAdapter``).
"""

from .base import UMMAdapter
from .helpers import cached_key, unwrap_model
from .registry import (
    ENTRY_POINT_GROUP,
    adapter_class_for,
    demo_builders,
    get_adapter,
    load_builtin_adapters,
    load_entry_points,
    register_adapter,
    registered_adapters,
    resolve_adapter_class,
    supported_model_types,
    tiny_builders,
)
from .targets import GenerationTarget, LossNoise

__all__ = [
    "ENTRY_POINT_GROUP",
    "GenerationTarget",
    "LossNoise",
    "UMMAdapter",
    "adapter_class_for",
    "cached_key",
    "demo_builders",
    "get_adapter",
    "load_entry_points",
    "register_adapter",
    "registered_adapters",
    "resolve_adapter_class",
    "supported_model_types",
    "tiny_builders",
    "unwrap_model",
]

load_builtin_adapters()


def __getattr__(name: str):
    # The adapter classes of the built-in architectures (and of any registered one) by class name.
    for cls in registered_adapters().values():
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
