"""Harmon (Qwen2.5 shared by understanding and generation, a MAR encoder-decoder, a per-token diffusion head).

The config and model load on first use (``reca_hf.models.harmon.HarmonModel``), so that registering the adapter
(:mod:`.adapter`) imports no model code; importing them registers ``model_type: "harmon"`` with the Auto classes.
"""

from importlib import import_module

_EXPORTS = {"HarmonConfig": "configuration_harmon", "HarmonModel": "modeling_harmon"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
