"""Harmon (Qwen2.5 shared by understanding and generation, a MAR encoder-decoder, a per-token diffusion head)."""

from transformers import AutoConfig, AutoModel

from .configuration_harmon import HarmonConfig
from .modeling_harmon import HarmonModel

# So a saved folder's `model_type: "harmon"` resolves through the Auto classes once this package is imported.
AutoConfig.register(HarmonConfig.model_type, HarmonConfig, exist_ok=True)
AutoModel.register(HarmonConfig, HarmonModel, exist_ok=True)

__all__ = ["HarmonConfig", "HarmonModel"]
