"""OpenUni as one `PreTrainedModel`, composed of transformers and diffusers classes.

The modules, named as the authors name them (`OpenUni/src/models/openuni/internvl3_sana_hf.py`):

- ``lmm``: `transformers.InternVLForConditionalGeneration` (understanding; frozen in every stage of the
  authors' training). Its LLM also carries the meta-queries.
- ``meta_queries``: `MetaQueries`, the learnable ``(num_queries, llm_width)`` queries appended after the prompt.
- ``connector``: `transformers.models.siglip.modeling_siglip.SiglipEncoder` (the authors' `ConnectorEncoder`
  has the same layers and attribute names).
- ``projector``: `nn.Linear(connector_width, transformer.caption_channels)`.
- ``transformer``: `diffusers.SanaTransformer2DModel`, the flow-matching DiT.
- ``vae``: `diffusers.AutoencoderDC` (frozen).
- ``train_scheduler``: `diffusers.FlowMatchEulerDiscreteScheduler` with shift 1 (not a module, not saved).

Saved layout (`save_pretrained` / `from_pretrained`): one folder with ``config.json`` (an `OpenUniConfig`
holding every part's config, the diffusers ones as dicts) and ``model.safetensors`` (one state dict; keys
``lmm.*`` in transformers' InternVL layout, ``meta_queries.weight``, ``connector.layers.N.*``,
``projector.*``, ``transformer.*`` and ``vae.*`` in diffusers' layout). No diffusers subfolders: the parts
are rebuilt from the dict configs and filled from the one state dict.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, InternVLForConditionalGeneration, PreTrainedModel
from transformers import initialization as init
from transformers.models.siglip.modeling_siglip import SiglipAttention, SiglipEncoder, SiglipMLP

from ...slots import check_once, slot_count_problem
from .configuration_openuni import OpenUniConfig

if TYPE_CHECKING:
    from PIL import Image

# InternViT reads ImageNet-normalised pixels (the authors' `get_semantic_features`).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MetaQueries(nn.Module):
    """The learnable queries, as a module so PEFT's ``modules_to_save`` can address them by name."""

    def __init__(self, num_queries: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_queries, hidden_size))

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.weight[None].expand(batch_size, -1, -1)


