"""The configuration of a Harmon model: the Qwen2 LLM, the MAR encoder-decoder, the diffusion head and the VAE.

The LLM is a real sub-config (`Qwen2Config`); the VAE is stored as the plain dict `diffusers.AutoencoderKL` reads,
so this module imports no diffusers. The MAR fields keep the names of the authors' `MAR` constructor
(`Harmon/src/models/mar/mar.py`), so their model configs read across one to one.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.models.qwen2 import Qwen2Config

# The MAR "kl16" autoencoder of the authors' configs (`AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))`, the
# LDM encoder/decoder with ch=128, two resnets per level, attention at the last encoder level and in the middle),
# as a diffusers `AutoencoderKL`. Latents are `posterior.mode() * 0.2325`, without a shift.
KL16_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": [128, 128, 256, 256, 512],
    "layers_per_block": 2,
    "down_block_types": ["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"] * 5,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 0.2325,
    "force_upcast": False,
}

# The MAR sizes of the authors' two models (`configs/models/qwen2_5_{0_5b_kl16_mar_b,1_5b_kl16_mar_h}.py`).
MAR_BASE = {
    "encoder_embed_dim": 768,
    "encoder_depth": 12,
    "encoder_num_heads": 12,
    "decoder_embed_dim": 768,
    "decoder_depth": 12,
    "decoder_num_heads": 12,
    "diffloss_d": 6,
    "diffloss_w": 1024,
}
MAR_HUGE = {
    "encoder_embed_dim": 1280,
    "encoder_depth": 20,
    "encoder_num_heads": 16,
    "decoder_embed_dim": 1280,
    "decoder_depth": 20,
    "decoder_num_heads": 16,
    "diffloss_d": 12,
    "diffloss_w": 1536,
}
# Qwen2.5-0.5B-Instruct and Qwen2.5-1.5B-Instruct, the LLMs the two models start from (their Hub config.json).
_QWEN25_COMMON = {
    "vocab_size": 151936,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
}
QWEN25_0_5B = _QWEN25_COMMON | {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
}
QWEN25_1_5B = _QWEN25_COMMON | {
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
}
# Qwen2.5's tokenizer has 151665 tokens; the authors add "<image>" after them for image-to-text (id 151665).
QWEN25_IMAGE_TOKEN_ID = 151665


@strict
class HarmonConfig(PreTrainedConfig):
    r"""
    llm_config (`dict` or `Qwen2Config`):
        The shared LLM (Qwen2.5-0.5B/1.5B-Instruct in the released models).
    vae_config (`dict`):
        `diffusers.AutoencoderKL` config (default: the MAR kl16 autoencoder, :data:`KL16_VAE_CONFIG`). Its
        `scaling_factor` (0.2325) scales the posterior mode; `latent_channels` must equal `vae_embed_dim`.
    img_size, vae_stride, patch_size (`int`, defaults to 256, 16, 1):
        Size of MAR's learned position tables: `(img_size // vae_stride // patch_size) ** 2` image positions.
        Other latent grids (512 px: 32 x 32) interpolate them bilinearly, as the authors'.
    vae_embed_dim (`int`, defaults to 16): latent channels; a token is `vae_embed_dim * patch_size**2` wide.
    encoder_embed_dim, encoder_depth, encoder_num_heads, decoder_embed_dim, decoder_depth, decoder_num_heads:
        The MAR encoder and decoder (ViT blocks; MAR-B: 768 wide, 12 + 12 layers; MAR-H: 1280, 20 + 20).
    mlp_ratio (`float`, defaults to 4.0), layer_norm_eps (`float`, defaults to 1e-6): of every MAR block.
    buffer_size (`int`, defaults to 64): buffer tokens in front of the image tokens (the fake latent fills them).
    attn_dropout, proj_dropout (`float`, defaults to 0.1): dropout in the MAR blocks (active in train mode).
    class_num (`int`, defaults to 1000): rows of MAR's class embedding, which Harmon never uses (kept so the
        released checkpoints load without a missing key).
    mask_ratio_min (`float`, defaults to 0.7): lower end of MAR's truncated-normal mask ratio (mode 1.0, std 0.25).
    diffloss_d, diffloss_w (`int`): depth and width of the diffusion head's AdaLN MLP.
    num_sampling_steps (`str`, defaults to "100"): the respacing of the 1000 training steps used for sampling.
    diffusion_batch_mul (`int`, defaults to 4): each token's row is repeated this often in the loss, each copy with
        its own timestep and noise.
    num_train_timesteps (`int`, defaults to 1000): steps of the cosine schedule.
    image_token_id (`int`, defaults to 151665): the prompt token whose slots take the understanding features.
    """

    model_type = "harmon"
    sub_configs = {"llm_config": Qwen2Config}

    llm_config: dict | PreTrainedConfig | None = None
    vae_config: dict | None = None
    img_size: int = 256
    vae_stride: int = 16
    patch_size: int = 1
    vae_embed_dim: int = 16
    encoder_embed_dim: int = 1280
    encoder_depth: int = 20
    encoder_num_heads: int = 16
    decoder_embed_dim: int = 1280
    decoder_depth: int = 20
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6
    buffer_size: int = 64
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    class_num: int = 1000
    mask_ratio_min: float = 0.7
    diffloss_d: int = 12
    diffloss_w: int = 1536
    num_sampling_steps: str = "100"
    diffusion_batch_mul: int = 4
    num_train_timesteps: int = 1000
    image_token_id: int = QWEN25_IMAGE_TOKEN_ID

    def __post_init__(self, **kwargs):
        if self.llm_config is None:
            self.llm_config = Qwen2Config(**QWEN25_1_5B)
        elif isinstance(self.llm_config, dict):
            self.llm_config = Qwen2Config(**self.llm_config)
        self.vae_config = dict(self.vae_config or KL16_VAE_CONFIG)
        super().__post_init__(**kwargs)
        latent = self.vae_config.get("latent_channels", 4)
        if latent != self.vae_embed_dim:
            raise ValueError(
                f"HarmonConfig: vae_config.latent_channels is {latent} but vae_embed_dim is {self.vae_embed_dim}; "
                "set both to the autoencoder's latent channels (16 for the MAR kl16)."
            )
        for name in ("encoder", "decoder"):
            width, heads = getattr(self, f"{name}_embed_dim"), getattr(self, f"{name}_num_heads")
            if width % heads:
                raise ValueError(
                    f"HarmonConfig: {name}_embed_dim={width} is not divisible by {name}_num_heads={heads}; "
                    "pick a head count that divides the width."
                )

    @property
    def seq_h(self) -> int:
        """Side of the learned position tables, in tokens."""
        return self.img_size // self.vae_stride // self.patch_size

    @property
    def seq_len(self) -> int:
        return self.seq_h**2

    @property
    def token_embed_dim(self) -> int:
        return self.vae_embed_dim * self.patch_size**2

    @classmethod
    def harmon_0_5b(cls, **kwargs) -> HarmonConfig:
        """Harmon-0.5B: Qwen2.5-0.5B-Instruct with MAR-B and the kl16 VAE."""
        return cls(llm_config=dict(QWEN25_0_5B), **(MAR_BASE | kwargs))

    @classmethod
    def harmon_1_5b(cls, **kwargs) -> HarmonConfig:
        """Harmon-1.5B: Qwen2.5-1.5B-Instruct with MAR-H and the kl16 VAE."""
        return cls(llm_config=dict(QWEN25_1_5B), **(MAR_HUGE | kwargs))


# A saved folder's `model_type: "harmon"` resolves through the Auto classes once this module is imported.
AutoConfig.register(HarmonConfig.model_type, HarmonConfig, exist_ok=True)
