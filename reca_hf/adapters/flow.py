"""The flow adapter"s old import path: it lives in :mod:`reca_hf.models.flow.adapter`."""

from ..models.flow.adapter import FlowAdapter, FlowLatentsAdapter

__all__ = ["FlowAdapter", "FlowLatentsAdapter"]