class OpenUniModel(PreTrainedModel):
    """OpenUni: InternVL3 features and a prompt -> meta-query states -> connector -> projector -> SANA.

    The methods are the model-side steps an adapter glues together: `semantic_features` (the condition
    image), `query_states` (the frozen LLM at the queries), `encoder_states` (connector and projector),
    `encode_latents` / `decode_latents` (DC-AE), `flow_loss` (the authors' training loss) and `generate`
    (diffusers' SANA pipeline with the query states as prompt embeddings).
    """

    config: OpenUniConfig
    config_class = OpenUniConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _no_split_modules = ["SiglipEncoderLayer", "SanaTransformerBlock"]

    def __init__(self, config: OpenUniConfig):
        from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel

        super().__init__(config)
        self._checked_layouts: set = set()  # batch layouts whose slot count was read once (reca_hf.slots)
        self.lmm = InternVLForConditionalGeneration(config.internvl_config)
        llm_width = config.internvl_config.text_config.hidden_size
        self.meta_queries = MetaQueries(config.num_queries, llm_width)
        # The connector is a bare encoder, not a PreTrainedModel: it takes the attention kernel chosen here.
        config.connector_config._attn_implementation = self.config._attn_implementation
        self.connector = SiglipEncoder(config.connector_config)
        self.transformer = SanaTransformer2DModel.from_config(config.transformer_config)
        self.projector = nn.Linear(config.connector_config.hidden_size, self.transformer.config.caption_channels)
        self.vae = AutoencoderDC.from_config(config.vae_config)
        # The diffusers parts come initialised by their own constructors; the generic init must not redo them.
        for module in (*self.transformer.modules(), *self.vae.modules()):
            module._is_hf_initialized = True
        self.train_scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=config.scheduler_config.get("num_train_timesteps", 1000), shift=1.0
        )
        self.register_buffer("vit_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("vit_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The authors' initialisation of the parts that are new in OpenUni (queries, connector, projector).

        transformers only hands modules that own tensors to this hook, so the connector's attention and MLP
        rules (which need to know the Linear's role) run from the top-level call.
        """
        if isinstance(module, MetaQueries):
            init.normal_(module.weight, std=1 / math.sqrt(module.weight.shape[-1]))
        elif module is getattr(self, "projector", None):
            # PyTorch's default nn.Linear init, which the authors keep for the projector.
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(module.in_features)
            init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif module is self:
            init.copy_(self.vit_mean, torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
            init.copy_(self.vit_std, torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
            for layer in self.connector.layers:
                self._init_connector_layer(layer.self_attn, layer.mlp)

    @staticmethod
    def _init_connector_layer(attention: SiglipAttention, mlp: SiglipMLP) -> None:
        for proj in (attention.q_proj, attention.k_proj, attention.v_proj, attention.out_proj):
            init.xavier_uniform_(proj.weight)
            init.zeros_(proj.bias)
        for fc in (mlp.fc1, mlp.fc2):
            init.xavier_uniform_(fc.weight)
            init.normal_(fc.bias, std=1e-6)

    def get_input_embeddings(self) -> nn.Module:
        return self.lmm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.lmm.set_input_embeddings(value)

    def train(self, mode: bool = True) -> OpenUniModel:
        """As the authors' ``train()``: the autoencoder stays in eval mode (it is never trained)."""
        super().train(mode)
        self.vae.eval()
        return self

    @property
    def image_token_id(self) -> int:
        return self.config.internvl_config.image_token_id

    def semantic_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """InternVL features of ``pixel_values`` in [-1, 1]: ImageNet-normalised, resized to one 448-px tile.

        Returns ``(batch, image_seq_length, llm_width)``, the embeddings that replace the image-context tokens.
        Runs without gradients, as the authors' (the understanding model is frozen).
        """
        with torch.no_grad():
            pixels = ((pixel_values + 1) / 2 - self.vit_mean) / self.vit_std
            size = self.config.vit_input_size
            pixels = F.interpolate(pixels, size=(size, size), mode="bilinear")
            return self.lmm.model.get_image_features(pixels.to(self.lmm.dtype), return_dict=True).pooler_output

    def query_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The LLM's last hidden states at the meta-queries appended after the prompt ``input_ids``.

        ``image_features`` (from `semantic_features`) are scattered in at the image-context tokens. As the
        authors: the prompt keeps its last ``max_length`` tokens, queries are always attended, positions are
        ``cumsum(mask) - 1``. Returns ``(batch, num_queries, llm_width)``.
        """
        embeddings = self.lmm.get_input_embeddings()(input_ids)
        slots = input_ids == self.image_token_id
        if image_features is not None:
            message = (
                "OpenUniModel.query_states: input_ids hold {found} image-context tokens (id "
                f"{self.image_token_id}) but image_features has {image_features.shape[0]} x "
                f"{image_features.shape[1]} features; put image_seq_length context tokens per image."
            )
            expected = image_features.shape[0] * image_features.shape[1]
            check_once(
                self._checked_layouts, tuple(image_features.shape[1:]), slot_count_problem(slots, expected, message)
            )
            embeddings = embeddings.masked_scatter(slots[..., None], image_features.to(embeddings.dtype))
        embeddings = embeddings[:, -self.config.max_length :]
        mask = attention_mask[:, -self.config.max_length :].bool()
        queries = self.meta_queries(input_ids.shape[0]).to(embeddings.dtype)
        embeddings = torch.cat([embeddings, queries], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], queries.shape[1])], dim=1)
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
        hidden = self.lmm.model.language_model(
            inputs_embeds=embeddings, attention_mask=mask.long(), position_ids=position_ids
        ).last_hidden_state
        return hidden[:, -self.config.num_queries :]

    def encoder_states(self, query_states: torch.Tensor) -> torch.Tensor:
        """Connector then projector: query states -> SANA's ``encoder_hidden_states`` (caption width)."""
        return self.projector(self.connector(inputs_embeds=query_states).last_hidden_state)

    def encode_latents(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """DC-AE latents of ``pixel_values`` in [-1, 1], times the autoencoder's scaling factor."""
        with torch.no_grad():
            latents = self.vae.encode(pixel_values.to(self.vae.dtype)).latent
        return latents * self.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] of scaled DC-AE ``latents``."""
        with torch.no_grad():
            return self.vae.decode(latents / self.vae.config.scaling_factor).sample

    def flow_loss(
        self,
        latents: torch.Tensor,
        encoder_states: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """The authors' flow-matching loss (`diff_loss`) of SANA on clean ``latents``.

        Noise first, then timesteps, both drawn from ``generator`` unless given: ``u ~ U[0, 1)``, the timestep
        ``t = train_scheduler.timesteps[floor(u * num_train_timesteps)]`` and its sigma from the same index
        (shift 1, so sigma is t / 1000 on the scheduler's grid), ``x_t = (1 - sigma) x0 + sigma eps``, target
        ``eps - x0``, the MSE averaged per sample in float32. ``timesteps``, when given, must be values of
        ``train_scheduler.timesteps``. ``reduction="none"`` returns the ``(batch,)`` per-sample losses.
        """
        if reduction not in ("mean", "none"):
            raise ValueError(f"OpenUniModel.flow_loss: reduction={reduction!r}; use 'mean' or 'none'.")
        batch = latents.shape[0]
        draw_device = generator.device if generator is not None else "cpu"
        if noise is None:
            noise = torch.randn(latents.shape, generator=generator, device=draw_device, dtype=torch.float32)
        noise = noise.to(device=latents.device, dtype=latents.dtype)
        schedule = self.train_scheduler.timesteps
        if timesteps is None:
            u = torch.rand(batch, generator=generator, device=draw_device).cpu()
            indices = (u * self.train_scheduler.config.num_train_timesteps).long()
        else:
            indices = self._schedule_indices(timesteps.cpu())
        timesteps = schedule[indices].to(latents.device)
        sigmas = self.train_scheduler.sigmas[indices].to(device=latents.device, dtype=latents.dtype)
        sigmas = sigmas.view(batch, *([1] * (latents.ndim - 1)))
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        prediction = self.transformer(
            hidden_states=noisy, encoder_hidden_states=encoder_states, timestep=timesteps, return_dict=False
        )[0]
        target = noise - latents
        per_sample = ((prediction.float() - target.float()) ** 2).reshape(batch, -1).mean(dim=1)
        return per_sample.mean() if reduction == "mean" else per_sample

    def _schedule_indices(self, timesteps: torch.Tensor) -> torch.Tensor:
        schedule = self.train_scheduler.timesteps
        matches = timesteps[:, None] == schedule[None, :]
        off_grid = ~matches.any(dim=1)
        if off_grid.any():
            raise ValueError(
                f"OpenUniModel.flow_loss: timesteps {timesteps[off_grid].tolist()} are not on the training "
                "schedule; pick values of model.train_scheduler.timesteps."
            )
        return matches.float().argmax(dim=1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        condition_pixel_values: torch.Tensor | None = None,
        **loss_kwargs,
    ) -> torch.Tensor:
        """The authors' image-to-image loss: condition ``condition_pixel_values`` (default: the target),
        prompt ``input_ids`` with image-context slots, target ``pixel_values`` at ``image_size``; in [-1, 1].
        ``loss_kwargs`` go to `flow_loss`."""
        source = pixel_values if condition_pixel_values is None else condition_pixel_values
        features = self.semantic_features(source)
        states = self.encoder_states(self.query_states(input_ids, attention_mask, features))
        return self.flow_loss(self.encode_latents(pixel_values), states, **loss_kwargs)

    @torch.no_grad()
    def generate(
        self,
        encoder_states: torch.Tensor,
        negative_encoder_states: torch.Tensor | None = None,
        *,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 4.5,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
    ) -> list[Image.Image] | torch.Tensor:
        """Sample images with diffusers' `SanaPipeline`, the projected query states as prompt embeddings.

        The authors' sampler: DPM-Solver (SANA's scheduler config, flow shift 3), 20 steps, CFG 4.5 against
        ``negative_encoder_states`` (the query states of their null prompt), no resolution binning.
        ``guidance_scale <= 1`` needs no negative states. Returns PIL images (or what ``output_type`` asks).
        """
        from diffusers import DPMSolverMultistepScheduler, SanaPipeline

        if guidance_scale > 1 and negative_encoder_states is None:
            raise ValueError(
                f"OpenUniModel.generate: guidance_scale={guidance_scale} needs negative_encoder_states (the "
                "encoder states of the null prompt); pass them or set guidance_scale=1."
            )
        pipeline = SanaPipeline(
            tokenizer=None,
            text_encoder=None,
            vae=self.vae,
            transformer=self.transformer,
            scheduler=DPMSolverMultistepScheduler.from_config(self.config.scheduler_config),
        )
        pipeline.set_progress_bar_config(disable=True)

        def mask(states: torch.Tensor) -> torch.Tensor:
            return torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)

        negative = {}
        if negative_encoder_states is not None:
            negative = {
                "negative_prompt_embeds": negative_encoder_states,
                "negative_prompt_attention_mask": mask(negative_encoder_states),
            }
        return pipeline(
            prompt_embeds=encoder_states,
            prompt_attention_mask=mask(encoder_states),
            negative_prompt=None,
            height=height or self.config.image_size,
            width=width or self.config.image_size,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
            complex_human_instruction=None,
            use_resolution_binning=False,
            output_type=output_type,
            **negative,
        ).images


AutoModel.register(OpenUniConfig, OpenUniModel, exist_ok=True)  # `AutoModel.from_pretrained` of an OpenUni folder
