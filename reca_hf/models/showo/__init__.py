"""Show-o (Phi-1.5 over MAGVIT-v2 codes, masked-token image generation; VQ and CLIP variants).

The configs and models load on first use (``reca_hf.models.showo.ShowoModel``), so that registering the adapter
(:mod:`.adapter`) imports no model code; importing them registers ``model_type`` "showo" and "showo_magvitv2"
with the Auto classes.
"""

from importlib import import_module

_EXPORTS = {
    "MagvitV2": "magvit",
    "MagvitV2Config": "configuration_showo",
    "ShowoConfig": "configuration_showo",
    "ShowoModel": "modeling_showo",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
