"""OpenUni (MetaQuery-style: frozen InternVL3, learnable queries, a connector, SANA on DC-AE latents).

The config and model load on first use (``reca_hf.models.openuni.OpenUniModel``), so that registering the
adapter (:mod:`.adapter`) imports no model code; importing them registers ``model_type: "openuni"`` with the Auto
classes.
"""

from importlib import import_module

_EXPORTS = {"OpenUniConfig": "configuration_openuni", "OpenUniModel": "modeling_openuni"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
