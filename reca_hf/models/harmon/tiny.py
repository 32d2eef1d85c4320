"""A tiny random Harmon and its tokenizer, built in code and offline, for tests and demos.

Same classes as the real model, shrunk: a 2-layer Qwen2 (width 64), a MAR of width 32 (2 + 2 layers, 2 heads,
4 buffer tokens) whose 2x2 position tables are interpolated to the 4x4 latent grid of a 64-px image, a 2-block
diffusion head of width 32 (10 sampling steps, each token twice in the loss), and a KL VAE with the kl16 layout at
32 channels and one resnet per level. The authors' initialisation zeroes the diffusion head's AdaLN and output
layers, which would make the loss blind to everything upstream; here every all-zero parameter outside the VAE is
redrawn from normal(0, 0.02), so losses and gradients reach every part.
"""

from __future__ import annotations

import torch

from ...tiny_text import tiny_llm_config, tiny_vocabulary, word_level_tokenizer
from .configuration_harmon import HarmonConfig
from .modeling_harmon import HarmonModel

_SPECIALS = {
    "pad": "<|endoftext|>",
    "eos": "<|im_end|>",
    "unk": "<unk>",
    "im_start": "<|im_start|>",
    "image": "<image>",
}
# Qwen2.5's chat layout without a system turn: the authors' `INSTRUCTION` template.
HARMON_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_IMAGE_SIZE = 64  # pixels; 4 x 4 latent tokens
TINY_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": [32] * 5,
    "layers_per_block": 1,
    "down_block_types": ["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"] * 5,
    "norm_num_groups": 32,
    "sample_size": TINY_IMAGE_SIZE,
    "scaling_factor": 0.2325,
    "force_upcast": False,
}


def tiny_harmon_tokenizer():
    """A word-level tokenizer with Qwen's chat tokens and ``<image>``, right padding as the authors'."""
    words = sorted({*tiny_vocabulary(), "user", "assistant", "generate", "describe", ":", "."})
    tokenizer = word_level_tokenizer(
        list(_SPECIALS.values()),
        words,
        bos=_SPECIALS["eos"],  # Qwen2 writes no begin-of-sequence token
        eos=_SPECIALS["eos"],
        pad=_SPECIALS["pad"],
        unk=_SPECIALS["unk"],
        extra_special_tokens={"image_token": _SPECIALS["image"]},
        add_bos=False,
    )
    tokenizer.padding_side = "right"
    tokenizer.chat_template = HARMON_CHAT_TEMPLATE
    return tokenizer


def tiny_harmon_config(tokenizer) -> HarmonConfig:
    """The tiny configuration, with the tokenizer's vocabulary and image token."""
    llm = tiny_llm_config(tokenizer) | {"model_type": "qwen2", "tie_word_embeddings": True}
    return HarmonConfig(
        llm_config=llm,
        vae_config=TINY_VAE_CONFIG,
        img_size=32,
        vae_stride=16,
        encoder_embed_dim=32,
        encoder_depth=2,
        encoder_num_heads=2,
        decoder_embed_dim=32,
        decoder_depth=2,
        decoder_num_heads=2,
        buffer_size=4,
        attn_dropout=0.0,
        proj_dropout=0.0,
        class_num=10,
        diffloss_d=2,
        diffloss_w=32,
        num_sampling_steps="10",
        diffusion_batch_mul=2,
        image_token_id=tokenizer.convert_tokens_to_ids(_SPECIALS["image"]),
    )


def build_tiny_harmon(seed: int = 0):
    """A tiny random ``(HarmonModel, tokenizer)`` under ``seed``, in eval mode, with no downloads."""
    tokenizer = tiny_harmon_tokenizer()
    config = tiny_harmon_config(tokenizer)
    torch.manual_seed(seed)
    model = HarmonModel(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not name.startswith("vae.") and not parameter.any():
                parameter.normal_(0.0, 0.02)
    return model.eval(), tokenizer
