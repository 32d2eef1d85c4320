"""The tiny flow-matching UMM (tests, demos, the bottleneck ablation): model, adapter, tiny builders.

The model classes load on first use, so that registering the adapter imports no model code.
"""

from importlib import import_module

_EXPORTS = dict.fromkeys(("MetaQueries", "TinyFlowConfig", "TinyFlowLatentsConfig", "TinyFlowModel"), "modeling_flow")
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
