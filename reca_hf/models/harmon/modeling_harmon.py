"""Harmon as one `PreTrainedModel`: Qwen2 shared by understanding and generation, MAR, a diffusion head, the KL-16 VAE.

The modules, named as the authors name them (`Harmon/src/models/harmon.py`), so a released ``.pth`` maps by identity:

- ``llm``: `transformers.Qwen2ForCausalLM` (its text head serves image-to-text);
- ``mar``: :class:`~reca_hf.models.harmon.mar.MAR`, the masked encoder-decoder and ``mar.diffloss``;
- ``proj_in`` / ``proj_out``: two-layer SiLU MLPs between the MAR encoder's width and the LLM's;
- ``vae``: `diffusers.AutoencoderKL` (frozen; latents are the posterior mode times ``scaling_factor`` 0.2325).

Latents travel as token grids ``(batch, h, w, token_dim)`` (16-channel latents of a 16x-downsampled image). Masks
are ``(batch, h * w)``, 1 where a token is masked. The steps an adapter composes: `encode_latents` /
`decode_latents`, `visual_features` (the understanding features), `embed_prompt` (features into the prompt's image
slots), `generation_states` (visible latents through the MAR encoder and the LLM after the prompt), `mar`'s
`forward_mae_decoder`, `diffusion_loss`, and the samplers `sample_latents` / `generate`.

Saved layout: ``config.json`` (a `HarmonConfig`, the VAE's config as a dict) and ``model.safetensors`` with keys
``llm.*`` (transformers' Qwen2), ``mar.*`` and ``proj_{in,out}.*`` (the authors' names) and ``vae.*`` (diffusers').
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel, Qwen2ForCausalLM
from transformers import initialization as init

from .configuration_harmon import HarmonConfig
from .mar import MAR

if TYPE_CHECKING:
    from PIL import Image


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def scale_gradient(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    """``tensor`` unchanged, its gradient multiplied by ``scale`` on the way back (the authors' 0.1 on the
    understanding features)."""
    return _ScaleGradient.apply(tensor, scale)


def mask_from_orders(orders: torch.Tensor, num_masked: int) -> torch.Tensor:
    """``(batch, tokens)`` float mask with 1 at the first ``num_masked`` positions of each row's order."""
    mask = torch.zeros(orders.shape, device=orders.device)
    return mask.scatter(1, orders[:, :num_masked], 1.0)


def truncated_normal_mask_ratio(uniform: float, ratio_min: float = 0.7, std: float = 0.25) -> float:
    """MAR's mask ratio from a uniform draw in [0, 1): a normal of mean 1 and ``std`` truncated to
    ``[ratio_min, 1]``, by the inverse CDF (scipy's ``truncnorm`` draws the same way)."""
    low = torch.special.ndtr(torch.tensor((ratio_min - 1.0) / std, dtype=torch.float64))
    high = torch.special.ndtr(torch.tensor(0.0, dtype=torch.float64))
    return float(1.0 + std * torch.special.ndtri(low + uniform * (high - low)))


def build_mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, out_dim))


