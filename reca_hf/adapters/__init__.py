"""Architecture adapters (not LoRA adapters): the contract (:mod:`.base`), the registry (:mod:`.registry`), the
generation targets (:mod:`.targets`) and the helpers adapters share (:mod:`.helpers`). Each architecture's
adapter registers itself with its tiny test builder."""

from .base import UMMAdapter
from .emu3 import Emu3Adapter
from .flow import FlowAdapter, FlowLatentsAdapter
from .helpers import cached_key, unwrap_model
from .janus import JanusAdapter
from .openuni import OpenUniAdapter
from .registry import (
    ENTRY_POINT_GROUP,
    adapter_class_for,
    get_adapter,
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
    "Emu3Adapter",
    "FlowAdapter",
    "FlowLatentsAdapter",
    "GenerationTarget",
    "JanusAdapter",
    "LossNoise",
    "OpenUniAdapter",
    "UMMAdapter",
    "adapter_class_for",
    "cached_key",
    "get_adapter",
    "load_entry_points",
    "register_adapter",
    "registered_adapters",
    "resolve_adapter_class",
    "supported_model_types",
    "tiny_builders",
    "unwrap_model",
]
