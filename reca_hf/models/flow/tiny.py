"""The tiny flow-matching UMM (:mod:`.modeling_flow`) and its tokenizer, built in code and offline."""

from __future__ import annotations

import torch

from ...tiny_text import tiny_llm_config, tiny_tokenizer


def tiny_flow_config(tokenizer, *, condition_encoder: str = "vision", image_size: int = 32):
    """The configuration of ``tiny_umm("flow")`` (``"flow_latents"`` with ``condition_encoder="latents"``, whose
    condition slots also reach the transformer on its latent grid): 32-px images, 8x8x4 latents, under 0.5M
    parameters."""
    from .modeling_flow import TinyFlowConfig, TinyFlowLatentsConfig

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
    from .modeling_flow import TinyFlowModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    model = TinyFlowModel(tiny_flow_config(tokenizer, condition_encoder=condition_encoder)).eval()
    return model, tokenizer


def build_tiny_flow_latents(seed: int):
    """The tiny flow UMM whose condition is the autoencoder's latents (the copyable ablation setting)."""
    return build_tiny_flow(seed, condition_encoder="latents")
