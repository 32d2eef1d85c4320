"""Model classes that transformers and diffusers do not ship, composed from their parts.

Each architecture lives in its own subpackage and is imported on first use, so ``import reca_hf`` does not
pull in diffusers.
"""

from importlib import import_module

_EXPORTS = {
    "HarmonConfig": "harmon",
    "HarmonModel": "harmon",
    "BagelConfig": "bagel",
    "BagelModel": "bagel",
    "OpenUniConfig": "openuni",
    "OpenUniModel": "openuni",
    "MagvitV2": "showo",
    "MagvitV2Config": "showo",
    "ShowoConfig": "showo",
    "ShowoModel": "showo",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'reca_hf.models' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
