"""The configuration of a BAGEL model: the LLM, the ViT and the VAE configs and BAGEL's own settings in one file.

The defaults are BAGEL-7B-MoT's (Qwen2.5-7B with a generation expert per layer, SigLIP so400m-14-980 with its last
layer dropped, the FLUX VAE), so ``BagelModel(BagelConfig())`` on the meta device has the real shapes. The VAE is
stored as the plain dict `diffusers.AutoencoderKL.from_config` reads, so the config module imports no diffusers.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.qwen2 import Qwen2Config
from transformers.models.siglip import SiglipVisionConfig

# Qwen2.5-7B-Instruct, the LLM of BAGEL-7B-MoT (its `llm_config.json`).
_LLM_DEFAULTS = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
}
# SigLIP so400m-patch14-980 as the authors run it: 27 layers - 1 (`vit_select_layer=-2`), a 70x70 position table.
_VIT_DEFAULTS = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 26,
    "num_attention_heads": 16,
    "image_size": 980,
    "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}
# The FLUX autoencoder (`ae.safetensors`) in diffusers' AutoencoderKL terms.
FLUX_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}
# Qwen2.5's ids of the four tokens BAGEL frames its splits with.
_SPECIAL_TOKEN_IDS = {"im_start": 151644, "im_end": 151645, "vision_start": 151652, "vision_end": 151653}


@strict
class BagelConfig(PreTrainedConfig):
    r"""
    llm_config (`dict` or `Qwen2Config`):
        The language model. Every layer holds two experts of this shape (understanding and generation, the latter
        named ``*_moe_gen``) with q/k RMS norms; text and ViT tokens go to the first, VAE tokens to the second.
    vit_config (`dict` or `SiglipVisionConfig`):
        The understanding encoder (SigLIP NaViT). ``num_hidden_layers`` is the number of layers run (the authors drop
        the last of the released 27); ``image_size // patch_size`` is the side of its learned position table.
    vae_config (`dict`):
        `diffusers.AutoencoderKL` config of the FLUX VAE; its ``scaling_factor`` and ``shift_factor`` map a latent
        ``z`` to ``scaling_factor * (z - shift_factor)``, the space the flow runs in.
    latent_patch_size (`int`, defaults to 2):
        Latent patches per token side (a token is ``p * p * latent_channels`` wide).
    max_latent_size (`int`, defaults to 64):
        Side of the latent sin-cos position table: latent grids up to this many tokens per side (64: 1024 px).
    vit_max_num_patch_per_side (`int`, defaults to 70):
        Side of the ViT sin-cos position table added after the connector.
    connector_act (`str`, defaults to `"gelu_pytorch_tanh"`):
        Activation of the ViT-to-LLM connector MLP.
    timestep_shift (`float`, defaults to 1.0):
        Training timestep shift ``s t / (1 + (s - 1) t)`` (1: none, the RecA setting).
    freeze_und (`bool`, defaults to `False`):
        The authors' ``freeze_und`` (True in the RecA command): the understanding tokens' states, keys and values are
        constants for the gradient. Besides giving the understanding side no gradient, this changes the generation
        experts' gradient: the two special tokens inside the VAE split attend to the VAE tokens and are attended by
        them in the next layer, and with ``freeze_und`` no gradient flows back through them.
    im_start_token_id, im_end_token_id, vision_start_token_id, vision_end_token_id (`int`):
        The tokens that open and close the text split and each image split.
    """

    model_type = "bagel"
    sub_configs_defaults = {
        "llm_config": SubConfigSpec(config_class=Qwen2Config, init_kwargs=_LLM_DEFAULTS),
        "vit_config": SubConfigSpec(config_class=SiglipVisionConfig, init_kwargs=_VIT_DEFAULTS),
    }

    llm_config: dict | PreTrainedConfig | None = None
    vit_config: dict | PreTrainedConfig | None = None
    vae_config: dict | None = None
    latent_patch_size: int = 2
    max_latent_size: int = 64
    vit_max_num_patch_per_side: int = 70
    connector_act: str = "gelu_pytorch_tanh"
    timestep_shift: float = 1.0
    freeze_und: bool = False
    im_start_token_id: int = _SPECIAL_TOKEN_IDS["im_start"]
    im_end_token_id: int = _SPECIAL_TOKEN_IDS["im_end"]
    vision_start_token_id: int = _SPECIAL_TOKEN_IDS["vision_start"]
    vision_end_token_id: int = _SPECIAL_TOKEN_IDS["vision_end"]

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.vae_config = dict(FLUX_VAE_CONFIG if self.vae_config is None else self.vae_config)
        for name in ("scaling_factor", "shift_factor"):
            if self.vae_config.get(name) is None:
                raise ValueError(
                    f"BagelConfig: vae_config has no {name}; set it (the FLUX VAE's are scaling_factor=0.3611, "
                    "shift_factor=0.1159)."
                )
        vocab = self.llm_config.vocab_size
        for name in ("im_start_token_id", "im_end_token_id", "vision_start_token_id", "vision_end_token_id"):
            if not 0 <= getattr(self, name) < vocab:
                raise ValueError(
                    f"BagelConfig: {name}={getattr(self, name)} is outside the LLM's vocabulary of {vocab}; set it to "
                    "the tokenizer's id of that token (Qwen2.5's <|im_start|>, <|im_end|>, <|vision_start|>, "
                    "<|vision_end|> are 151644, 151645, 151652, 151653)."
                )
        if self.timestep_shift <= 0:
            raise ValueError(f"BagelConfig: timestep_shift={self.timestep_shift}; it must be positive (1: no shift).")

    @property
    def latent_downsample(self) -> int:
        """Pixels per latent token side: the VAE's downsampling times ``latent_patch_size``."""
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1) * self.latent_patch_size

    @property
    def latent_channels(self) -> int:
        return self.vae_config["latent_channels"]


# So a saved folder's `model_type: "bagel"` resolves through the Auto classes once this module is imported.
AutoConfig.register(BagelConfig.model_type, BagelConfig, exist_ok=True)
