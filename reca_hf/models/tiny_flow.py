"""The tiny flow model's old import path: it lives in :mod:`reca_hf.models.flow.modeling_flow`."""

from .flow.modeling_flow import MetaQueries, TinyFlowConfig, TinyFlowLatentsConfig, TinyFlowModel

__all__ = ["MetaQueries", "TinyFlowConfig", "TinyFlowLatentsConfig", "TinyFlowModel"]
