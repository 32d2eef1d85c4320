"""BAGEL's inference: a KV-cached context per sample and the authors' flow sampler with classifier-free guidance.

`BagelFlowSampler` is a base class of `BagelModel`. It follows the authors' `Bagel.forward_cache_update_*`,
`generate_image` and `_forward_flow` and their `InterleaveInferencer`: a context is cached segment by segment (text
causal, images full, each image one RoPE id), and the image is sampled as a block ``<|vision_start|> x_t
<|vision_end|>`` that sees the whole context and is not cached.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass
class BagelContext:
    """What the LLM has seen so far for one sample: its KV ``cache``, the ``length`` cached and the next ``rope`` id."""

    cache: DynamicCache
    length: int = 0
    rope: int = 0


class BagelFlowSampler:
    """The inference methods of `BagelModel` (they use its modules, `vit_embeddings`, `encode_latents`,
    `latent_embeds`, `patchify` and `decode_latents`). Not transformers' `GenerationMixin` (no token generation), and
    named so that `PreTrainedModel.can_generate` does not take it for one (it would write a generation config)."""

    def new_context(self) -> BagelContext:
        """An empty context (one sample): nothing cached, RoPE id 0."""
        return BagelContext(DynamicCache(config=self.config.llm_config))

    def _run_segment(
        self, context: BagelContext, input_ids: list[int], position_ids: torch.Tensor, causal: bool, *,
        vit_embeds: torch.Tensor | None = None, latent_embeds: torch.Tensor | None = None, update: bool,
    ) -> torch.Tensor:  # fmt: skip
        """The LLM over one segment after ``context`` (it sees the whole context); its last hidden states."""
        device = self.device
        ids = torch.tensor([input_ids], device=device)
        slots = ids == -1  # ViT or VAE slots are written as -1
        embeds = self.language_model.model.embed_tokens(ids.clamp(min=0))
        if vit_embeds is not None:
            embeds = embeds.masked_scatter(slots[..., None], vit_embeds.to(embeds.dtype))
        if latent_embeds is not None:
            embeds = embeds.masked_scatter(slots[..., None], latent_embeds.to(embeds.dtype))
        gen_mask = slots if latent_embeds is not None else torch.zeros_like(slots)
        mask = None
        if causal:  # the segment's own tokens causally, the whole context before it
            n = len(input_ids)
            allowed = torch.ones((n, context.length + n), dtype=torch.bool, device=device)
            allowed[:, context.length :] = torch.ones((n, n), dtype=torch.bool, device=device).tril()
            mask = torch.zeros(allowed.shape, dtype=embeds.dtype, device=device)
            mask = mask.masked_fill(~allowed, torch.finfo(embeds.dtype).min)[None, None]
        return self.language_model.model(
            embeds, gen_mask, position_ids[None].to(device), mask, cache=context.cache, update_cache=update
        )

    @torch.no_grad()
    def extend_context(
        self,
        context: BagelContext,
        *,
        text_ids: Sequence[int] | None = None,
        vit_image: torch.Tensor | None = None,
        vae_image: torch.Tensor | None = None,
        posterior_noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> BagelContext:
        """A copy of ``context`` with one more segment cached (the authors' `forward_cache_update_*`), exactly one of:

        - ``text_ids``: ``<|im_start|> text <|im_end|>``, causal, RoPE ids counting up;
        - ``vit_image`` ``(3, H, W)`` in [-1, 1]: ``<|vision_start|> ViT tokens <|vision_end|>``, one RoPE id;
        - ``vae_image``: its clean latent tokens (timestep 0, the generation expert), one RoPE id; the posterior
          sample takes ``posterior_noise`` or draws from ``generator``.
        """
        if sum(x is not None for x in (text_ids, vit_image, vae_image)) != 1:
            raise ValueError("BagelModel.extend_context: give exactly one of text_ids, vit_image and vae_image.")
        context = copy.deepcopy(context)
        config = self.config
        if text_ids is not None:
            ids = [config.im_start_token_id, *text_ids, config.im_end_token_id]
            positions = torch.arange(context.rope, context.rope + len(ids))
            self._run_segment(context, ids, positions, True, update=True)
            context.rope += len(ids)
        else:
            if vit_image is not None:
                tokens = self.vit_embeddings([vit_image])[0]
                extra = {"vit_embeds": tokens}
            else:
                latent = self.encode_latents([vae_image], noise=posterior_noise, generator=generator)[0]
                tokens = self.patchify(latent)
                grid = (latent.shape[1] // config.latent_patch_size, latent.shape[2] // config.latent_patch_size)
                extra = {"latent_embeds": self.latent_embeds(tokens, torch.zeros(len(tokens)), [grid])}
            ids = [config.vision_start_token_id, *([-1] * tokens.shape[0]), config.vision_end_token_id]
            self._run_segment(context, ids, torch.full((len(ids),), context.rope), False, update=True, **extra)
            context.rope += 1
        context.length += len(ids)
        return context

    @torch.no_grad()
    def velocity(self, context: BagelContext, x_t: torch.Tensor, t: float, grid: tuple[int, int]) -> torch.Tensor:
        """The predicted velocity of latent tokens ``x_t`` ``(h*w, p*p*C)`` at time ``t`` after ``context``: the block
        ``<|vision_start|> x_t <|vision_end|>`` at the context's next RoPE id, seeing the context, not cached."""
        config = self.config
        ids = [config.vision_start_token_id, *([-1] * x_t.shape[0]), config.vision_end_token_id]
        embeds = self.latent_embeds(x_t, torch.full((x_t.shape[0],), float(t)), [grid])
        positions = torch.full((len(ids),), context.rope)
        states = self._run_segment(context, ids, positions, False, latent_embeds=embeds, update=False)
        return self.llm2vae(states[0, 1:-1]).float()

    @torch.no_grad()
    def generate_latents(
        self,
        context: BagelContext,
        grid: tuple[int, int],
        *,
        cfg_text_context: BagelContext | None = None,
        cfg_img_context: BagelContext | None = None,
        cfg_text_scale: float = 4.0,
        cfg_img_scale: float = 1.5,
        cfg_interval: tuple[float, float] = (0.4, 1.0),
        cfg_renorm_min: float = 0.0,
        cfg_renorm_type: str = "global",
        num_timesteps: int = 50,
        timestep_shift: float = 3.0,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The authors' Euler sampler (`generate_image`): ``t`` from 1 to 0 in ``num_timesteps`` points, shifted by
        ``s t / (1 + (s - 1) t)``, ``x <- x - v dt``, from ``noise`` ``(h*w, p*p*C)`` (or a draw from ``generator``).

        Guidance inside ``cfg_interval`` (``lo < t <= hi``): ``cfg_text_context`` is the context without the prompt,
        ``cfg_img_context`` the one without the images. ``cfg_renorm_type`` ``"global"`` / ``"channel"`` rescale the
        combined velocity to at most the conditional one's norm (over all tokens, or per token), ``"text_channel"``
        rescales the text-guided velocity per token before the image guidance; ``cfg_renorm_min`` bounds the factor
        from below. Returns the latent ``(C, h*p, w*p)`` (scaled, for `decode_latents`).
        """
        if cfg_renorm_type not in ("global", "channel", "text_channel"):
            raise ValueError(f"BagelModel.generate_latents: cfg_renorm_type={cfg_renorm_type!r}; use 'global', "
                             "'channel' or 'text_channel'.")  # fmt: skip
        for scale, ctx, name in (
            (cfg_text_scale, cfg_text_context, "cfg_text"),
            (cfg_img_scale, cfg_img_context, "cfg_img"),
        ):
            if scale > 1.0 and ctx is None:
                raise ValueError(f"BagelModel.generate_latents: {name}_scale={scale} needs {name}_context; pass it or "
                                 f"set {name}_scale=1.")  # fmt: skip
        width = self.config.latent_patch_size**2 * self.config.latent_channels
        if noise is None:
            draw_device = generator.device if generator is not None else "cpu"
            noise = torch.randn((grid[0] * grid[1], width), generator=generator, device=draw_device)
        x = noise.to(self.device, torch.float32)
        timesteps = torch.linspace(1, 0, num_timesteps)
        timesteps = timestep_shift * timesteps / (1 + (timestep_shift - 1) * timesteps)
        steps = timesteps[:-1] - timesteps[1:]
        for t, dt in zip(timesteps[:-1].tolist(), steps.tolist()):
            inside = cfg_interval[0] < t <= cfg_interval[1]
            text_scale, img_scale = (cfg_text_scale, cfg_img_scale) if inside else (1.0, 1.0)
            v = self.velocity(context, x, t, grid)
            if text_scale > 1.0:
                v_text = self.velocity(cfg_text_context, x, t, grid)
                v_img = self.velocity(cfg_img_context, x, t, grid) if img_scale > 1.0 else None
                v = _guide(v, v_text, v_img, text_scale, img_scale, cfg_renorm_type, cfg_renorm_min)
            x = x - v * dt
        return self.unpatchify(x, grid)

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Sequence[int],
        *,
        height: int,
        width: int,
        vit_image: torch.Tensor | None = None,
        vae_image: torch.Tensor | None = None,
        posterior_noise: torch.Tensor | None = None,
        **sampling,
    ) -> torch.Tensor:
        """An image ``(3, height, width)`` in [-1, 1] from a prompt and optional condition images, as the authors'
        `InterleaveInferencer` ([image, text]): the context is the image (``vae_image`` as clean latents, then
        ``vit_image`` through the ViT), then the prompt; the text-free guidance context is the images alone, the
        image-free one the prompt alone. ``sampling`` goes to `generate_latents` (the authors' defaults: text scale
        4, image scale 1.5, interval (0.4, 1], shift 3, 50 points)."""
        down = self.config.latent_downsample
        if height % down or width % down:
            raise ValueError(
                f"BagelModel.generate: height and width must be multiples of {down}; got {height}x{width}."
            )
        context = self.new_context()
        if vae_image is not None:
            context = self.extend_context(context, vae_image=vae_image, posterior_noise=posterior_noise)
        if vit_image is not None:
            context = self.extend_context(context, vit_image=vit_image)
        cfg_text_context = context
        context = self.extend_context(context, text_ids=prompt_ids)
        cfg_img_context = self.extend_context(self.new_context(), text_ids=prompt_ids)
        latent = self.generate_latents(
            context, (height // down, width // down), cfg_text_context=cfg_text_context,
            cfg_img_context=cfg_img_context, **sampling,
        )  # fmt: skip
        return self.decode_latents([latent])[0]


def _guide(v, v_text, v_img, text_scale, img_scale, renorm_type, renorm_min):
    """The authors' classifier-free guidance of ``_forward_flow`` (text, then image; with renormalisation)."""
    if renorm_type == "text_channel":
        guided = v_text + text_scale * (v - v_text)
        scale = (v.norm(dim=-1, keepdim=True) / (guided.norm(dim=-1, keepdim=True) + 1e-8)).clamp(renorm_min, 1.0)
        guided = guided * scale
        return v_img + img_scale * (guided - v_img) if v_img is not None else guided
    guided = v_text + text_scale * (v - v_text)
    if v_img is not None:
        guided = v_img + img_scale * (guided - v_img)
    if renorm_type == "global":
        scale = (v.norm() / (guided.norm() + 1e-8)).clamp(renorm_min, 1.0)
    else:
        scale = (v.norm(dim=-1, keepdim=True) / (guided.norm(dim=-1, keepdim=True) + 1e-8)).clamp(renorm_min, 1.0)
    return guided * scale
