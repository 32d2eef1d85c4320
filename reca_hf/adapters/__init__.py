"""Architecture adapters (not LoRA adapters): one module per architecture, one registry for all, each
architecture registered with its tiny test builder."""

from .base import (
    ENTRY_POINT_GROUP,
    UMMAdapter,
    adapter_class_for,
    cached_key,
    get_adapter,
    load_entry_points,
    register_adapter,
    registered_adapters,
    resolve_adapter_class,
    supported_model_types,
    tiny_builders,
    unwrap_model,
)
from .emu3 import Emu3Adapter
from .flow import FlowAdapter, FlowLatentsAdapter
from .janus import JanusAdapter
from .openuni import OpenUniAdapter
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
