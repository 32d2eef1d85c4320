"""The tiny Emu3: a random ``Emu3ForConditionalGeneration`` and its processor, built in code and offline."""

from __future__ import annotations

import torch

from ...tiny_text import tiny_vocabulary, word_level_tokenizer

# Emu3's reserved tokens, under the names its processor and `Emu3ImageVocabularyMapping` look up.
_EMU3_SPECIALS = {
    "pad": "<|endoftext|>",
    "bos": "<|extra_203|>",
    "eos": "<|extra_204|>",
    "unk": "<unk>",  # a word-level vocabulary needs one; Emu3's byte-level BPE has none
    "image": "<image>",
    "boi": "<|image start|>",
    "eoi": "<|image end|>",
    "image_wrapper": "<|image token|>",
    "eol": "<|extra_200|>",  # row end, after every row of VQ ids
    "eof": "<|extra_201|>",  # end of the last frame
}
# Emu3-Chat's conversation layout (LLaVA-1.5 style), as a chat template of our own.
_EMU3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'] | upper }}: {% endif %}"
    "{% for content in message['content'] if content['type'] == 'image' %}<image>{% endfor %}"
    "{% for content in message['content'] if content['type'] == 'text' %}{{ content['text'] }} {% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tiny_emu3(seed: int = 0):
    """A tiny Emu3: 32-px images become 4x4 grids of VQ ids from a 64-entry codebook (three 2x downsamples)."""
    from transformers import Emu3Config, Emu3ForConditionalGeneration, Emu3ImageProcessor, Emu3Processor

    image_size, codebook_size = 32, 64
    visual_tokens = [f"<|visual token {code:06d}|>" for code in range(codebook_size)]  # the name Emu3 parses
    specials = list(_EMU3_SPECIALS.values()) + visual_tokens
    words = sorted({*tiny_vocabulary(), "user", "assistant", "you", "are", "a", "helpful", "*", *"0123456789"})
    tokenizer = word_level_tokenizer(
        specials,
        words,
        bos=_EMU3_SPECIALS["bos"],
        eos=_EMU3_SPECIALS["eos"],
        pad=_EMU3_SPECIALS["pad"],
        unk=_EMU3_SPECIALS["unk"],
        extra_special_tokens={
            "image_token": _EMU3_SPECIALS["image"],
            "boi_token": _EMU3_SPECIALS["boi"],
            "eoi_token": _EMU3_SPECIALS["eoi"],
            "image_wrapper_token": _EMU3_SPECIALS["image_wrapper"],
            "eof_token": _EMU3_SPECIALS["eof"],
        },
        add_bos=False,
        split_digits=True,
    )
    config = Emu3Config(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "attention_dropout": 0.0,  # Emu3's default is 0.1: off here, so train-mode losses are reproducible
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vq_config={
            "codebook_size": codebook_size,
            "embed_dim": 4,
            "latent_channels": 4,
            "base_channels": 32,  # GroupNorm(32 groups) everywhere: a multiple of 32
            "channel_multiplier": [1, 1, 1, 1],  # three 2x downsamples: 32 px -> 4x4 ids, Emu3's spatial factor 8
            "num_res_blocks": 1,
            "attn_resolutions": [3],
            "hidden_size": 32,  # the attention width must equal the last level's channels
            "num_attention_heads": 1,
            "temporal_downsample_factor": 1,  # Emu3's 4 repeats every image 4 times in the VQ: 10x slower here
        },
        vocabulary_map=tokenizer.get_vocab(),
        # The original Emu3 checkpoints' generation size knob (saved with the config; the processor's is not).
        image_area=image_size * image_size,
    )
    torch.manual_seed(seed)
    model = Emu3ForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    image_processor = Emu3ImageProcessor(
        min_pixels=image_size * image_size,
        max_pixels=image_size * image_size,
        spatial_factor=8,
        image_mean=[0.5] * 3,  # Emu3's VQ reads pixels in [-1, 1]
        image_std=[0.5] * 3,
    )
    processor = Emu3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=_EMU3_CHAT_TEMPLATE)
    return model, processor
