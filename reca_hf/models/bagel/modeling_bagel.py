"""BAGEL as one `PreTrainedModel`, composed of transformers and diffusers parts.

The modules, named as the authors name them (`BAGEL/modeling/bagel/` of `wishhyt/reconstruction-alignment`), so the
converter's key map is nearly the identity:

- ``language_model``: the Qwen2 Mixture-of-Transformers. Each `BagelMoTDecoderLayer` holds an understanding expert
  (``q/k/v/o_proj``, ``q_norm``/``k_norm``, ``mlp``, the two RMS norms) and a generation expert (the same modules
  named ``*_moe_gen``); tokens are routed by position (VAE tokens to the generation expert, every other token,
  the special tokens around the VAE block included, to the understanding one), attention runs over all of them.
  Built from transformers' `Qwen2MLP`, `Qwen2RMSNorm`, `Qwen2RotaryEmbedding` and attention kernels.
- ``vit_model``: SigLIP NaViT: `BagelVisionEmbeddings` (a Conv2d patch embedding and SigLIP's learned position
  table, read at the authors' extrapolated ids ``row * side + col``), transformers' `SiglipEncoder` and a LayerNorm.
- ``connector`` (fc1-gelu-fc2), ``vit_pos_embed`` and ``latent_pos_embed`` (frozen 2-D sin-cos tables, buffers),
  ``time_embedder`` (diffusers' `TimestepEmbedding` on `Timesteps(flip_sin_to_cos=True)`), ``vae2llm``/``llm2vae``.
- ``vae``: the FLUX autoencoder as `diffusers.AutoencoderKL` (frozen; the posterior is sampled).

Training runs on a **padded batch**: one row per sample, a per-sample 4-D additive attention mask (the authors'
`prepare_attention_mask_per_sample`: ViT split full, text causal, VAE split full and invisible to other rows), pad
rows attending to themselves only. `pack_sequences` builds that layout. The authors pack all samples into one row
with the same per-sample masks; on the VAE tokens both give the same numbers (see ``docs/parity.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, DynamicCache, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2MLP,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.models.siglip.modeling_siglip import SiglipEncoder
from transformers.utils import ModelOutput

from .configuration_bagel import BagelConfig
from .generation_bagel import BagelFlowSampler


def _route(
    hidden: torch.Tensor, gen_mask: torch.Tensor, und: Callable, gen: Callable, detach_und: bool = False
) -> torch.Tensor:
    """``und`` on the tokens where ``gen_mask`` is False, ``gen`` on the others, put back in place; ``detach_und``
    cuts the gradient through the understanding tokens' results (the authors' ``freeze_und``)."""
    und_out = und(hidden[~gen_mask])
    if detach_und:
        und_out = und_out.detach()
    gen_out = gen(hidden[gen_mask])
    out = und_out.new_empty((*gen_mask.shape, und_out.shape[-1]))
    out[~gen_mask] = und_out
    out[gen_mask] = gen_out.to(und_out.dtype)
    return out


class BagelMoTAttention(nn.Module):
    """Qwen2 attention with q/k RMS norms, twice: ``*_proj``/``*_norm`` for understanding tokens and
    ``*_proj_moe_gen``/``*_norm_moe_gen`` for generation tokens; one attention over the whole row."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False  # the mask says everything
        width, q_width, kv_width = (
            config.hidden_size,
            self.num_heads * self.head_dim,
            self.num_key_value_heads * self.head_dim,
        )
        eps = config.rms_norm_eps
        # the authors' order (the understanding expert first), which fixes the tiny model's random draws
        self.q_proj = nn.Linear(width, q_width)
        self.k_proj = nn.Linear(width, kv_width)
        self.v_proj = nn.Linear(width, kv_width)
        self.o_proj = nn.Linear(q_width, width, bias=False)
        self.q_norm = Qwen2RMSNorm(self.head_dim, eps=eps)
        self.k_norm = Qwen2RMSNorm(self.head_dim, eps=eps)
        self.q_proj_moe_gen = nn.Linear(width, q_width)
        self.k_proj_moe_gen = nn.Linear(width, kv_width)
        self.v_proj_moe_gen = nn.Linear(width, kv_width)
        self.o_proj_moe_gen = nn.Linear(q_width, width, bias=False)
        self.q_norm_moe_gen = Qwen2RMSNorm(self.head_dim, eps=eps)
        self.k_norm_moe_gen = Qwen2RMSNorm(self.head_dim, eps=eps)

    def _heads(self, states: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """``(n, heads * head_dim)`` -> per-head RMS-normed ``(n, heads * head_dim)``."""
        states = states.view(*states.shape[:-1], states.shape[-1] // self.head_dim, self.head_dim)
        return norm(states).flatten(-2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        gen_mask: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        freeze_und: bool = False,
        cache: DynamicCache | None = None,
        update_cache: bool = False,
    ) -> torch.Tensor:
        """``cache``: the keys and values of earlier tokens (after RoPE), attended before these; ``update_cache``
        appends these tokens' to it."""
        batch, length = gen_mask.shape
        query = _route(
            hidden_states,
            gen_mask,
            lambda x: self._heads(self.q_proj(x), self.q_norm),
            lambda x: self._heads(self.q_proj_moe_gen(x), self.q_norm_moe_gen),
            freeze_und,
        )
        key = _route(
            hidden_states,
            gen_mask,
            lambda x: self._heads(self.k_proj(x), self.k_norm),
            lambda x: self._heads(self.k_proj_moe_gen(x), self.k_norm_moe_gen),
            freeze_und,
        )
        value = _route(hidden_states, gen_mask, self.v_proj, self.v_proj_moe_gen, freeze_und)
        query = query.view(batch, length, -1, self.head_dim).transpose(1, 2)
        key = key.view(batch, length, -1, self.head_dim).transpose(1, 2)
        value = value.view(batch, length, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            if update_cache:
                key, value = cache.update(key, value, self.layer_idx)
            elif len(cache.layers) > self.layer_idx and cache.layers[self.layer_idx].is_initialized:
                key = torch.cat([cache.layers[self.layer_idx].keys, key], dim=2)
                value = torch.cat([cache.layers[self.layer_idx].values, value], dim=2)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        output, _ = attention(self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling)
        output = output.reshape(batch, length, -1)
        return _route(output, gen_mask, self.o_proj, self.o_proj_moe_gen, freeze_und)


class BagelMoTDecoderLayer(GradientCheckpointingLayer):
    """One Mixture-of-Transformers layer: pre-norm attention and MLP, each with an expert per token kind."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.self_attn = BagelMoTAttention(config, layer_idx)
        self.mlp = Qwen2MLP(config)
        self.mlp_moe_gen = Qwen2MLP(config)
        width, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = Qwen2RMSNorm(width, eps=eps)
        self.input_layernorm_moe_gen = Qwen2RMSNorm(width, eps=eps)
        self.post_attention_layernorm = Qwen2RMSNorm(width, eps=eps)
        self.post_attention_layernorm_moe_gen = Qwen2RMSNorm(width, eps=eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        gen_mask: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        freeze_und: bool = False,
        cache: DynamicCache | None = None,
        update_cache: bool = False,
    ) -> torch.Tensor:
        normed = _route(hidden_states, gen_mask, self.input_layernorm, self.input_layernorm_moe_gen)
        attended = self.self_attn(
            normed, gen_mask, position_embeddings, attention_mask, freeze_und, cache=cache, update_cache=update_cache
        )
        hidden_states = hidden_states + attended
        return hidden_states + _route(
            hidden_states,
            gen_mask,
            lambda x: self.mlp(self.post_attention_layernorm(x)),
            lambda x: self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(x)),
            freeze_und,
        )


class BagelMoTModel(nn.Module):
    """Token embeddings, the MoT layers, and the final norm of each expert (``norm``, ``norm_moe_gen``)."""

    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(BagelMoTDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm_moe_gen = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=config)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        gen_mask: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        freeze_und: bool = False,
        cache: DynamicCache | None = None,
        update_cache: bool = False,
    ) -> torch.Tensor:
        """``freeze_und``: the understanding tokens' states, keys and values are constants for the gradient (the
        authors' ``freeze_und``, RecA's setting). ``cache`` / ``update_cache``: see `BagelMoTAttention`."""
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        hidden_states = inputs_embeds
        if freeze_und:
            hidden_states = torch.where(gen_mask[..., None], hidden_states, hidden_states.detach())
        for layer in self.layers:
            hidden_states = layer(
                hidden_states, gen_mask, position_embeddings, attention_mask, freeze_und, cache=cache,
                update_cache=update_cache,
            )  # fmt: skip
        return _route(hidden_states, gen_mask, self.norm, self.norm_moe_gen, freeze_und)


class BagelLanguageModel(nn.Module):
    """``model`` (the MoT decoder) and ``lm_head``, as the authors' `Qwen2ForCausalLM` names them."""

    def __init__(self, config):
        super().__init__()
        self.model = BagelMoTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


class BagelVisionEmbeddings(nn.Module):
    """SigLIP's patch embedding (a Conv2d) and learned position table for one image of any size.

    Position ids are the authors' extrapolated ones, ``row * side + col`` with ``side = image_size // patch_size``
    the table's side, not ``row * width + col``: a non-square image reads the top-left corner of the table.
    """

    def __init__(self, config):
        super().__init__()
        self.patch_size = config.patch_size
        self.side = config.image_size // config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, config.patch_size)
        self.position_embedding = nn.Embedding(self.side**2, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_values`` ``(3, H, W)`` in [-1, 1], H and W multiples of the patch -> ``(H/p * W/p, hidden)``."""
        patches = self.patch_embedding(pixel_values[None].to(self.patch_embedding.weight.dtype))[0]
        ids = grid_position_ids(patches.shape[1], patches.shape[2], self.side, patches.device)
        return patches.flatten(1).T + self.position_embedding(ids)


class BagelVisionModel(nn.Module):
    """SigLIP NaViT: `BagelVisionEmbeddings`, transformers' `SiglipEncoder`, ``post_layernorm``. Images of different
    sizes run as a padded batch whose mask hides the padding, so each attends to itself only."""

    def __init__(self, config):
        super().__init__()
        self.embeddings = BagelVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        embeds = [self.embeddings(image) for image in pixel_values]
        lengths = [e.shape[0] for e in embeds]
        padded = nn.utils.rnn.pad_sequence(embeds, batch_first=True)
        mask = None
        if len(set(lengths)) > 1:
            valid = (
                torch.arange(padded.shape[1], device=padded.device)[None]
                < torch.tensor(lengths, device=padded.device)[:, None]
            )
            mask = torch.zeros(valid.shape, dtype=padded.dtype, device=padded.device)
            mask = mask.masked_fill(~valid, torch.finfo(padded.dtype).min)[:, None, None, :]
        hidden = self.post_layernorm(self.encoder(inputs_embeds=padded, attention_mask=mask).last_hidden_state)
        return [row[:n] for row, n in zip(hidden, lengths)]


class BagelConnector(nn.Module):
    """ViT width -> LLM width: fc1, activation, fc2."""

    def __init__(self, in_features: int, out_features: int, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(in_features, out_features)
        self.act = ACT2FN[activation]
        self.fc2 = nn.Linear(out_features, out_features)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class BagelPositionTable(nn.Module):
    """A frozen 2-D sin-cos table of ``side * side`` positions (a buffer: saved, never trained)."""

    def __init__(self, side: int, hidden_size: int):
        super().__init__()
        self.side = side
        self.register_buffer("pos_embed", sincos_table(side, hidden_size))

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[position_ids]


def sincos_table(side: int, hidden_size: int) -> torch.Tensor:
    """DiT's 2-D sin-cos embedding of a ``side x side`` grid at integer positions (diffusers' function)."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    return get_2d_sincos_pos_embed(hidden_size, side, base_size=side).float()


def grid_position_ids(rows: int, cols: int, side: int, device=None) -> torch.Tensor:
    """The authors' extrapolated position ids of a ``rows x cols`` grid in a table of side ``side``."""
    if rows > side or cols > side:
        raise ValueError(
            f"BAGEL: a {rows}x{cols} token grid does not fit the {side}x{side} position table; resize the image "
            f"to at most {side} tokens per side."
        )
    return (torch.arange(rows, device=device)[:, None] * side + torch.arange(cols, device=device)).flatten()


@dataclass
class BagelFlowOutput(ModelOutput):
    """The flow-matching step: ``loss`` as ``reduction`` asks; ``token_losses`` ``(N,)`` the MSE of each VAE token
    (mean over its channels), in pack order; ``tokens_per_sample`` ``(B,)``; ``prediction`` and ``target``
    ``(N, p*p*C)`` the velocity predicted by ``llm2vae`` and ``noise - x0``; ``hidden_states`` ``(N, hidden)`` the
    LLM's last states at the VAE tokens."""

    loss: torch.Tensor | None = None
    token_losses: torch.Tensor | None = None
    tokens_per_sample: torch.Tensor | None = None
    prediction: torch.Tensor | None = None
    target: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None


class BagelModel(BagelFlowSampler, PreTrainedModel):
    """BAGEL: a SigLIP condition and a prompt -> the MoT LLM -> the velocity of FLUX-VAE latent tokens.

    The model-side steps an adapter glues together: `vit_embeddings` (the condition image's tokens for the LLM),
    `encode_latents` / `decode_latents` (the VAE, the authors' padded pack), `pack_sequences` (the per-sample
    layout, masks and RoPE ids; a prompt of None drops the text split) and `forward` / `flow_loss` (the authors'
    training step: timesteps, noise, the token-weighted MSE). Inference (`generate` and its parts) comes from
    `BagelFlowSampler`.
    """

    config: BagelConfig
    config_class = BagelConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = False  # the 4-D masks need sdpa or eager
    _no_split_modules = ["BagelMoTDecoderLayer", "SiglipEncoderLayer"]

    def __init__(self, config: BagelConfig):
        from diffusers import AutoencoderKL
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        super().__init__(config)
        llm, vit = config.llm_config, config.vit_config
        llm._attn_implementation = vit._attn_implementation = self.config._attn_implementation
        hidden = llm.hidden_size
        self.language_model = BagelLanguageModel(llm)
        self.vit_model = BagelVisionModel(vit)
        self.connector = BagelConnector(vit.hidden_size, hidden, config.connector_act)
        self.vit_pos_embed = BagelPositionTable(config.vit_max_num_patch_per_side, hidden)
        self.latent_pos_embed = BagelPositionTable(config.max_latent_size, hidden)
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedder = TimestepEmbedding(256, hidden)
        token_width = config.latent_patch_size**2 * config.latent_channels
        self.vae2llm = nn.Linear(token_width, hidden)
        self.llm2vae = nn.Linear(hidden, token_width)
        self.vae = AutoencoderKL.from_config(config.vae_config)
        for module in self.vae.modules():  # diffusers initialised it; the generic init must not redo it
            module._is_hf_initialized = True
        self.vae.requires_grad_(False)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """transformers' generic init (normal Linear/Conv/Embedding, unit norms, the RoPE frequencies), the sin-cos
        tables, and zeros for ``llm2vae`` (the authors' `Bagel._init_weights`)."""
        if module is getattr(self, "llm2vae", None):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, BagelPositionTable):
            init.copy_(module.pos_embed, sincos_table(module.side, module.pos_embed.shape[1]))
        else:
            super()._init_weights(module)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.model.embed_tokens = value

    def train(self, mode: bool = True) -> BagelModel:
        """The VAE stays in eval mode (it is never trained)."""
        super().train(mode)
        self.vae.eval()
        return self

    # --- the condition: SigLIP NaViT ---

    def vit_embeddings(self, pixel_values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The LLM inputs of condition images: ``pixel_values`` ``(3, H, W)`` in [-1, 1] (H, W multiples of the ViT
        patch, any aspect) -> ViT, connector, plus the sin-cos table at ``row * 70 + col``: ``(tokens, hidden)`` each."""
        side = self.config.vit_max_num_patch_per_side
        patch = self.config.vit_config.patch_size
        out = []
        for image, states in zip(pixel_values, self.vit_model(pixel_values)):
            ids = grid_position_ids(image.shape[-2] // patch, image.shape[-1] // patch, side, states.device)
            out.append(self.connector(states) + self.vit_pos_embed(ids).to(states.dtype))
        return out

    # --- the target: the FLUX VAE ---

    @torch.no_grad()
    def encode_latents(
        self,
        pixel_values: Sequence[torch.Tensor],
        *,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Scaled VAE latents of images ``(3, H, W)`` in [-1, 1] (H, W multiples of ``latent_downsample``), as the
        authors encode a pack: the images zero-padded to the largest height and width, encoded as one batch, the
        posterior sampled over the padded shape (``noise``, or drawn from ``generator``), each latent cropped to its
        image and mapped to ``scaling_factor * (z - shift_factor)``. The padding changes every latent, not only the
        border (the encoder attends over the whole padded image). Returns ``(C, H/8, W/8)`` each."""
        factor = self.config.latent_downsample // self.config.latent_patch_size
        height = max(image.shape[-2] for image in pixel_values)
        width = max(image.shape[-1] for image in pixel_values)
        dtype = self.vae.dtype
        padded = pixel_values[0].new_zeros((len(pixel_values), 3, height, width), dtype=dtype)
        for row, image in zip(padded, pixel_values):
            row[:, : image.shape[-2], : image.shape[-1]] = image
        posterior = self.vae.encode(padded).latent_dist
        if noise is None:
            draw_device = generator.device if generator is not None else "cpu"
            noise = torch.randn(posterior.mean.shape, generator=generator, device=draw_device, dtype=torch.float32)
        latents = posterior.mean + posterior.std * noise.to(posterior.mean)
        latents = self.vae.config.scaling_factor * (latents - self.vae.config.shift_factor)
        return [
            z[:, : image.shape[-2] // factor, : image.shape[-1] // factor] for z, image in zip(latents, pixel_values)
        ]

    @torch.no_grad()
    def decode_latents(self, latents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Pixels in [-1, 1] of scaled latents ``(C, h, w)``, one at a time (sizes may differ)."""
        config = self.vae.config
        return [self.vae.decode((z[None] / config.scaling_factor + config.shift_factor).to(self.vae.dtype)).sample[0]
                for z in latents]  # fmt: skip

    def patchify(self, latent: torch.Tensor) -> torch.Tensor:
        """``(C, h*p, w*p)`` -> ``(h*w, p*p*C)`` tokens, the authors' ``c (h p) (w q) -> (h w) (p q c)``."""
        p, channels = self.config.latent_patch_size, latent.shape[0]
        h, w = latent.shape[1] // p, latent.shape[2] // p
        latent = latent[:, : h * p, : w * p].reshape(channels, h, p, w, p)
        return torch.einsum("chpwq->hwpqc", latent).reshape(h * w, p * p * channels)

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The inverse of `patchify` for a ``grid = (h, w)`` of tokens."""
        p, (h, w) = self.config.latent_patch_size, grid
        channels = tokens.shape[-1] // (p * p)
        latent = tokens.reshape(h, w, p, p, channels)
        return torch.einsum("hwpqc->chpwq", latent).reshape(channels, h * p, w * p)

    # --- the sequence ---

    def pack_sequences(
        self,
        prompt_ids: Sequence[Sequence[int] | None],
        vit_grids: Sequence[tuple[int, int] | None],
        latent_grids: Sequence[tuple[int, int]],
    ) -> dict[str, torch.Tensor]:
        """The authors' per-sample layout of a reconstruction sample, as a padded batch (one row per sample):

        ``<|vision_start|> ViT tokens <|vision_end|>`` | ``<|im_start|> prompt <|im_end|>`` |
        ``<|vision_start|> VAE tokens <|vision_end|>``.

        ``prompt_ids[i]`` None drops the text split (the authors' text-condition dropout: no tokens, no RoPE step);
        ``vit_grids[i]`` None leaves the ViT split out. Returns ``input_ids`` (special tokens; ViT and VAE slots hold
        0), ``vit_mask`` and ``gen_mask`` (the ViT and VAE token slots), ``position_ids`` (RoPE: one id for the ViT
        split, counting through the text, one id for the VAE split, restarting at 0 per sample), ``attention_mask``
        ``(B, 1, L, L)`` additive (0 / dtype min; pad rows see themselves) and ``lengths``.
        """
        config = self.config
        rows = []
        for prompt, vit_grid, latent_grid in zip(prompt_ids, vit_grids, latent_grids, strict=True):
            ids, kinds, positions, splits = [], [], [], []  # kinds: 0 text, 1 vit, 2 vae
            rope = 0
            if vit_grid is not None:
                n = vit_grid[0] * vit_grid[1]
                ids += [config.vision_start_token_id, *([0] * n), config.vision_end_token_id]
                kinds += [0, *([1] * n), 0]
                positions += [rope] * (n + 2)
                splits.append(("full", n + 2))
                rope += 1
            if prompt is not None:
                text = [config.im_start_token_id, *prompt, config.im_end_token_id]
                ids += text
                kinds += [0] * len(text)
                positions += list(range(rope, rope + len(text)))
                splits.append(("causal", len(text)))
                rope += len(text)
            n = latent_grid[0] * latent_grid[1]
            ids += [config.vision_start_token_id, *([0] * n), config.vision_end_token_id]
            kinds += [0, *([2] * n), 0]
            positions += [rope] * (n + 2)
            splits.append(("noise", n + 2))
            rows.append((ids, kinds, positions, splits))
        length = max(len(row[0]) for row in rows)
        batch = len(rows)
        device = self.device
        input_ids = torch.zeros((batch, length), dtype=torch.long)
        kinds = torch.zeros((batch, length), dtype=torch.long)
        position_ids = torch.zeros((batch, length), dtype=torch.long)
        allowed = torch.zeros((batch, length, length), dtype=torch.bool)
        for i, (ids, kind, positions, splits) in enumerate(rows):
            n = len(ids)
            input_ids[i, :n] = torch.tensor(ids)
            kinds[i, :n] = torch.tensor(kind)
            position_ids[i, :n] = torch.tensor(positions)
            allowed[i, :n, :n] = _split_mask(splits)
            allowed[i, range(n, length), range(n, length)] = True  # pad rows: themselves only
        mask = torch.zeros(allowed.shape, dtype=self.dtype).masked_fill(~allowed, torch.finfo(self.dtype).min)
        return {
            "input_ids": input_ids.to(device),
            "vit_mask": (kinds == 1).to(device),
            "gen_mask": (kinds == 2).to(device),
            "position_ids": position_ids.to(device),
            "attention_mask": mask[:, None].to(device),
            "lengths": torch.tensor([len(row[0]) for row in rows], device=device),
        }

    def language_states(
        self,
        input_ids: torch.Tensor,
        gen_mask: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        vit_mask: torch.Tensor | None = None,
        vit_embeds: Sequence[torch.Tensor] | None = None,
        latent_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The MoT LLM's last hidden states ``(B, L, hidden)``: token embeddings, with the ViT slots (``vit_mask``)
        filled from ``vit_embeds`` and the VAE slots (``gen_mask``) from ``latent_embeds`` ``(N, hidden)``, both
        in row-major slot order."""
        embeds = self.language_model.model.embed_tokens(input_ids)
        if vit_embeds is not None:
            embeds = embeds.masked_scatter(vit_mask[..., None], torch.cat(list(vit_embeds)).to(embeds.dtype))
        if latent_embeds is not None:
            embeds = embeds.masked_scatter(gen_mask[..., None], latent_embeds.to(embeds.dtype))
        return self.language_model.model(embeds, gen_mask, position_ids, attention_mask, self.config.freeze_und)

    def timesteps_from_logits(self, timestep_logits: torch.Tensor) -> torch.Tensor:
        """The authors' training timesteps: ``t = sigmoid(logit)``, then the shift ``s t / (1 + (s - 1) t)``."""
        t = torch.sigmoid(timestep_logits.float())
        shift = self.config.timestep_shift
        return shift * t / (1 + (shift - 1) * t)

    def latent_embeds(self, tokens: torch.Tensor, t: torch.Tensor, grids: Sequence[tuple[int, int]]) -> torch.Tensor:
        """The LLM inputs of latent tokens ``(N, p*p*C)`` at timesteps ``t`` ``(N,)``: ``vae2llm(x_t) +
        time_embedder(t) + sin-cos``, the table read at ``row * max_latent_size + col`` of each of ``grids`` in turn."""
        dtype = self.vae2llm.weight.dtype
        side = self.config.max_latent_size
        ids = torch.cat([grid_position_ids(h, w, side, tokens.device) for h, w in grids])
        return (
            self.vae2llm(tokens.to(dtype))
            + self.time_embedder(self.time_proj(t.to(tokens.device)).to(dtype))
            + self.latent_pos_embed(ids).to(dtype)
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        gen_mask: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        latents: Sequence[torch.Tensor],
        *,
        vit_mask: torch.Tensor | None = None,
        vit_embeds: Sequence[torch.Tensor] | None = None,
        timestep_logits: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        reduction: str = "mean",
        lengths: torch.Tensor | None = None,
    ) -> BagelFlowOutput:
        """The authors' flow-matching step on a `pack_sequences` batch.

        ``latents``: the clean scaled latents ``(C, h*p, w*p)`` of each sample (`encode_latents`), in the order of the
        rows. ``timestep_logits`` ``(B,)``: one normal draw per sample, ``t`` from `timesteps_from_logits`; then the
        flow ``noise`` ``(N, p*p*C)`` over all VAE tokens in pack order; both drawn from ``generator`` (in that order)
        unless given. ``x_t = (1 - t) x0 + t noise``, VAE token ``vae2llm(x_t) + time_embedder(t) + sin-cos``, target
        ``noise - x0``, per-token MSE (mean over channels, float32). ``reduction``: ``"mean"`` the authors'
        token-weighted mean (sum over tokens / token count), ``"sum"`` the sum over tokens (to divide by a global
        count), ``"none"`` each sample's mean over its tokens ``(B,)``. ``lengths`` (from `pack_sequences`) is not
        needed: the masks hold the padding.
        """
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"BagelModel.forward: reduction={reduction!r}; use 'mean', 'sum' or 'none'.")
        clean = [self.patchify(latent) for latent in latents]
        counts = torch.tensor([tokens.shape[0] for tokens in clean], device=input_ids.device)
        clean = torch.cat(clean).float()
        if int(gen_mask.sum()) != clean.shape[0]:
            raise ValueError(
                f"BagelModel.forward: the batch has {int(gen_mask.sum())} VAE token slots but the latents make "
                f"{clean.shape[0]} tokens; build the batch with pack_sequences from these latents' grids."
            )
        draw_device = generator.device if generator is not None else "cpu"
        if timestep_logits is None:
            timestep_logits = torch.randn(len(latents), generator=generator, device=draw_device)
        if noise is None:
            noise = torch.randn(clean.shape, generator=generator, device=draw_device, dtype=torch.float32)
        t = self.timesteps_from_logits(timestep_logits.to(clean.device)).repeat_interleave(counts)
        noise = noise.to(clean)
        noisy = (1 - t[:, None]) * clean + t[:, None] * noise
        p = self.config.latent_patch_size
        latent_embeds = self.latent_embeds(noisy, t, [(z.shape[1] // p, z.shape[2] // p) for z in latents])
        states = self.language_states(
            input_ids, gen_mask, position_ids, attention_mask,
            vit_mask=vit_mask, vit_embeds=vit_embeds, latent_embeds=latent_embeds,
        )[gen_mask]  # fmt: skip
        prediction = self.llm2vae(states)
        target = noise - clean
        token_losses = ((prediction.float() - target) ** 2).mean(-1)
        if reduction == "mean":
            loss = token_losses.sum() / token_losses.shape[0]
        elif reduction == "sum":
            loss = token_losses.sum()
        else:
            loss = torch.stack([chunk.mean() for chunk in token_losses.split(counts.tolist())])
        return BagelFlowOutput(
            loss=loss,
            token_losses=token_losses,
            tokens_per_sample=counts,
            prediction=prediction,
            target=target,
            hidden_states=states,
        )

    def flow_loss(
        self,
        prompt_ids: Sequence[Sequence[int] | None],
        condition_pixel_values: Sequence[torch.Tensor | None],
        latents: Sequence[torch.Tensor],
        **kwargs,
    ) -> BagelFlowOutput:
        """The RecA step from its parts: prompts (None: the text split dropped), condition images for the ViT
        (None: no ViT split) and the targets' clean latents (`encode_latents`); ``kwargs`` go to `forward`."""
        patch, p = self.config.vit_config.patch_size, self.config.latent_patch_size
        vit_grids = [None if image is None else (image.shape[-2] // patch, image.shape[-1] // patch)
                     for image in condition_pixel_values]  # fmt: skip
        latent_grids = [(latent.shape[1] // p, latent.shape[2] // p) for latent in latents]
        batch = self.pack_sequences(prompt_ids, vit_grids, latent_grids)
        images = [image for image in condition_pixel_values if image is not None]
        vit_embeds = self.vit_embeddings(images) if images else None
        return self(
            batch["input_ids"], batch["gen_mask"], batch["position_ids"], batch["attention_mask"], latents,
            vit_mask=batch["vit_mask"], vit_embeds=vit_embeds, **kwargs,
        )  # fmt: skip


def _split_mask(splits: list[tuple[str, int]]) -> torch.Tensor:
    """The authors' `prepare_attention_mask_per_sample` as booleans: each split sees the earlier ones; full and
    noise splits see all of themselves, causal ones their past; a noise split is seen by no other split."""
    length = sum(n for _, n in splits)
    allowed = torch.zeros((length, length), dtype=torch.bool)
    start = 0
    for mode, n in splits:
        block = torch.ones((n, n), dtype=torch.bool)
        allowed[start : start + n, start : start + n] = block.tril() if mode == "causal" else block
        allowed[start : start + n, :start] = True
        start += n
    start = 0
    for mode, n in splits:
        if mode == "noise":
            allowed[:, start : start + n] = False
            allowed[start : start + n, start : start + n] = True
        start += n
    return allowed


AutoModel.register(BagelConfig, BagelModel, exist_ok=True)  # `AutoModel.from_pretrained` of a BAGEL folder
