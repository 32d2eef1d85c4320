"""The configurations of Show-o and of its MAGVIT-v2 tokenizer.

Defaults are the released models' (Hub ``showlab/show-o``, ``showlab/magvitv2``, the RecA configs in the authors'
``Show-o/configs/``): Phi-1.5 with its vocabulary of 50,295 text tokens extended by 10 special tokens, the 8,192
MAGVIT-v2 codes and one mask token (58,498 in all).
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.clip import CLIPVisionConfig
from transformers.models.phi import PhiConfig

# The tokens the authors' prompting code adds to the Phi tokenizer, in its order: '[PAD]' as the pad token,
# then the nine task and boundary tokens. Their ids follow the text vocabulary, and the image codes follow them.
SPECIAL_TOKENS = (
    "[PAD]",
    "<|soi|>",
    "<|eoi|>",
    "<|sov|>",
    "<|eov|>",
    "<|t2i|>",
    "<|mmu|>",
    "<|t2v|>",
    "<|v2v|>",
    "<|lvg|>",
)

# CLIP ViT-L/14-336 (openai/clip-vit-large-patch14-336), the CLIP variant's understanding encoder.
_CLIP_DEFAULTS = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}


@strict
class MagvitV2Config(PreTrainedConfig):
    r"""
    ch (`int`, defaults to 128):
        The width of the first level; level ``i`` is ``ch * ch_mult[i]`` wide.
    encoder_ch_mult / decoder_ch_mult (`list[int]`):
        Width multipliers per level (the released tokenizer: ``[1, 2, 2, 4, 4]`` and ``[1, 1, 2, 2, 4]``). The
        stride is ``2 ** (len(ch_mult) - 1)`` (16 for five levels).
    encoder_num_res_blocks / decoder_num_res_blocks (`list[int]`):
        Residual blocks per level (``[4, 3, 4, 3, 4]`` and ``[4, 4, 3, 4, 3]``).
    attn_resolutions (`list[int]`, defaults to `[5]`):
        Levels whose side (counted from ``resolution``) is listed get an attention block after each res block; the
        released value matches no level, so attention runs in the middle blocks only.
    resolution (`int`, defaults to 256):
        Only used to place ``attn_resolutions``; the tokenizer runs at any size divisible by the stride.
    z_channels (`int`, defaults to 13):
        Latent channels, one bit each: the codebook has ``2 ** z_channels`` codes.
    """

    model_type = "showo_magvitv2"

    ch: int = 128
    encoder_ch_mult: list[int] | tuple[int, ...] = (1, 2, 2, 4, 4)
    encoder_num_res_blocks: list[int] | tuple[int, ...] = (4, 3, 4, 3, 4)
    decoder_ch_mult: list[int] | tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_num_res_blocks: list[int] | tuple[int, ...] = (4, 4, 3, 4, 3)
    attn_resolutions: list[int] | tuple[int, ...] = (5,)
    dropout: float = 0.0
    in_channels: int = 3
    out_channels: int = 3
    resolution: int = 256
    z_channels: int = 13

    def __post_init__(self, **kwargs):
        for name in ("encoder_ch_mult", "encoder_num_res_blocks", "decoder_ch_mult", "decoder_num_res_blocks"):
            setattr(self, name, list(getattr(self, name)))
        self.attn_resolutions = list(self.attn_resolutions)
        super().__post_init__(**kwargs)
        for side in ("encoder", "decoder"):
            mult, blocks = getattr(self, f"{side}_ch_mult"), getattr(self, f"{side}_num_res_blocks")
            if len(mult) != len(blocks):
                raise ValueError(
                    f"MagvitV2Config: {side}_ch_mult has {len(mult)} levels but {side}_num_res_blocks has "
                    f"{len(blocks)}; give one block count per level."
                )
        if len(self.encoder_ch_mult) != len(self.decoder_ch_mult):
            raise ValueError(
                f"MagvitV2Config: the encoder has {len(self.encoder_ch_mult)} levels and the decoder "
                f"{len(self.decoder_ch_mult)}; they must match so decoding undoes the encoder's stride."
            )
        widths = [self.ch * m for m in (*self.encoder_ch_mult, *self.decoder_ch_mult, 1)]
        if any(width % 32 for width in widths):
            raise ValueError(
                f"MagvitV2Config: ch={self.ch} with these multipliers gives widths {sorted(set(widths))}; every "
                "width must be a multiple of 32 (the blocks' GroupNorm has 32 groups)."
            )

    @property
    def codebook_size(self) -> int:
        return 2**self.z_channels

    @property
    def stride(self) -> int:
        return 2 ** (len(self.encoder_ch_mult) - 1)


@strict
class ShowoConfig(PreTrainedConfig):
    r"""
    llm_config (`dict` or `PhiConfig`):
        The transformer (Phi-1.5 by default). Its `vocab_size` is set to this config's `vocab_size`, and its
        `qk_layernorm` to True (Show-o's Phi always normalises queries and keys per head).
    vq_config (`dict` or `MagvitV2Config`):
        The image tokenizer; its codebook size must equal `codebook_size`.
    vision_config (`dict` or `CLIPVisionConfig`, *optional*):
        The CLIP variant's understanding encoder (`w_clip_vit=True`; CLIP ViT-L/14-336 by default); unused otherwise.
    w_clip_vit (`bool`, defaults to `False`):
        The CLIP variant: understanding (and the RecA condition) through CLIP features and `mm_projector`.
    llm_vocab_size (`int`, defaults to 50295):
        The text tokenizer's size before the 10 special tokens are added (Phi-1.5's).
    num_new_special_tokens (`int`, defaults to 10):
        The special tokens after the text vocabulary (`SPECIAL_TOKENS`).
    codebook_size (`int`, defaults to 8192):
        Image codes; they follow the special tokens, and the mask token follows them.
    num_vq_tokens (`int`, defaults to 256):
        Codes per image: 256 at 256 px, 1024 at 512 px (stride 16).
    max_seq_length (`int`, defaults to 128):
        The text budget of the sequences (the authors' `dataset.preprocessing.max_seq_length`: 128 for the
        256-px models, 381 for RecA at 512 px): pads, the task token and the text fill `max_seq_length + 1`.
    clip_text_length (`int`, defaults to 128):
        The CLIP variant's recon sequence: the slots for `<|mmu|>`, `<|soi|>`, `<|eoi|>`, the text and the right
        pads, not counting the CLIP features (the authors' fixed 128).
    clip_feature_layer (`int`, defaults to -2):
        The CLIP hidden state used as features (without `post_layernorm`, CLS dropped).
    """

    model_type = "showo"
    sub_configs_defaults = {
        "llm_config": PhiConfig,
        "vq_config": MagvitV2Config,
        "vision_config": SubConfigSpec(config_class=CLIPVisionConfig, init_kwargs=_CLIP_DEFAULTS, optional=True),
    }

    llm_config: dict | PreTrainedConfig | None = None
    vq_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    w_clip_vit: bool = False
    llm_vocab_size: int = 50295
    num_new_special_tokens: int = 10
    codebook_size: int = 8192
    num_vq_tokens: int = 256
    max_seq_length: int = 128
    clip_text_length: int = 128
    clip_feature_layer: int = -2

    def __post_init__(self, **kwargs):
        if self.w_clip_vit and self.vision_config is None:
            self.vision_config = dict(_CLIP_DEFAULTS)
        super().__post_init__(**kwargs)
        if self.num_new_special_tokens != len(SPECIAL_TOKENS):
            raise ValueError(
                f"ShowoConfig: num_new_special_tokens={self.num_new_special_tokens}, but Show-o's prompting adds "
                f"{len(SPECIAL_TOKENS)} ({', '.join(SPECIAL_TOKENS)}); set num_new_special_tokens={len(SPECIAL_TOKENS)}."
            )
        if self.vq_config.codebook_size != self.codebook_size:
            raise ValueError(
                f"ShowoConfig: codebook_size={self.codebook_size} but vq_config has z_channels="
                f"{self.vq_config.z_channels} ({self.vq_config.codebook_size} codes); make them agree."
            )
        side = round(self.num_vq_tokens**0.5)
        if side * side != self.num_vq_tokens:
            raise ValueError(f"ShowoConfig: num_vq_tokens={self.num_vq_tokens} is not a square grid of codes.")
        self.llm_config.vocab_size = self.vocab_size
        # Show-o's Phi sets qk_layernorm whatever the Phi config says (`models/phi.py`, `PhiForCausalLM.__init__`):
        # every released checkpoint has per-head q_layernorm / k_layernorm weights.
        self.llm_config.qk_layernorm = True

    @property
    def vocab_size(self) -> int:
        """Text tokens, special tokens, codes and the mask token."""
        return self.llm_vocab_size + self.num_new_special_tokens + self.codebook_size + 1

    @property
    def code_offset(self) -> int:
        """The LLM token id of code 0."""
        return self.llm_vocab_size + self.num_new_special_tokens

    @property
    def mask_token_id(self) -> int:
        return self.vocab_size - 1

    def special_token_id(self, token: str) -> int:
        """The id of one of `SPECIAL_TOKENS` (e.g. ``"<|soi|>"``)."""
        return self.llm_vocab_size + SPECIAL_TOKENS.index(token)

    @property
    def image_size(self) -> int:
        """The generation side in pixels."""
        return round(self.num_vq_tokens**0.5) * self.vq_config.stride


# A saved folder's `model_type` resolves through the Auto classes once this module is imported.
AutoConfig.register(ShowoConfig.model_type, ShowoConfig, exist_ok=True)
AutoConfig.register(MagvitV2Config.model_type, MagvitV2Config, exist_ok=True)
