"""The openuni adapter"s old import path: it lives in :mod:`reca_hf.models.openuni.adapter`."""

from ..models.openuni.adapter import OpenUniAdapter

__all__ = ["OpenUniAdapter"]
