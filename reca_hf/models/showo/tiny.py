"""Tiny random Show-o models (VQ and CLIP variants) and their tokenizer, built in code and offline.

Same classes as the real models, shrunk: a 2-layer Phi 64 wide; a MAGVIT-v2 32 wide with five levels (stride 16, as
the real one), per-level block counts that differ between encoder and decoder, attention at the 8-px level, and 8
bits (256 codes); 64-px images (16 codes) and 32-px conditions (4 codes); a word-level Phi-style tokenizer (one
``<|endoftext|>`` as bos, eos and unk) with Show-o's 10 special tokens added as the authors' prompting adds them.
The CLIP variant's tower is a 2-layer ViT at the real 336 px and patch 14, so it gives the real 576 features the
authors' CLIP masks assume.
"""

from __future__ import annotations

import torch

from ...tiny_text import tiny_vocabulary, word_level_tokenizer
from .configuration_showo import SPECIAL_TOKENS, ShowoConfig
from .modeling_showo import ShowoModel

TINY_IMAGE_SIZE = 64  # 16 codes
TINY_CONDITION_SIZE = 32  # 4 codes: the 512 -> 256 condition, shrunk
TINY_MAX_SEQ_LENGTH = 24
_ENDOFTEXT = "<|endoftext|>"


def tiny_showo_text_tokenizer():
    """The tiny text tokenizer before Show-o's special tokens (Phi-like: no bos written, one end-of-text token)."""
    words = sorted({*tiny_vocabulary(), "user", "assistant", ":", "."})
    return word_level_tokenizer(
        [_ENDOFTEXT],
        words,
        bos=_ENDOFTEXT,
        eos=_ENDOFTEXT,
        pad=_ENDOFTEXT,
        unk=_ENDOFTEXT,
        extra_special_tokens={},
        add_bos=False,
    )


def add_showo_tokens(tokenizer):
    """Add Show-o's special tokens as the authors' prompting does: ``[PAD]`` as the pad token, then the nine task and
    boundary tokens, in `SPECIAL_TOKENS` order. Returns the tokenizer."""
    tokenizer.add_special_tokens({"pad_token": SPECIAL_TOKENS[0]})
    tokenizer.add_tokens(list(SPECIAL_TOKENS[1:]))
    return tokenizer


def tiny_showo_config(tokenizer_size: int, *, w_clip_vit: bool = False) -> ShowoConfig:
    """The tiny configuration for a text tokenizer of ``tokenizer_size`` tokens (before the special tokens)."""
    llm_config = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "partial_rotary_factor": 0.5,
        "max_position_embeddings": 1024,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }
    vq_config = {
        "ch": 32,
        "encoder_ch_mult": [1, 1, 2, 2, 2],
        "encoder_num_res_blocks": [1, 2, 1, 1, 2],
        "decoder_ch_mult": [1, 1, 1, 2, 2],
        "decoder_num_res_blocks": [2, 1, 1, 2, 1],
        "attn_resolutions": [8],
        "resolution": TINY_IMAGE_SIZE,
        "z_channels": 8,
    }
    vision_config = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 336,
        "patch_size": 14,
        "projection_dim": 32,
    }
    return ShowoConfig(
        llm_config=llm_config,
        vq_config=vq_config,
        vision_config=vision_config if w_clip_vit else None,
        w_clip_vit=w_clip_vit,
        llm_vocab_size=tokenizer_size,
        codebook_size=2**8,
        num_vq_tokens=(TINY_IMAGE_SIZE // 16) ** 2,
        max_seq_length=TINY_MAX_SEQ_LENGTH,
    )


def _build(seed: int, w_clip_vit: bool):
    tokenizer = tiny_showo_text_tokenizer()
    config = tiny_showo_config(len(tokenizer), w_clip_vit=w_clip_vit)
    tokenizer = add_showo_tokens(tokenizer)
    torch.manual_seed(seed)
    return ShowoModel(config).eval(), tokenizer


def build_tiny_showo(seed: int = 0):
    """A tiny random VQ-variant ``(ShowoModel, tokenizer)`` under ``seed``, in eval mode, with no downloads."""
    return _build(seed, w_clip_vit=False)


def build_tiny_showo_clip(seed: int = 0):
    """A tiny random CLIP-variant ``(ShowoModel, tokenizer)`` under ``seed``, in eval mode, with no downloads."""
    return _build(seed, w_clip_vit=True)
