"""A tiny random OpenUni and its InternVL processor, built in code and offline, for tests and demos.

Same classes as the real model, shrunk: a 64-px InternViT with an 8x8 patch grid (pixel shuffle -> 16
image tokens), a 2-layer Qwen2, a 2-layer SigLIP connector, a 2-layer SANA on 8x8x4 latents of a 32-px
DC-AE (factor 4), and a word-level tokenizer with InternVL's image tokens and the authors' chat layout.
"""

from __future__ import annotations

import torch

from ...tiny_text import tiny_vocabulary, word_level_tokenizer
from .configuration_openuni import OpenUniConfig
from .modeling_openuni import OpenUniModel

_SPECIALS = {
    "pad": "<|endoftext|>",
    "eos": "<|im_end|>",
    "unk": "<unk>",
    "im_start": "<|im_start|>",
    "start_image": "<img>",
    "end_image": "</img>",
    "context_image": "<IMG_CONTEXT>",
    "video": "<video>",
}
# The authors' layout (`INSTRUCTION` of their prompt template, no system prompt): the image expands to
# `<img><IMG_CONTEXT>*N</img>` in the processor, then a newline and the text.
OPENUNI_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_IMAGE_SIZE = 32  # the generation side, and the DC-AE input
TINY_VIT_SIZE = 64
TINY_IMAGE_TOKENS = 16  # (64 / 8) ** 2 patches, pixel-shuffled by 0.5


def tiny_openuni_processor():
    """An InternVL processor over a word-level tokenizer with `<img>`, `</img>` and `<IMG_CONTEXT>`."""
    from transformers import GotOcr2ImageProcessorPil, InternVLProcessor

    class ImageOnlyInternVLProcessor(InternVLProcessor):
        """`InternVLProcessor` without its video processor, which needs torchvision (not a dependency)."""

        def __init__(self, image_processor=None, tokenizer=None, image_seq_length=256, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, image_seq_length, chat_template, **kwargs)

    words = sorted({*tiny_vocabulary(), "user", "assistant", "generate", ":", "."})
    tokenizer = word_level_tokenizer(
        list(_SPECIALS.values()),
        words,
        bos=_SPECIALS["eos"],  # Qwen2 writes no begin-of-sequence token
        eos=_SPECIALS["eos"],
        pad=_SPECIALS["pad"],
        unk=_SPECIALS["unk"],
        extra_special_tokens={
            "start_image_token": _SPECIALS["start_image"],
            "end_image_token": _SPECIALS["end_image"],
            "context_image_token": _SPECIALS["context_image"],
            "video_token": _SPECIALS["video"],
        },
        add_bos=False,
    )
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": TINY_VIT_SIZE, "width": TINY_VIT_SIZE}, crop_to_patches=False
    )
    return ImageOnlyInternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=TINY_IMAGE_TOKENS,
        chat_template=OPENUNI_CHAT_TEMPLATE,
    )


def tiny_openuni_config(tokenizer) -> OpenUniConfig:
    """The tiny configuration, with the tokenizer's vocabulary and image-context id."""
    text_config = {
        "model_type": "qwen2",
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    vision_config = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": TINY_VIT_SIZE,
        "patch_size": 8,
    }
    internvl_config = {
        "text_config": text_config,
        "vision_config": vision_config,
        "image_token_id": tokenizer.convert_tokens_to_ids(_SPECIALS["context_image"]),
        "image_seq_length": TINY_IMAGE_TOKENS,
    }
    connector_config = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    transformer_config = {
        "in_channels": 4,
        "out_channels": 4,
        "num_attention_heads": 2,
        "attention_head_dim": 8,
        "num_layers": 2,
        "num_cross_attention_heads": 2,
        "cross_attention_head_dim": 8,
        "cross_attention_dim": 16,
        "caption_channels": 32,
        "sample_size": TINY_IMAGE_SIZE // 4,
        "patch_size": 1,
    }
    vae_config = {
        "in_channels": 3,
        "latent_channels": 4,
        "attention_head_dim": 8,
        "encoder_block_types": ["ResBlock", "ResBlock", "EfficientViTBlock"],
        "decoder_block_types": ["ResBlock", "ResBlock", "EfficientViTBlock"],
        "encoder_block_out_channels": [8, 16, 16],
        "decoder_block_out_channels": [8, 16, 16],
        "encoder_layers_per_block": [1, 1, 1],
        "decoder_layers_per_block": [1, 1, 1],
        "encoder_qkv_multiscales": [[], [], [5]],
        "decoder_qkv_multiscales": [[], [], [5]],
        "upsample_block_type": "interpolate",
        "downsample_block_type": "conv",
        "scaling_factor": 0.41407,
    }
    scheduler_config = {
        "num_train_timesteps": 1000,
        "prediction_type": "flow_prediction",
        "use_flow_sigmas": True,
        "flow_shift": 3.0,
    }
    return OpenUniConfig(
        internvl_config=internvl_config,
        connector_config=connector_config,
        num_queries=8,
        transformer_config=transformer_config,
        vae_config=vae_config,
        scheduler_config=scheduler_config,
        vit_input_size=TINY_VIT_SIZE,
        image_size=TINY_IMAGE_SIZE,
    )


def build_tiny_openuni(seed: int = 0):
    """A tiny random ``(OpenUniModel, InternVLProcessor)`` under ``seed``, in eval mode, with no downloads."""
    processor = tiny_openuni_processor()
    config = tiny_openuni_config(processor.tokenizer)
    torch.manual_seed(seed)
    return OpenUniModel(config).eval(), processor


tiny_openuni = build_tiny_openuni  # its name before the builders were named build_tiny_<arch>
