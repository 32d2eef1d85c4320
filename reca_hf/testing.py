"""Tiny random unified models built in code and offline, for tests and demos.

Each architecture's builders live in its folder (``reca_hf/models/<arch>/tiny.py``, ``build_tiny_<arch>``); this
module keeps the names tests and benchmarks import, with :func:`~reca_hf.factory.tiny_umm`, which builds any of
them by name.
"""

from __future__ import annotations

from .factory import tiny_demo_umm, tiny_umm
from .models.emu3.tiny import build_tiny_emu3
from .models.flow.tiny import build_tiny_flow, build_tiny_flow_latents, tiny_flow_config
from .models.janus.tiny import (
    DEMO_JANUS,
    DEMO_VQ_WEIGHTS,
    build_janus,
    build_tiny_janus,
    build_tiny_janus_demo,
    load_demo_tokenizer,
    tiny_janus_config,
    tiny_janus_from_config,
)
from .tiny_text import tiny_llm_config, tiny_tokenizer

__all__ = [
    "DEMO_JANUS",
    "DEMO_VQ_WEIGHTS",
    "build_janus",
    "build_tiny_emu3",
    "build_tiny_flow",
    "build_tiny_flow_latents",
    "build_tiny_janus",
    "build_tiny_janus_demo",
    "load_demo_tokenizer",
    "tiny_demo_umm",
    "tiny_flow_config",
    "tiny_janus_config",
    "tiny_janus_from_config",
    "tiny_llm_config",
    "tiny_tokenizer",
    "tiny_umm",
]
