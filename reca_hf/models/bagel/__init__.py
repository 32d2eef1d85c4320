"""BAGEL (a Qwen2 Mixture-of-Transformers with a SigLIP NaViT condition and flow matching on FLUX-VAE latents)."""

from transformers import AutoConfig, AutoModel

from .configuration_bagel import BagelConfig
from .modeling_bagel import BagelModel

# So a saved folder's `model_type: "bagel"` resolves through the Auto classes once this package is imported.
AutoConfig.register(BagelConfig.model_type, BagelConfig, exist_ok=True)
AutoModel.register(BagelConfig, BagelModel, exist_ok=True)

__all__ = ["BagelConfig", "BagelModel"]