class HarmonModel(PreTrainedModel):
    """Harmon: one Qwen2 for understanding and generation, a MAR encoder-decoder and a per-token diffusion head."""

    config: HarmonConfig
    config_class = HarmonConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _no_split_modules = ["Qwen2DecoderLayer", "Block"]

    def __init__(self, config: HarmonConfig):
        from diffusers import AutoencoderKL

        super().__init__(config)
        self.llm = Qwen2ForCausalLM(config.llm_config)
        self.mar = MAR(config)
        llm_width = config.llm_config.hidden_size
        self.proj_in = build_mlp(config.encoder_embed_dim, llm_width, llm_width)
        self.proj_out = build_mlp(llm_width, llm_width, config.encoder_embed_dim)
        self.vae = AutoencoderKL.from_config(config.vae_config)
        self.vae.requires_grad_(False)
        for module in self.vae.modules():  # diffusers initialises its own parts
            module._is_hf_initialized = True
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The authors' initialisation: MAR's Linear layers xavier-uniform with zero bias, its tables and tokens
        normal(0.02); the diffusion head xavier-uniform, its timestep MLP normal(0.02), its AdaLN and output
        layers zero; ``proj_in`` / ``proj_out`` PyTorch's default; the LLM as transformers initialises Qwen2."""
        # transformers calls this for every module owning tensors, children before parents; the LLM initialises
        # itself and the VAE is skipped.
        if module is self.mar:
            self._init_mar(module)
        elif any(module is mlp[i] for mlp in (self.proj_in, self.proj_out) for i in (0, 2)):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(module.in_features)
            init.uniform_(module.bias, -bound, bound)

    @staticmethod
    def _init_mar(mar: MAR) -> None:
        for table in (
            mar.class_emb.weight,
            mar.fake_latent,
            mar.mask_token,
            mar.encoder_pos_embed_learned,
            mar.decoder_pos_embed_learned,
            mar.diffusion_pos_embed_learned,
        ):
            init.normal_(table, std=0.02)
        for module in mar.modules():
            if isinstance(module, nn.Linear):
                init.xavier_uniform_(module.weight)
                init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.weight is not None:
                init.ones_(module.weight)
                init.zeros_(module.bias)
        net = mar.diffloss.net
        init.normal_(net.time_embed.mlp[0].weight, std=0.02)
        init.normal_(net.time_embed.mlp[2].weight, std=0.02)
        zeroed = [block.adaLN_modulation[-1] for block in net.res_blocks]
        zeroed += [net.final_layer.adaLN_modulation[-1], net.final_layer.linear]
        for linear in zeroed:
            init.zeros_(linear.weight)
            init.zeros_(linear.bias)

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.llm.get_output_embeddings()

    def train(self, mode: bool = True) -> HarmonModel:
        """As the authors' ``train()``: the autoencoder stays in eval mode (it is never trained)."""
        super().train(mode)
        self.vae.eval()
        return self

    # ----- latents -------------------------------------------------------------------------------------------
    def encode_latents(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Token grid ``(batch, h, w, token_dim)`` of ``pixel_values`` in [-1, 1]: the VAE posterior's mode times
        ``scaling_factor``, patchified by ``patch_size``. No gradient (the VAE is frozen)."""
        with torch.no_grad():
            latents = self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist.mode()
        latents = latents * self.vae.config.scaling_factor
        p = self.config.patch_size
        b, c, h, w = latents.shape
        latents = latents.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return latents.reshape(b, h // p, w // p, c * p * p)

    def decode_latents(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pixels in about [-1, 1] of a token grid ``(batch, h, w, token_dim)``."""
        p = self.config.patch_size
        b, h, w, _ = tokens.shape
        latents = tokens.reshape(b, h, w, -1, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, -1, h * p, w * p)
        with torch.no_grad():
            return self.vae.decode((latents / self.vae.config.scaling_factor).to(self.vae.dtype)).sample

    # ----- understanding ------------------------------------------------------------------------------------
    def visual_features(
        self, latents: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The MAR encoder over ``latents`` (all tokens visible unless ``mask``), buffers filled with the fake
        latent: returns ``(encoder_states, features)``; ``features = proj_in(encoder_states)`` with the buffer
        tokens moved to the end, ``(batch, visible + buffer_size, llm_width)``, the understanding features
        (the authors' ``extract_visual_feature``)."""
        b, h, w, _ = latents.shape
        tokens = latents.reshape(b, h * w, -1)
        if mask is None:
            mask = tokens.new_zeros(b, h * w)
        buffer = self.mar.fake_latent.expand(b, -1)
        states = self.mar.forward_mae_encoder(tokens, mask, buffer, image_shape=(h, w))
        features = self.proj_in(states)
        size = self.config.buffer_size
        return states, torch.cat([features[:, size:], features[:, :size]], dim=1)

    def image_slots(self, height: int, width: int) -> int:
        """How many image-token slots a prompt needs for a ``height x width`` token grid (image + buffer)."""
        return height * width + self.config.buffer_size

    def embed_prompt(self, input_ids: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings of ``input_ids`` with ``features`` (``(batch, slots, llm_width)``) written into the
        ``image_token_id`` positions, in order."""
        slots = input_ids == self.config.image_token_id
        ids = input_ids.masked_fill(slots, 0)
        embeddings = self.get_input_embeddings()(ids)
        if features is None:
            return embeddings
        expected = features.shape[0] * features.shape[1]
        if int(slots.sum()) != expected:
            raise ValueError(
                f"HarmonModel.embed_prompt: input_ids hold {int(slots.sum())} image tokens (id "
                f"{self.config.image_token_id}) but the features fill {features.shape[0]} x {features.shape[1]} "
                "slots; put image_slots(h, w) image tokens in each prompt."
            )
        return embeddings.masked_scatter(slots[..., None], features.to(embeddings.dtype))

    # ----- generation ---------------------------------------------------------------------------------------
    def generation_states(
        self,
        latents: torch.Tensor,
        mask: torch.Tensor,
        attention_mask: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
        cache=None,
    ) -> torch.Tensor:
        """The authors' ``forward_mae_encoder``: the visible latents through the MAR encoder and ``proj_in``
        (buffers last), appended to the prompt (``inputs_embeds``, or the prompt's ``cache``) and run
        through the LLM; its last states there, buffers first again, through ``proj_out`` are added to the
        encoder states. ``attention_mask`` covers the prompt; positions are ``cumsum(mask) - 1``.
        Returns ``(batch, buffer + visible, encoder_width)``."""
        states, features = self.visual_features(latents, mask)
        b, length = features.shape[:2]
        attention_mask = torch.cat([attention_mask.bool(), attention_mask.new_ones(b, length, dtype=torch.bool)], 1)
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        if cache is not None:
            embeds, position_ids = features, position_ids[:, -length:]
        else:
            embeds = torch.cat([inputs_embeds, features.to(inputs_embeds.dtype)], dim=1)
        hidden = self.llm.model(
            inputs_embeds=embeds,
            attention_mask=attention_mask.long(),
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
        ).last_hidden_state[:, -length:]
        size = self.config.buffer_size
        hidden = torch.cat([hidden[:, -size:], hidden[:, :-size]], dim=1)
        return states + self.proj_out(hidden)

    def diffusion_loss(
        self,
        z: torch.Tensor,
        target: torch.Tensor,
        mask: torch.Tensor,
        *,
        timesteps: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """The authors' ``forward_loss``: every token's decoder output ``z`` (``(batch, tokens, width)``) and
        clean latent ``target`` (``(batch, tokens, token_dim)``) repeated ``diffusion_batch_mul`` times, each row
        with its own timestep and noise (drawn from ``generator``: timesteps, then noise; or given as
        ``timesteps`` ``(rows,)`` and ``noise`` ``(rows, token_dim)``, rows ordered copy-major:
        ``copy * batch * tokens + sample * tokens + token``). ``reduction="mean"`` is their token mean over the
        masked tokens of the whole batch; ``"none"`` gives each sample's mean over its masked tokens, ``(batch,)``.
        """
        if reduction not in ("mean", "none"):
            raise ValueError(f"HarmonModel.diffusion_loss: reduction={reduction!r}; use 'mean' or 'none'.")
        b, n, _ = target.shape
        copies = self.config.diffusion_batch_mul
        rows = copies * b * n
        target = target.reshape(b * n, -1).repeat(copies, 1)
        z = z.reshape(b * n, -1).repeat(copies, 1)
        row_mask = mask.reshape(b * n).repeat(copies).to(target.dtype)
        drawn = self.mar.diffloss.draw(rows, target.device, generator) if timesteps is None or noise is None else None
        timesteps = drawn[0] if timesteps is None else timesteps.to(target.device)
        noise = drawn[1] if noise is None else noise.to(target.device)
        if timesteps.shape != (rows,) or tuple(noise.shape) != tuple(target.shape):
            raise ValueError(
                f"HarmonModel.diffusion_loss: timesteps {tuple(timesteps.shape)} and noise {tuple(noise.shape)} "
                f"must be ({rows},) and {tuple(target.shape)} (diffusion_batch_mul x batch x tokens rows)."
            )
        losses = self.mar.diffloss.row_losses(target, z, timesteps, noise.to(target.dtype)) * row_mask
        if reduction == "mean":
            return losses.sum() / row_mask.sum()
        per_sample = losses.view(copies, b, n).sum(dim=(0, 2))
        return per_sample / row_mask.view(copies, b, n).sum(dim=(0, 2))

    def reconstruction_loss(
        self,
        latents: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mask: torch.Tensor,
        *,
        grad_scale: float | None = 0.1,
        condition_latents: torch.Tensor | None = None,
        **loss_kwargs,
    ) -> torch.Tensor:
        """The authors' ``recon_loss`` from its pieces: the understanding features of ``condition_latents``
        (default: ``latents``) with their gradient scaled by ``grad_scale`` fill the prompt's image slots, the
        visible latents (``mask``: 1 = masked) follow the prompt through the LLM, the decoder predicts every
        token and `diffusion_loss` (``loss_kwargs``) scores the masked ones."""
        _, features = self.visual_features(latents if condition_latents is None else condition_latents)
        if grad_scale is not None:
            features = scale_gradient(features, grad_scale)
        embeds = self.embed_prompt(input_ids, features)
        states = self.generation_states(latents, mask, attention_mask, inputs_embeds=embeds)
        b, h, w, _ = latents.shape
        z = self.mar.forward_mae_decoder(states, mask, image_shape=(h, w))
        return self.diffusion_loss(z, latents.reshape(b, h * w, -1).detach(), mask, **loss_kwargs)

    def image_to_text_loss(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        latents: torch.Tensor | None = None,
        *,
        grad_scale: float | None = 0.1,
    ) -> torch.Tensor:
        """The authors' ``image2text_loss``: the understanding features of ``latents`` (gradient scaled by
        ``grad_scale``) in the image slots, the LLM's text head, cross-entropy of the next token where
        ``labels >= 0``, averaged over those tokens."""
        features = None
        if latents is not None:
            _, features = self.visual_features(latents)
            if grad_scale is not None:
                features = scale_gradient(features, grad_scale)
        embeds = self.embed_prompt(input_ids, features)
        hidden = self.llm.model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state[:, :-1]
        labels = labels[:, 1:]
        keep = labels >= 0
        logits = self.llm.get_output_embeddings()(hidden[keep])
        return F.cross_entropy(logits.float(), labels[keep])

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        mask: torch.Tensor,
        **loss_kwargs,
    ) -> torch.Tensor:
        """The reconstruction loss of ``pixel_values`` in [-1, 1] (see `reconstruction_loss`)."""
        return self.reconstruction_loss(
            self.encode_latents(pixel_values), input_ids, attention_mask, mask, **loss_kwargs
        )

    # ----- sampling -----------------------------------------------------------------------------------------
    def sample_orders(self, batch: int, tokens: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """One random permutation of the ``tokens`` positions per row, ``(batch, tokens)``."""
        return torch.stack([torch.randperm(tokens, generator=generator) for _ in range(batch)])

    @torch.no_grad()
    def sample_latents(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        image_shape: tuple[int, int],
        num_iter: int = 64,
        cfg: float = 1.0,
        cfg_schedule: str = "constant",
        temperature: float = 1.0,
        orders: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The authors' MAR sampler (``Harmon.sample``): ``num_iter`` rounds, each revealing the next tokens of a
        random order on a cosine schedule (at least one per round), every round the visible tokens through
        `generation_states` after the cached prompt, the decoder, and the diffusion head on the tokens to reveal.

        With ``cfg != 1`` the batch is ``[conditional; unconditional]`` prompts (``inputs_embeds`` and
        ``attention_mask`` of ``2 * n`` rows): the halves share orders and tokens and the head guides epsilon
        (``cfg_schedule="linear"`` ramps it up as tokens are revealed). ``orders`` (``(n, tokens)``) and ``noise``
        (one tensor per round for `DiffLoss.sample`) replace the draws from ``generator``. Returns the token grid
        ``(n, h, w, token_dim)``.
        """
        if cfg_schedule not in ("constant", "linear"):
            raise ValueError(f"HarmonModel.sample_latents: cfg_schedule={cfg_schedule!r}; use 'constant' or 'linear'.")
        rows = inputs_embeds.shape[0]
        guided = cfg != 1.0
        if guided and rows % 2:
            raise ValueError(
                f"HarmonModel.sample_latents: cfg={cfg} needs [conditional; unconditional] prompts, got {rows} rows."
            )
        n = rows // 2 if guided else rows
        h, w = image_shape
        length = h * w
        device = inputs_embeds.device
        if orders is None:
            orders = self.sample_orders(n, length, generator)
        orders = orders.to(device)
        mask = torch.ones(n, length, device=device)
        tokens = torch.zeros(n, length, self.config.token_embed_dim, device=device)
        prompt_length = inputs_embeds.shape[1]
        attention_mask = attention_mask.bool()
        cache = self.llm.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask.long(),
            position_ids=(attention_mask.cumsum(dim=1) - 1).clamp(min=0),
            use_cache=True,
        ).cache
        both = (lambda x: torch.cat([x, x])) if guided else (lambda x: x)  # the halves share tokens and masks
        for step in range(num_iter):
            states = self.generation_states(both(tokens).view(rows, h, w, -1), both(mask), attention_mask, cache=cache)
            cache.crop(prompt_length - cache.get_seq_length())  # drop this round's tokens
            z = self.mar.forward_mae_decoder(states, both(mask), image_shape=(h, w))
            ratio = np.cos(math.pi / 2.0 * (step + 1) / num_iter)
            masked_next = int(max(1.0, min(float(mask[0].sum()) - 1, float(np.floor(length * ratio)))))
            mask_next = mask_from_orders(orders, masked_next)
            reveal = mask.bool() if step >= num_iter - 1 else mask.bool() ^ mask_next.bool()
            mask = mask_next
            where = reveal.nonzero(as_tuple=True)
            scale = cfg if cfg_schedule == "constant" else 1 + (cfg - 1) * (length - masked_next) / length
            z_uncond = z[n:][where] if guided else None
            sampled = self.mar.diffloss.sample(
                z[:n][where],
                temperature,
                scale,
                z_uncond=z_uncond,
                generator=generator,
                noise=None if noise is None else noise[step],
            )
            tokens = tokens.clone()
            tokens[where] = sampled.to(tokens.dtype)
        return tokens.view(n, h, w, -1)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        negative_input_ids: torch.Tensor | None = None,
        negative_attention_mask: torch.Tensor | None = None,
        *,
        height: int = 512,
        width: int | None = None,
        num_iter: int = 64,
        cfg: float = 3.0,
        cfg_schedule: str = "constant",
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
    ) -> list[Image.Image] | torch.Tensor:
        """Text-to-image with the authors' defaults (64 rounds, CFG 3.0 constant, temperature 1.0, 512 px).

        ``input_ids`` are chat-formatted prompts (the authors': ``"Generate an image: {caption}"`` in Qwen's
        user turn, then the assistant header); ``negative_input_ids`` the null prompt ``"Generate an image."``,
        needed when ``cfg != 1``. Returns PIL images, or pixels in [-1, 1] with ``output_type="pt"``.
        """
        if cfg != 1.0:
            if negative_input_ids is None:
                raise ValueError(
                    f"HarmonModel.generate: cfg={cfg} needs negative_input_ids (the null prompt 'Generate an "
                    "image.'); pass them or set cfg=1."
                )
            input_ids, attention_mask = _stack_prompts(
                input_ids, attention_mask, negative_input_ids, negative_attention_mask, self.llm.config.pad_token_id
            )
        width = width or height
        stride = self.config.vae_stride * self.config.patch_size
        tokens = self.sample_latents(
            self.embed_prompt(input_ids),
            attention_mask,
            image_shape=(height // stride, width // stride),
            num_iter=num_iter,
            cfg=cfg,
            cfg_schedule=cfg_schedule,
            temperature=temperature,
            generator=generator,
        )
        pixels = self.decode_latents(tokens)
        if output_type == "pt":
            return pixels
        array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        from PIL import Image

        return [Image.fromarray(image) for image in array]


def _stack_prompts(ids, mask, negative_ids, negative_mask, pad_id) -> tuple[torch.Tensor, torch.Tensor]:
    """``[prompts; null prompts]`` padded on the right to one length."""
    if negative_mask is None:
        negative_mask = torch.ones_like(negative_ids)
    if negative_ids.shape[0] == 1 and ids.shape[0] > 1:
        negative_ids, negative_mask = negative_ids.expand(ids.shape[0], -1), negative_mask.expand(ids.shape[0], -1)
    length = max(ids.shape[1], negative_ids.shape[1])

    def pad(x: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(x, (0, length - x.shape[1]), value=value)

    pad_id = 0 if pad_id is None else pad_id
    return torch.cat([pad(ids, pad_id), pad(negative_ids, pad_id)]), torch.cat([pad(mask, 0), pad(negative_mask, 0)])


AutoModel.register(HarmonConfig, HarmonModel, exist_ok=True)  # `AutoModel.from_pretrained` of a Harmon folder
