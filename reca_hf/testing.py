"""Tiny random unified models and their processors, built in code and offline, for tests and demos."""

from __future__ import annotations

import re
from functools import lru_cache

import torch

from .prompts import load_prompts

_SPECIALS = {
    "pad": "<pad>",
    "bos": "<bos>",
    "eos": "<eos>",
    "unk": "<unk>",
    "image": "<image_placeholder>",
    "boi": "<begin_of_image>",
    "eoi": "<end_of_image>",
}
_CHAT_WORDS = ["<|User|>", "<|Assistant|>"]
# Janus' conversation layout, as a chat template of our own.
_JANUS_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|User|>: {% else %}<|Assistant|>: {% endif %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<image_placeholder>\n"
    "{% else %}{{ content['text'] | trim }}{% endif %}"
    "{% endfor %}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|>:{% endif %}"
)
_EXTRA_WORDS = (
    "a an the of on in at and with image picture photo left right top bottom middle centre center "
    "red green blue yellow purple orange white black grey gray cyan magenta circle square triangle "
    "small large big background shape shapes one two three four"
).split()


@lru_cache(maxsize=1)
def _vocabulary() -> tuple[str, ...]:
    words = set(_EXTRA_WORDS)
    for prompt in load_prompts():
        words.update(re.findall(r"\w+|[^\w\s]", prompt.lower()))
    return tuple(sorted(words))


def tiny_tokenizer():
    """A word-level tokenizer over the project's prompts, with Janus-style special tokens."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = list(_SPECIALS.values()) + _CHAT_WORDS
    vocab = {token: i for i, token in enumerate(specials + list(_vocabulary()))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=_SPECIALS["unk"]))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(specials)
    bos = _SPECIALS["bos"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=_SPECIALS["eos"],
        pad_token=_SPECIALS["pad"],
        unk_token=_SPECIALS["unk"],
        padding_side="left",
        extra_special_tokens={
            "image_token": _SPECIALS["image"],
            "boi_token": _SPECIALS["boi"],
            "eoi_token": _SPECIALS["eoi"],
        },
    )


def _tiny_janus(seed: int):
    from transformers import (
        JanusConfig,
        JanusForConditionalGeneration,
        JanusImageProcessorPil,
        JanusProcessor,
    )

    tokenizer = tiny_tokenizer()
    image_size, patch_size = 32, 8
    config = JanusConfig(
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": patch_size,
            "projection_dim": 64,
            "depth": 2,
            "num_image_tokens": (image_size // patch_size) ** 2,
        },
        vq_config={
            "embed_dim": 8,
            "num_embeddings": 64,
            "latent_channels": 32,
            "base_channels": 32,
            "channel_multiplier": [
                1,
                1,
                2,
                2,
            ],  # three downsamples: 32 px -> a 4x4 code grid, like the SigLIP patches
            "num_res_blocks": 1,
            "projection_dim": 64,
            "image_token_embed_dim": 64,
        },
        image_token_id=tokenizer.convert_tokens_to_ids(_SPECIALS["image"]),
    )
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.generation_kwargs = {"boi_token_id": tokenizer.convert_tokens_to_ids(_SPECIALS["boi"])}
    image_processor = JanusImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor = JanusProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=_JANUS_CHAT_TEMPLATE,
        num_image_tokens=(image_size // patch_size) ** 2,
    )
    return model, processor


_BUILDERS = {"janus": _tiny_janus}


def tiny_umm(arch: str, seed: int = 0):
    """A tiny random ``(model, processor)`` of architecture ``arch``, built in code with no downloads."""
    if arch not in _BUILDERS:
        raise ValueError(f"tiny_umm: unknown arch {arch!r}; available: {', '.join(sorted(_BUILDERS))}")
    return _BUILDERS[arch](seed)
