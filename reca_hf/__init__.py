"""reca_hf: RecA (Reconstruction Alignment) post-training for unified multimodal models.

The heavy pieces (the trainer, the config, transformers itself) load on first use, so
``import reca_hf`` stays quick.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "RecAConfig": "config",
    "RecATrainer": "trainer",
    "NonFiniteLossError": "trainer",
    "RecACollator": "collator",
    "CollapseDetector": "callbacks",
    "load_prompts": "prompts",
    "load_reca_adapter": "factory",
    "load_for_generation": "factory",
    "adapters": None,
    "data": None,
    "testing": None,
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'reca_hf' has no attribute {name!r}")
    module = import_module(f".{_EXPORTS[name] or name}", __name__)
    return module if _EXPORTS[name] is None else getattr(module, name)
