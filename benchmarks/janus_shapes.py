"""Janus-Pro-shaped random models built in code (no download), for the benchmarks.

The shapes follow the public Janus-Pro configs: a Llama of 24 layers at width 2048 (1B; 30 layers at 4096 for
7B) with a 102400-token vocabulary, SigLIP-L at 384 px with 16-px patches (576 understanding tokens), and a VQ
tokenizer that downsamples 16x into a 24x24 grid of codes from a 16384-entry codebook. ``cpu`` keeps those
sequence lengths (576 + 576 tokens) with narrow widths, so a step runs on a CPU in about a second.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's reca_hf, not an installed one

from reca_hf.testing import build_janus  # noqa: E402

_SIGLIP_L = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "mlp_ratio": 4.0, "depth": 2}
_VQ_16X = {
    "embed_dim": 8,
    "num_embeddings": 16384,
    "base_channels": 128,
    "channel_multiplier": [1, 1, 2, 2, 4],  # four downsamples: 384 px -> 24 x 24 codes
    "num_res_blocks": 2,
    "latent_channels": 256,
}


def _llama(layers: int, width: int, mlp: int, heads: int) -> dict:
    return {"num_hidden_layers": layers, "hidden_size": width, "intermediate_size": mlp, "num_attention_heads": heads,
            "num_key_value_heads": heads, "vocab_size": 102400, "max_position_embeddings": 16384}  # fmt: skip


SHAPES = {
    "1b": {
        "text": _llama(24, 2048, 5632, 16),
        "vision": {**_SIGLIP_L, "projection_dim": 2048},
        "vq": {**_VQ_16X, "projection_dim": 2048, "image_token_embed_dim": 2048},
    },
    "7b": {
        "text": _llama(30, 4096, 11008, 32),
        "vision": {**_SIGLIP_L, "projection_dim": 4096},
        "vq": {**_VQ_16X, "projection_dim": 4096, "image_token_embed_dim": 4096},
    },
    "cpu": {  # Janus-Pro's sequence lengths, narrow
        "text": {
            "num_hidden_layers": 4,
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 2048,
        },  # fmt: skip
        "vision": {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "projection_dim": 256,
            "depth": 2,
        },  # fmt: skip
        "vq": {
            **_VQ_16X,
            "num_embeddings": 1024,
            "base_channels": 32,
            "num_res_blocks": 1,
            "latent_channels": 64,
            "projection_dim": 256,
            "image_token_embed_dim": 256,
        },  # fmt: skip
    },
}


def janus_pro_like(shape: str, seed: int = 0, device=None):
    """``(model, processor)`` of a random Janus shaped like ``shape`` (a key of :data:`SHAPES`), 384-px images."""
    return build_janus(seed, image_size=384, patch_size=16, device=device, **SHAPES[shape])
