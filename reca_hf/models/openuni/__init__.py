"""OpenUni (MetaQuery-style: frozen InternVL3, learnable queries, a connector, SANA on DC-AE latents)."""

from transformers import AutoConfig, AutoModel

from .configuration_openuni import OpenUniConfig
from .modeling_openuni import OpenUniModel

# So a saved folder's `model_type: "openuni"` resolves through the Auto classes once this package is imported.
AutoConfig.register(OpenUniConfig.model_type, OpenUniConfig, exist_ok=True)
AutoModel.register(OpenUniConfig, OpenUniModel, exist_ok=True)

__all__ = ["OpenUniConfig", "OpenUniModel"]
