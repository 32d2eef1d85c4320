"""OpenUni (MetaQuery-style: frozen InternVL3, learnable queries, a connector, SANA on DC-AE latents)."""

from .configuration_openuni import OpenUniConfig
from .modeling_openuni import OpenUniModel

__all__ = ["OpenUniConfig", "OpenUniModel"]
