"""The janus adapter"s old import path: it lives in :mod:`reca_hf.models.janus.adapter`."""

from ..models.janus.adapter import JANUS_SNIPPET, JanusAdapter

__all__ = ["JANUS_SNIPPET", "JanusAdapter"]
