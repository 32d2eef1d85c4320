"""BAGEL (a Qwen2 Mixture-of-Transformers with a SigLIP NaViT condition and flow matching on FLUX-VAE latents).

The config and model load on first use (``reca_hf.models.bagel.BagelModel``), so that registering the adapter
(:mod:`.adapter`) imports no model code; importing them registers ``model_type: "bagel"`` with the Auto classes.
"""

from importlib import import_module

_EXPORTS = {"BagelConfig": "configuration_bagel", "BagelModel": "modeling_bagel"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
