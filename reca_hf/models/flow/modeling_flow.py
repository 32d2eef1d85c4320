"""A tiny flow-matching unified model, built from transformers and diffusers parts.

MetaQuery-style, like OpenUni at toy size: a SigLIP vision encoder reads the condition image, its features
fill the image slots of a chat prompt for a small Llama, learnable queries follow the prompt, and the
Llama's hidden states at the queries condition a SANA diffusion transformer that predicts the flow-matching
velocity on the latents of a KL autoencoder. It exists to exercise the continuous-target contract of reca_hf
(per-sample losses with fixed noise, the loss-based collapse probe) on CPU in seconds.

``condition_encoder="latents"`` replaces SigLIP by the autoencoder itself: the condition is then the target's
own latents, the same representation the generator predicts. That is the copy-and-collapse setting the
bottleneck ablation (``benchmarks/bottleneck_ablation.py --kind flow``) needs. With ``aligned_condition=True`` (the
``flow_latents`` default) the language model's hidden states at the condition slots also reach the generator
on its own latent grid: projected to latent channels, resized to the grid and concatenated to the noisy
latents, as in models that generate inside the sequence that holds their condition (Show-o, Harmon, BAGEL),
where a target position finds its condition position directly. The queries alone are a bottleneck of their
own here: a random two-layer language model averages the 64 slots into 16 queries (a linear read of the
target from the query states explains about 5% of its variance, from the slot states about 90%), and the
transformer's cross-attention had not learnt to use even an exact copy of the target's latents after 600
steps.

Everything lives in one ``PreTrainedModel``, so ``save_pretrained`` writes one ``model.safetensors`` and
``config.json`` and ``from_pretrained`` restores it.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, PreTrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec

from ...slots import check_once, slot_count_problem

CONDITION_ENCODERS = ("vision", "latents")


class TinyFlowConfig(PreTrainedConfig):
    """Configuration of :class:`TinyFlowModel`.

    ``transformer_config`` and ``vae_config`` are the keyword arguments of diffusers'
    ``SanaTransformer2DModel`` and ``AutoencoderKL``; ``num_queries`` learnable queries carry the condition
    to the transformer; ``aligned_condition`` also hands it the hidden states at the condition slots on its
    latent grid (its ``in_channels`` must then be twice the latent channels); ``image_token_id`` is the
    prompt's image-slot token.
    """

    model_type = "reca_tiny_flow"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="siglip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    transformer_config: dict | None = None
    vae_config: dict | None = None
    num_queries: int = 16
    condition_encoder: str = "vision"
    aligned_condition: bool = False
    image_token_id: int = 0
    image_size: int = 32


class MetaQueries(torch.nn.Module):
    """Learnable query embeddings appended after the prompt (a module, so PEFT can save it as trained)."""

    def __init__(self, num_queries: int, hidden_size: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(num_queries, hidden_size) * 0.02)

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.weight.unsqueeze(0).expand(batch_size, -1, -1)


class TinyFlowModel(PreTrainedModel):
    """Understanding: ``vision_model`` (or the autoencoder) -> ``condition_projector`` -> ``language_model``.
    Generation: ``queries`` -> ``language_model`` -> ``query_projector`` -> ``transformer`` on ``vae`` latents."""

    config_class = TinyFlowConfig
    base_model_prefix = "tiny_flow"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True

    def __init__(self, config: TinyFlowConfig):
        super().__init__(config)
        from diffusers import AutoencoderKL, SanaTransformer2DModel
        from transformers import LlamaModel, SiglipVisionModel

        if config.condition_encoder not in CONDITION_ENCODERS:
            raise ValueError(
                f"condition_encoder={config.condition_encoder!r}: choose one of {', '.join(CONDITION_ENCODERS)}"
            )
        hidden = config.text_config.hidden_size
        self._checked_layouts: set = set()  # batch layouts whose slot count was read once (reca_hf.slots)
        self.vae = AutoencoderKL(**config.vae_config)
        if config.condition_encoder == "vision":
            self.vision_model = SiglipVisionModel(config.vision_config)
            condition_width = config.vision_config.hidden_size
        else:
            self.vision_model = None
            condition_width = self.vae.config.latent_channels
        self.condition_projector = torch.nn.Linear(condition_width, hidden)
        self.language_model = LlamaModel(config.text_config)
        self.queries = MetaQueries(config.num_queries, hidden)
        self.transformer = SanaTransformer2DModel(**config.transformer_config)
        self.query_projector = torch.nn.Linear(hidden, self.transformer.config.caption_channels)
        self.grid_projector = None
        if config.aligned_condition:
            channels = self.vae.config.latent_channels
            if self.transformer.config.in_channels != 2 * channels:
                raise ValueError(
                    f"aligned_condition=True concatenates the condition grid to the noisy latents: the transformer's "
                    f"in_channels must be {2 * channels}, not {self.transformer.config.in_channels}"
                )
            self.grid_projector = torch.nn.Linear(self.transformer.config.caption_channels, channels)
        self.post_init()

    # ---- understanding ----

    def latents(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Scaled autoencoder latents of images in [-1, 1] (the posterior mode: deterministic)."""
        posterior = self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist
        return posterior.mode() * self.vae.config.scaling_factor

    def condition_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, N, hidden)`` understanding features of the condition images, ready for the prompt's slots."""
        if self.vision_model is not None:
            native = pixel_values.shape[-1] == self.config.vision_config.image_size
            features = self.vision_model(
                pixel_values=pixel_values.to(self.vision_model.dtype), interpolate_pos_encoding=not native
            ).last_hidden_state
        else:
            features = self.latents(pixel_values).flatten(2).transpose(1, 2)
        return self.condition_projector(features)

    def num_condition_tokens(self, resolution: int) -> int:
        if self.config.condition_encoder == "vision":
            return (resolution // self.config.vision_config.patch_size) ** 2
        return (resolution // self.latent_stride) ** 2

    @property
    def latent_stride(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # ---- generation ----

    def encoder_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        condition_pixel_values: torch.Tensor | None = None,
        condition_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The transformer's conditioning: the language model's hidden states at the queries, projected
        (``(B, num_queries, C)``); with ``aligned_condition`` the projected states at the condition slots follow
        the queries (``(B, num_queries + N, C)``, N = 0 without a condition image)."""
        embeddings = self.language_model.get_input_embeddings()(input_ids)
        if condition_pixel_values is not None:
            features = self.condition_features(condition_pixel_values)
            mask = condition_mask.to(embeddings.device)
            message = (
                "{found} condition slots in the prompt but {expected} condition features: the batch's condition "
                "resolution and its prompt disagree"
            )
            expected = features.shape[0] * features.shape[1]
            check_once(self._checked_layouts, tuple(condition_pixel_values.shape[1:]),
                       slot_count_problem(mask, expected, message))  # fmt: skip
            embeddings = embeddings.masked_scatter(mask.unsqueeze(-1), features.to(embeddings.dtype))
        batch_size = input_ids.shape[0]
        queries = self.queries(batch_size).to(embeddings.dtype)
        embeddings = torch.cat([embeddings, queries], dim=1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch_size, queries.shape[1])], dim=1)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # prompts are left-padded
        hidden = self.language_model(
            inputs_embeds=embeddings, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state
        states = hidden[:, -queries.shape[1] :]
        if self.grid_projector is not None and condition_pixel_values is not None:
            slots = hidden[:, : -queries.shape[1]][condition_mask.to(hidden.device)]
            states = torch.cat([states, slots.view(batch_size, -1, hidden.shape[-1])], dim=1)
        return self.query_projector(states)

    def condition_grid(self, states: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The slot states of ``states`` as latent channels on a grid of ``shape`` (zeros without a condition)."""
        slots = states[:, self.config.num_queries :]
        if slots.shape[1] == 0:
            return states.new_zeros(shape)
        side = int(round(slots.shape[1] ** 0.5))
        grid = self.grid_projector(slots).transpose(1, 2).reshape(shape[0], shape[1], side, side)
        return torch.nn.functional.interpolate(grid, size=tuple(shape[-2:]), mode="nearest")

    def velocity(self, noisy_latents: torch.Tensor, sigmas: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """The transformer's velocity prediction at noise levels ``sigmas`` in [0, 1] (timestep = 1000 sigma)."""
        if self.grid_projector is not None:
            grid = self.condition_grid(states, noisy_latents.shape)
            noisy_latents = torch.cat([noisy_latents, grid.to(noisy_latents.dtype)], dim=1)
            states = states[:, : self.config.num_queries]
        return self.transformer(
            noisy_latents.to(self.transformer.dtype),
            encoder_hidden_states=states.to(self.transformer.dtype),
            timestep=sigmas.to(self.transformer.dtype) * 1000,
        ).sample

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from scaled latents."""
        return self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample.clamp(-1, 1)

    def _init_weights(self, module: torch.nn.Module) -> None:
        # transformers loads on the meta device and re-creates non-persistent buffers through this hook:
        # diffusers' sin-cos position table is one, so it is recomputed here.
        from diffusers.models.embeddings import PatchEmbed, get_2d_sincos_pos_embed

        if isinstance(module, PatchEmbed) and getattr(module, "pos_embed", None) is not None:
            table = get_2d_sincos_pos_embed(
                module.proj.out_channels,
                module.height,
                base_size=module.base_size,
                interpolation_scale=module.interpolation_scale,
                output_type="pt",
            )
            with torch.no_grad():
                module.pos_embed.copy_(table.float().unsqueeze(0))
            return
        super()._init_weights(module)


class TinyFlowLatentsConfig(TinyFlowConfig):
    """:class:`TinyFlowConfig` whose condition is the autoencoder's latents (its own model type, so that
    `get_adapter` picks the same-space adapter and the shortcut guard applies)."""

    model_type = "reca_tiny_flow_latents"
    condition_encoder: str = "latents"
    aligned_condition: bool = True
