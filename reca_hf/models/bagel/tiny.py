"""A tiny random BAGEL and its tokenizer, built in code and offline, for tests, demos and the parity harness.

Same classes as the real model, shrunk: a 2-layer MoT Qwen2 (64 wide, 4 heads, 2 key-value heads), a 2-layer
SigLIP NaViT (32 wide, patch 14, an 8x8 position table), a 2-level FLUX-style VAE (32 channels, 4 latent channels,
factor 2, so a latent token covers 4x4 pixels), 8x8 sin-cos tables, and a word-level tokenizer with the four tokens
BAGEL frames its splits with.
"""

from __future__ import annotations

import torch

from ...tiny_text import tiny_llm_config, tiny_vocabulary, word_level_tokenizer
from .configuration_bagel import BagelConfig
from .modeling_bagel import BagelModel

_SPECIALS = {
    "pad": "<|endoftext|>",
    "unk": "<unk>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
}
TINY_VIT_PATCH = 14
TINY_VIT_SIDE = 8  # ViT position tables: 8x8 patches (112 px)
TINY_LATENT_SIDE = 8  # latent table: 8x8 tokens (32 px)
TINY_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [32, 32],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}


def tiny_bagel_tokenizer():
    """A word-level tokenizer over the project's prompts with BAGEL's special tokens (no BOS is added)."""
    return word_level_tokenizer(
        list(_SPECIALS.values()),
        list(tiny_vocabulary()),
        bos=_SPECIALS["im_start"],
        eos=_SPECIALS["im_end"],
        pad=_SPECIALS["pad"],
        unk=_SPECIALS["unk"],
        extra_special_tokens={
            "vision_start_token": _SPECIALS["vision_start"],
            "vision_end_token": _SPECIALS["vision_end"],
        },
        add_bos=False,
    )


def tiny_bagel_config(tokenizer) -> BagelConfig:
    """The tiny configuration, with the tokenizer's vocabulary and special-token ids."""
    llm = tiny_llm_config(tokenizer) | {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
    vit = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": TINY_VIT_PATCH * TINY_VIT_SIDE,
        "patch_size": TINY_VIT_PATCH,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
    }
    ids = tokenizer.convert_tokens_to_ids
    return BagelConfig(
        llm_config=llm,
        vit_config=vit,
        vae_config=TINY_VAE_CONFIG,
        latent_patch_size=2,
        max_latent_size=TINY_LATENT_SIDE,
        vit_max_num_patch_per_side=TINY_VIT_SIDE,
        im_start_token_id=ids(_SPECIALS["im_start"]),
        im_end_token_id=ids(_SPECIALS["im_end"]),
        vision_start_token_id=ids(_SPECIALS["vision_start"]),
        vision_end_token_id=ids(_SPECIALS["vision_end"]),
    )


def build_tiny_bagel(seed: int = 0):
    """A tiny random ``(BagelModel, tokenizer)`` under ``seed``, in eval mode, with no downloads.

    ``llm2vae`` gets a small random init instead of the authors' zeros, so the prediction depends on the LLM states
    (with zeros every test of the flow would see a zero prediction)."""
    tokenizer = tiny_bagel_tokenizer()
    config = tiny_bagel_config(tokenizer)
    torch.manual_seed(seed)
    model = BagelModel(config)
    with torch.no_grad():
        model.llm2vae.weight.normal_(std=0.02)
        model.llm2vae.bias.normal_(std=0.02)
    return model.eval(), tokenizer
