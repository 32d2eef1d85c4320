"""The emu3 adapter"s old import path: it lives in :mod:`reca_hf.models.emu3.adapter`."""

from ..models.emu3.adapter import Emu3Adapter

__all__ = ["Emu3Adapter"]
