"""Tiny random unified models built in code and offline, for tests and demos.

Each architecture's builders live in its folder (``reca_hf/models/<arch>/tiny.py``, ``build_tiny_<arch>``); this
module keeps the names tests and benchmarks import, and :func:`tiny_umm`, which builds any of them by name.
"""

from __future__ import annotations

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


def tiny_umm(arch: str, seed: int = 0):
    """A tiny random ``(model, processor)`` by name, built in code with no downloads: what
    ``model_name_or_path: "tiny:<arch>"`` builds.

    ``arch`` is an architecture adapter's name (its builder is the one it registered with,
    ``register_adapter(tiny=...)``), or ``<name>_demo`` for an architecture's demo model (``janus_demo``: the
    Janus whose image tokenizer was trained on synthetic shapes, ``register_adapter(demo=...)``).
    """
    from .adapters import demo_builders, tiny_builders

    builders = {**tiny_builders(), **demo_builders()}
    if arch not in builders:
        raise ValueError(f"tiny_umm: unknown arch {arch!r}; available: {', '.join(sorted(builders))}")
    return builders[arch](seed)


def tiny_demo_umm(arch: str, seed: int = 0):
    """The demo model of architecture ``arch`` (``tiny:<arch>_demo`` where one is registered, as for Janus),
    else its tiny test model (``tiny:<arch>``)."""
    from .adapters import demo_builders

    demo = arch + "_demo"
    return tiny_umm(demo if demo in demo_builders() else arch, seed)
