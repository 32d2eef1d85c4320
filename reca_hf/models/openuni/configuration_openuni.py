"""The configuration of an OpenUni model: every part's config in one ``config.json``.

The transformers parts (InternVL3 and the SigLIP-layout connector) are real sub-configs; the diffusers parts
(SANA, DC-AE, the sampling scheduler) are stored as the plain dicts their ``from_config`` reads, so the
config module imports no diffusers.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.internvl import InternVLConfig
from transformers.models.siglip import SiglipVisionConfig

# The connector of OpenUni-B-512 (`configs/models/openuni_b_internvl3_1b_sana_0_6b_512_hf.py` in the authors'
# repository): six pre-LN bidirectional layers at the LLM's width, without position embeddings.
_CONNECTOR_DEFAULTS = {
    "hidden_size": 896,
    "intermediate_size": 3072,
    "num_hidden_layers": 6,
    "num_attention_heads": 14,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}


@strict
class OpenUniConfig(PreTrainedConfig):
    r"""
    internvl_config (`dict` or `InternVLConfig`):
        The understanding model (InternVL3 in transformers' layout). It also embeds the prompt and runs the
        meta-queries through its LLM.
    connector_config (`dict` or `SiglipVisionConfig`):
        The connector, a `SiglipEncoder`; only the encoder fields matter (no patch embedding is built). Its
        `hidden_size` must equal the LLM's (the authors' `proj_type="enc_proj"`).
    num_queries (`int`, defaults to 256):
        The learnable meta-queries appended after the prompt.
    transformer_config (`dict`):
        `diffusers.SanaTransformer2DModel` config. Its `caption_channels` is the projector's output width.
    vae_config (`dict`):
        `diffusers.AutoencoderDC` config; `scaling_factor` scales the latents the transformer sees.
    scheduler_config (`dict`):
        `diffusers.DPMSolverMultistepScheduler` config used for sampling (SANA's, with `flow_shift` 3). The
        training scheduler is a `FlowMatchEulerDiscreteScheduler` with its `num_train_timesteps` and shift 1,
        which is what the authors' `FlowMatchEulerDiscreteScheduler.from_pretrained(<sana>, "scheduler")` gets
        from that config (it has no `shift` key).
    vit_input_size (`int`, defaults to 448):
        The side the condition image is resized to before InternViT (one tile, no dynamic tiling).
    image_size (`int`, defaults to 512):
        The generation side in pixels (the reconstruction target's size).
    max_length (`int`, defaults to 2048):
        Prompts longer than this keep their last `max_length` tokens, before the queries are appended.
    """

    model_type = "openuni"
    sub_configs_defaults = {
        "internvl_config": InternVLConfig,
        "connector_config": SubConfigSpec(config_class=SiglipVisionConfig, init_kwargs=_CONNECTOR_DEFAULTS),
    }

    internvl_config: dict | PreTrainedConfig | None = None
    connector_config: dict | PreTrainedConfig | None = None
    num_queries: int = 256
    transformer_config: dict | None = None
    vae_config: dict | None = None
    scheduler_config: dict | None = None
    vit_input_size: int = 448
    image_size: int = 512
    max_length: int = 2048

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.transformer_config = dict(self.transformer_config or {})
        self.vae_config = dict(self.vae_config or {})
        self.scheduler_config = dict(self.scheduler_config or {})
        llm_width = self.internvl_config.text_config.hidden_size
        if self.connector_config.hidden_size != llm_width:
            raise ValueError(
                f"OpenUniConfig: connector_config.hidden_size is {self.connector_config.hidden_size} but the "
                f"InternVL LLM is {llm_width} wide; set connector_config.hidden_size={llm_width} (the queries "
                "enter the connector at the LLM's width)."
            )


# So a saved folder's `model_type: "openuni"` resolves through the Auto classes once this module is imported.
AutoConfig.register(OpenUniConfig.model_type, OpenUniConfig, exist_ok=True)
