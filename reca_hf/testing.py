"""Tiny random unified models and their processors, built in code and offline, for tests and demos."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .tiny_text import tiny_llm_config, tiny_vocabulary, word_level_tokenizer

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


def tiny_tokenizer():
    """A word-level tokenizer over the project's prompts, with Janus-style special tokens."""
    return word_level_tokenizer(
        list(_SPECIALS.values()) + _CHAT_WORDS,
        list(tiny_vocabulary()),
        bos=_SPECIALS["bos"],
        eos=_SPECIALS["eos"],
        pad=_SPECIALS["pad"],
        unk=_SPECIALS["unk"],
        extra_special_tokens={
            "image_token": _SPECIALS["image"],
            "boi_token": _SPECIALS["boi"],
            "eoi_token": _SPECIALS["eoi"],
        },
    )


# The demo's Janus tokenizer: a VQ trained on the synthetic shapes by scripts/train_demo_tokenizer.py, shipped
# with the package. Its model has an 8x8 grid of 256 codes (SigLIP patches of 4 px, so 64 tokens each way):
# the random tiny model's 4x4 grid of 64 codes is too coarse to draw a shape.
DEMO_VQ_WEIGHTS = Path(__file__).parent / "weights" / "tiny_janus_vq.safetensors"
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
        image_token_id=tokenizer.convert_tokens_to_ids(_SPECIALS["image"]),
    )


def build_tiny_janus(seed: int = 0, *, pretrained_tokenizer: bool = False):
    """A tiny random Janus (32-px images, a 4x4 VQ grid from a 64-entry codebook) and its processor.

    ``pretrained_tokenizer=True`` builds the demo's Janus instead (``tiny:janus``): an 8x8 grid of 256 codes
    whose VQ is the one trained on synthetic shapes (:data:`DEMO_VQ_WEIGHTS`), so decoded images show
    shapes; everything else is random as before.
    """
    model, processor = tiny_janus_from_config(seed, **(DEMO_JANUS if pretrained_tokenizer else {}))
    if pretrained_tokenizer:
        load_demo_tokenizer(model)
    return model, processor


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
            "boi_token_id": tokenizer.convert_tokens_to_ids(_SPECIALS["boi"]),
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
        image_token_id=tokenizer.convert_tokens_to_ids(_SPECIALS["image"]),
    )
    torch.manual_seed(seed)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = JanusForConditionalGeneration(config).eval()
    model.generation_config, processor = _janus_generation_parts(
        tokenizer, image_size, image_tokens=grid**2, condition_tokens=grid**2
    )
    return model, processor


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


def tiny_flow_config(tokenizer, *, condition_encoder: str = "vision", image_size: int = 32):
    """The configuration of ``tiny_umm("flow")`` (``"flow_latents"`` with ``condition_encoder="latents"``, whose
    condition slots also reach the transformer on its latent grid): 32-px images, 8x8x4 latents, under 0.5M
    parameters."""
    from .models.tiny_flow import TinyFlowConfig, TinyFlowLatentsConfig

    hidden = 64
    config_class = TinyFlowLatentsConfig if condition_encoder == "latents" else TinyFlowConfig
    return config_class(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": 8,
        },
        text_config=tiny_llm_config(tokenizer, hidden),
        transformer_config={
            # flow_latents: the condition slots' grid is concatenated to the noisy latents (aligned_condition)
            "in_channels": 8 if condition_encoder == "latents" else 4,
            "out_channels": 4,
            "num_attention_heads": 2,
            "attention_head_dim": 16,
            "num_layers": 2,
            "num_cross_attention_heads": 2,
            "cross_attention_head_dim": 16,
            "cross_attention_dim": 32,
            "caption_channels": hidden,
            "mlp_ratio": 2.0,
            "sample_size": image_size // 4,
            "patch_size": 1,
            "interpolation_scale": 1,  # sin-cos position embeddings (SANA's default at this size has none)
        },
        vae_config={
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * 3,
            "up_block_types": ["UpDecoderBlock2D"] * 3,
            "block_out_channels": [32, 32, 32],  # GroupNorm(32 groups): multiples of 32; two downsamples: stride 4
            "layers_per_block": 1,
            "latent_channels": 4,
            "norm_num_groups": 32,
            "sample_size": image_size,
            # This random autoencoder's raw latents of the synthetic shapes have a std of about 0.011: scale
            # them to about unit variance, as real latent diffusion models do, or the flow target is all noise.
            "scaling_factor": 90.0,
        },
        num_queries=16,
        condition_encoder=condition_encoder,
        image_token_id=tokenizer.convert_tokens_to_ids(tokenizer.image_token),
        image_size=image_size,
    )


def build_tiny_flow(seed: int, condition_encoder: str = "vision"):
    """A tiny flow-matching UMM (SigLIP + Llama + queries + SANA on KL latents) and its tokenizer."""
    from .models.tiny_flow import TinyFlowModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    model = TinyFlowModel(tiny_flow_config(tokenizer, condition_encoder=condition_encoder)).eval()
    return model, tokenizer


def build_tiny_flow_latents(seed: int):
    """The tiny flow UMM whose condition is the autoencoder's latents (the copyable ablation setting)."""
    return build_tiny_flow(seed, condition_encoder="latents")


def tiny_umm(arch: str, seed: int = 0):
    """A tiny random ``(model, processor)`` of architecture ``arch``, built in code with no downloads.

    ``arch`` is an architecture adapter's name; its builder is the one it registered with
    (``register_adapter(tiny=...)``).
    """
    from .adapters import tiny_builders  # the registry imports this module's builders

    builders = tiny_builders()
    if arch not in builders:
        raise ValueError(f"tiny_umm: unknown arch {arch!r}; available: {', '.join(sorted(builders))}")
    return builders[arch](seed)


def tiny_demo_umm(arch: str, seed: int = 0):
    """What ``model_name_or_path: "tiny:<arch>"`` builds: the architecture's demo model, which is
    :func:`tiny_umm` except where a trained image tokenizer ships (Janus: ``build_tiny_janus(seed,
    pretrained_tokenizer=True)``), so that the demos' decoded images show something."""
    if arch == "janus":
        return build_tiny_janus(seed, pretrained_tokenizer=True)
    return tiny_umm(arch, seed)
