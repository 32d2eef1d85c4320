"""The tiny Janus: a random ``JanusForConditionalGeneration`` and its processor, built in code and offline, for
tests (``tiny:janus``), the demo (``tiny:janus_demo``, with the VQ trained on synthetic shapes) and benchmarks."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ...tiny_text import TINY_SPECIALS, tiny_llm_config, tiny_tokenizer

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


# The demo's Janus tokenizer: a VQ trained on the synthetic shapes by scripts/train_demo_tokenizer.py, shipped
# with the package. Its model has an 8x8 grid of 256 codes (SigLIP patches of 4 px, so 64 tokens each way):
# the random tiny model's 4x4 grid of 64 codes is too coarse to draw a shape.
DEMO_VQ_WEIGHTS = Path(__file__).resolve().parents[2] / "weights" / "tiny_janus_vq.safetensors"
DEMO_JANUS = {"patch_size": 4, "num_embeddings": 256, "channel_multiplier": [1, 2, 2]}


def tiny_janus_config(tokenizer, *, patch_size: int = 8, num_embeddings: int = 64, channel_multiplier=(1, 1, 2, 2)):
    """The configuration of the tiny Janus: 32-px images, SigLIP patches of ``patch_size`` px, and a VQ with
    ``num_embeddings`` codes whose ``len(channel_multiplier) - 1`` downsamples give the same grid."""
    from transformers import JanusConfig

    image_size = 32
    grid = image_size // patch_size
    if image_size // 2 ** (len(channel_multiplier) - 1) != grid:
        raise ValueError(f"tiny_janus_config: a {grid}x{grid} SigLIP grid needs a VQ with as many downsamples")
    return JanusConfig(
        text_config={"model_type": "llama", **tiny_llm_config(tokenizer)},
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": patch_size,
            "projection_dim": 64,
            "depth": 2,
            "num_image_tokens": grid**2,
        },
        vq_config={
            "embed_dim": 8,
            "num_embeddings": num_embeddings,
            "latent_channels": 32,
            "base_channels": 32,
            "channel_multiplier": list(channel_multiplier),  # Janus forces the VQ grid to the SigLIP patch grid
            "num_res_blocks": 1,
            "projection_dim": 64,
            "image_token_embed_dim": 64,
        },
        image_token_id=tokenizer.convert_tokens_to_ids(TINY_SPECIALS["image"]),
    )


def build_tiny_janus(seed: int = 0, *, pretrained_tokenizer: bool = False):
    """A tiny random Janus (32-px images, a 4x4 VQ grid from a 64-entry codebook) and its processor.

    ``pretrained_tokenizer=True`` builds the demo's Janus instead (:func:`build_tiny_janus_demo`).
    """
    model, processor = tiny_janus_from_config(seed, **(DEMO_JANUS if pretrained_tokenizer else {}))
    if pretrained_tokenizer:
        load_demo_tokenizer(model)
    return model, processor


def build_tiny_janus_demo(seed: int = 0):
    """The demo's Janus (``tiny:janus_demo``): an 8x8 grid of 256 codes whose VQ is the one trained on synthetic
    shapes (:data:`DEMO_VQ_WEIGHTS`), so decoded images show shapes; everything else is random."""
    return build_tiny_janus(seed, pretrained_tokenizer=True)


def tiny_janus_from_config(seed: int = 0, **config_kwargs):
    """A tiny random Janus of :func:`tiny_janus_config` ``(**config_kwargs)`` and its processor."""
    from transformers import JanusForConditionalGeneration

    tokenizer = tiny_tokenizer()
    config = tiny_janus_config(tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(config).eval()
    model.generation_config, processor = _janus_generation_parts(
        tokenizer,
        config.vision_config.image_size,
        image_tokens=int(config.vq_config.num_patches) ** 2,
        condition_tokens=config.vision_config.num_image_tokens,
    )
    return model, processor


def _janus_generation_parts(tokenizer, image_size: int, *, image_tokens: int, condition_tokens: int):
    """The generation config and processor of a tiny-tokenizer Janus.

    The generation config is as the public checkpoints' generation_config.json (what
    ``generate(generation_mode="image")`` reads), built rather than derived from the model config, so that a saved
    tiny model keeps it when loaded back."""
    from transformers import GenerationConfig, JanusImageProcessorPil, JanusProcessor

    generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        generation_kwargs={
            "boi_token_id": tokenizer.convert_tokens_to_ids(TINY_SPECIALS["boi"]),
            "num_image_tokens": image_tokens,
        },
    )
    image_processor = JanusImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor = JanusProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=_JANUS_CHAT_TEMPLATE,
        num_image_tokens=condition_tokens,
    )
    return generation_config, processor


def load_demo_tokenizer(model) -> None:
    """Load the shipped demo VQ (:data:`DEMO_VQ_WEIGHTS`) into ``model.model.vqmodel`` of a demo-shaped Janus."""
    from safetensors.torch import load_file

    if not DEMO_VQ_WEIGHTS.is_file():
        raise FileNotFoundError(
            f"the demo tokenizer {DEMO_VQ_WEIGHTS} is missing: run scripts/train_demo_tokenizer.py to make it"
        )
    model.model.vqmodel.load_state_dict(load_file(DEMO_VQ_WEIGHTS))


def build_janus(seed: int, *, image_size: int, patch_size: int, text: dict, vision: dict, vq: dict, device=None):
    """A random Janus of any shape (``text``, ``vision`` and ``vq`` config overrides; the VQ's downsampling must
    match ``image_size // patch_size``) with the tiny tokenizer's processor: benchmarks build Janus-Pro-shaped
    models with it, no download. ``text`` may set a larger ``vocab_size`` than the tokenizer's (ids beyond it
    are never fed). ``device`` builds the weights there directly."""
    from transformers import JanusConfig, JanusForConditionalGeneration

    tokenizer = tiny_tokenizer()
    grid = image_size // patch_size
    config = JanusConfig(
        text_config={"model_type": "llama", **tiny_llm_config(tokenizer), **text},
        vision_config={**vision, "image_size": image_size, "patch_size": patch_size, "num_image_tokens": grid**2},
        vq_config=vq,
        image_token_id=tokenizer.convert_tokens_to_ids(TINY_SPECIALS["image"]),
    )
    torch.manual_seed(seed)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = JanusForConditionalGeneration(config).eval()
    model.generation_config, processor = _janus_generation_parts(
        tokenizer, image_size, image_tokens=grid**2, condition_tokens=grid**2
    )
    return model, processor
