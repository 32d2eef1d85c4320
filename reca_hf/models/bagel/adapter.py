"""BAGEL (`reca_hf.models.bagel`): a Qwen2 Mixture-of-Transformers reads a SigLIP NaViT condition and regenerates
the image by flow matching on FLUX-VAE latents.

Sequence of one RecA example, the authors' (``BAGEL/data/t2i_dataset.py``'s reconstruction plan, packed by
``PackedDataset.pack_sequence``; here one row of `BagelModel.pack_sequences`' padded batch)::

    <|vision_start|> ViT tokens of the condition <|vision_end|> | <|im_start|> instruction <|im_end|> |
    <|vision_start|> noisy VAE tokens of the target <|vision_end|>

Views: both keep the image's aspect ratio (``keep``), each resized once from the source image (bicubic), as the
authors' two transforms: the condition for the ViT at long side 224, multiples of 14; the target for the VAE at long
side at most 1024 and short side at least 512, multiples of 16 (:func:`reca_hf.images.keep_size`). A dropped
prompt (probability 0.1) removes the text split, the condition image stays (``null_prompt = None``).

Loss: the model's own (`BagelModel.forward`): ``t = sigmoid(randn)`` per image with the config's shift, ``x_t = (1 -
t) x0 + t noise``, the MSE against ``noise - x0`` per token, averaged over the batch's VAE tokens (a token-weighted
mean; :meth:`BagelAdapter.loss_tokens` lets the trainer divide by the global token count under several processes).
The targets are encoded as one padded pack per batch, as the authors' (see the model's README).
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from ...adapters.base import UMMAdapter
from ...adapters.helpers import unwrap_model
from ...adapters.registry import register_adapter
from ...adapters.targets import GenerationTarget, LossNoise
from ...dotted import matches
from ...images import KeepBounds, ViewSpec, keep_size, load_image, to_pil, to_tensors, view_size

_PIXEL_MEAN = _PIXEL_STD = (0.5, 0.5, 0.5)  # both encoders read pixels in [-1, 1]
_AUTHORS_MAX_PIXELS = 14 * 14 * 9 * 1024  # the pixel cap of the authors' ImageTransform (both transforms)
_LAYER = r"language_model\.model\.layers\.\d+\."


def _build_tiny_bagel(seed: int = 0):
    """:func:`.tiny.build_tiny_bagel`, imported on use so that registering the adapter imports no model code."""
    from .tiny import build_tiny_bagel

    return build_tiny_bagel(seed)


@register_adapter(tiny=_build_tiny_bagel)
class BagelAdapter(UMMAdapter):
    name = "bagel"
    model_types = ("bagel",)
    model_class = "reca_hf.models.bagel.BagelModel"
    condition_space = "siglip-navit"
    generation_space = "flux-vae-latents"
    condition_relation = "separate"
    generation_target = GenerationTarget("flow")
    min_condition_resolution = 224  # the RecA ViT transform: long side 224
    native_generation_resolution = 1024  # the VAE transform's long-side bound
    parameter_sharing = "decoupled"
    # Per layer, the understanding expert (its attention projections, q/k norms, MLP and norms) and its generation
    # twin (the same names + "_moe_gen"); full matching keeps "mlp" from catching "mlp_moe_gen".
    understanding_modules = (
        "vit_model",
        "connector",
        r"language_model\.model\.(embed_tokens|norm)",
        r"language_model\.lm_head",
        _LAYER + r"(self_attn\.([qkvo]_proj|[qk]_norm)|mlp|input_layernorm|post_attention_layernorm)",
    )
    generation_modules = (
        _LAYER + r"(self_attn\.([qkvo]_proj|[qk]_norm)|mlp|input_layernorm|post_attention_layernorm)_moe_gen",
        r"language_model\.model\.norm_moe_gen",
        "vae2llm",
        "llm2vae",
        "time_embedder",
    )
    shared_modules = ()  # attention is shared across tokens, but every weight belongs to one expert
    tokenizer_modules = ("vae",)
    default_freeze = ()  # the authors' --freeze_und --freeze_vit --freeze_vae: the understanding side and the VAE
    null_prompt = None  # the authors' text dropout removes the whole text split; the ViT condition stays
    default_cond_dropout_prob = 0.1  # text_cond_dropout_prob
    target_fit = "keep"  # no crop, no padding: the authors' MaxLongEdgeMinShortEdgeResize
    condition_fit = "keep"
    condition_source = "image"  # both transforms resize the source image
    variable_size = True
    lora_generation_targets = (
        _LAYER + r"self_attn\.[qkvo]_proj_moe_gen",
        _LAYER + r"mlp_moe_gen\.(gate|up|down)_proj",
    )
    default_instruction = "Describe the image in detail."
    # The authors' inferencer: text CFG 4 against the context without the prompt, image CFG 1.5 against the prompt
    # alone (reconstruct(); text-to-image has no image to guide by), interval (0.4, 1], shift 3, 50 Euler points.
    default_guidance_scale = 4.0
    cfg_img_scale = 1.5
    cfg_interval = (0.4, 1.0)
    cfg_renorm_type = "global"
    sampling_shift = 3.0
    num_inference_steps = 50

    def __init__(self, config, processor=None, model=None):
        super().__init__(config, processor, model)
        patch = int(config.vit_config.patch_size)
        # The authors' bounds: targets short side >= half the long-side bound, in VAE-token strides; conditions
        # with max = min (long side at the resolution), in ViT patches.
        self.target_keep = KeepBounds(int(config.latent_downsample), 0.5, _AUTHORS_MAX_PIXELS)
        self.condition_keep = KeepBounds(patch, 1.0, _AUTHORS_MAX_PIXELS)

    # ---- what this model's config says ----

    @property
    def vit_patch(self) -> int:
        return int(self.config.vit_config.patch_size)

    @property
    def max_condition_side(self) -> int:
        """The longest condition side the ViT's position tables cover."""
        return self.vit_patch * int(self.config.vit_max_num_patch_per_side)

    @property
    def max_generation_side(self) -> int:
        """The longest target side the latent position table covers."""
        return int(self.config.latent_downsample) * int(self.config.max_latent_size)

    def config_min_condition_resolution(self) -> int:
        return min(type(self).min_condition_resolution, self.max_condition_side)

    def config_native_generation_resolution(self) -> int:
        return min(type(self).native_generation_resolution, self.max_generation_side)

    def condition_resolution_errors(self, resolution: int) -> list[str]:
        return _side_errors(resolution, self.vit_patch, self.max_condition_side, "the ViT patch", "ViT position table")

    def generation_resolution_errors(self, resolution: int) -> list[str]:
        down = int(self.config.latent_downsample)
        return _side_errors(resolution, down, self.max_generation_side, "a VAE token's side", "latent position table")

    def round_condition_resolution(self, resolution: int) -> int:
        return max(self.vit_patch, min(resolution - resolution % self.vit_patch, self.max_condition_side))

    def after_freeze(self, model, frozen: list[str]) -> None:
        """With the whole understanding side frozen (``freeze: auto``), set the model's ``freeze_und``: the authors
        detach the understanding tokens' states in every layer, which also stops the generation experts' gradient
        through the special tokens of the VAE split (see the model's README)."""
        named = unwrap_model(model).named_parameters()
        understanding = [p for name, p in named if matches(name, self.understanding_modules)]
        unwrap_model(model).config.freeze_und = not any(p.requires_grad for p in understanding)

    # ---- CPU face ----

    def prompt_ids(self, instruction: str | None) -> list[int] | None:
        """The instruction's token ids (the model adds ``<|im_start|>`` / ``<|im_end|>``); None drops the split."""
        if instruction is None:
            return None
        return list(self.text_tokenizer()(instruction, add_special_tokens=False)["input_ids"])

    def prepare(self, condition_images, target_images, instructions, *, dropped=None) -> dict[str, Any]:
        """``prompt_ids`` (a list per row, None where the prompt was dropped) and the views as lists of ``(3, H,
        W)`` tensors in [-1, 1], each its own size."""
        batch = {
            "prompt_ids": [self.prompt_ids(text) for text in instructions],
            "condition_pixel_values": to_tensors(condition_images, _PIXEL_MEAN, _PIXEL_STD),
        }
        if target_images is not None:
            batch["target_pixel_values"] = to_tensors(target_images, _PIXEL_MEAN, _PIXEL_STD)
        return batch

    def loss_tokens(self, batch: dict[str, Any]) -> int:
        """The batch's VAE tokens: what the token-weighted loss averages over."""
        down = int(self.config.latent_downsample)
        return sum((image.shape[-2] // down) * (image.shape[-1] // down) for image in batch["target_pixel_values"])

    # ---- model face ----

    def timestep_logits(self, levels: torch.Tensor) -> torch.Tensor:
        """The ``randn`` draws that give timesteps ``levels`` after the model's sigmoid and shift (its inverse)."""
        shift = float(self.config.timestep_shift)
        u = levels.double() / (shift - (shift - 1) * levels.double())
        return torch.logit(u).float()

    def loss(
        self, model, batch: dict[str, Any], *, reduction: str = "mean", noise: LossNoise | None = None
    ) -> torch.Tensor:
        """The authors' flow loss: ``"mean"`` the token-weighted mean; ``"none"`` one value per sample, its mean over
        its own tokens times its share of the batch's tokens times the batch size, so that their mean is the
        ``"mean"`` loss (each sample weighs as its tokens do). ``noise`` fixes the VAE posterior draw, the timesteps
        (``noise.timesteps`` as the final ``t``) and the flow noise, drawn in that order from its generator."""
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction={reduction!r}: choose 'mean' or 'none'")
        bagel = unwrap_model(model)
        device, dtype = bagel.device, bagel.dtype
        generator = noise.generator(device) if noise is not None else None
        targets = [image.to(device) for image in batch["target_pixel_values"]]
        latents = bagel.encode_latents(targets, generator=generator)
        conditions = [image.to(device, dtype) for image in batch["condition_pixel_values"]]
        levels = noise.levels(len(targets), device) if noise is not None else None
        timestep_logits = self.timestep_logits(levels) if levels is not None else None
        out = bagel.flow_loss(
            batch["prompt_ids"], conditions, latents, timestep_logits=timestep_logits, generator=generator,
            reduction=reduction,
        )  # fmt: skip
        if reduction == "mean":
            return out.loss
        counts = out.tokens_per_sample.to(out.loss)
        return out.loss * counts * (len(counts) / counts.sum())

    def _guided_latent(self, bagel, context, cfg_text_context, cfg_img_context, grid, guidance, generator, steps):
        guided = guidance > 1
        return bagel.generate_latents(
            context, grid,
            cfg_text_context=cfg_text_context if guided else None,
            cfg_img_context=cfg_img_context if guided else None,
            cfg_text_scale=guidance if guided else 1.0,
            cfg_img_scale=self.cfg_img_scale if guided and cfg_img_context is not None else 1.0,
            cfg_interval=self.cfg_interval, cfg_renorm_type=self.cfg_renorm_type,
            num_timesteps=steps, timestep_shift=self.sampling_shift, generator=generator,
        )  # fmt: skip

    def target_size(self, condition, views: ViewSpec) -> tuple[int, int]:
        """``(width, height)`` of the image reconstructed from a condition view: under a ``keep`` target fit, the
        target view of a source with the condition's aspect (up to its rounding to ViT patches) and at least the
        generation resolution's size (the source itself is not known here); else the square."""
        side = views.generation_resolution
        if views.target_fit != "keep":
            return side, side
        width, height = view_size(condition)
        return keep_size(width * side, height * side, side, views.target_keep)

    def sample_codes(self, bagel, conditions, instructions, views, guidance, do_sample, temperature, generator):
        """Latents from the authors' sampler, one image at a time, as their ``InterleaveInferencer`` with [condition
        image, instruction]: the context is the ViT condition then the prompt; with ``guidance > 1`` text CFG at
        ``guidance`` against the image alone and image CFG at :attr:`cfg_img_scale` against the prompt alone.
        ``do_sample`` and ``temperature`` belong to token samplers."""
        latents = []
        down = int(self.config.latent_downsample)
        images = to_tensors(conditions, _PIXEL_MEAN, _PIXEL_STD)
        for condition, image, instruction in zip(conditions, images, instructions):
            ids = self.prompt_ids(instruction)
            context = bagel.extend_context(bagel.new_context(), vit_image=image.to(bagel.device, bagel.dtype))
            without_text, context = context, bagel.extend_context(context, text_ids=ids)
            without_image = bagel.extend_context(bagel.new_context(), text_ids=ids) if guidance > 1 else None
            width, height = self.target_size(condition, views)
            latents.append(self._guided_latent(bagel, context, without_text, without_image, (height // down,
                           width // down), guidance, generator, self.num_inference_steps))  # fmt: skip
        return latents

    def decode_codes(self, bagel, codes: list[torch.Tensor]) -> list[Image.Image]:
        return [to_pil(pixels[None], _PIXEL_MEAN, _PIXEL_STD)[0] for pixels in bagel.decode_latents(codes)]

    def sample_text_codes(
        self, bagel, prompts, resolution, guidance, generator, *, num_inference_steps: int | None = None
    ) -> list[torch.Tensor]:
        """Text-to-image as the authors' inferencer: the prompt as context, text CFG against the empty context."""
        down = int(self.config.latent_downsample)
        steps = num_inference_steps or self.num_inference_steps
        latents = []
        for prompt in prompts:
            context = bagel.extend_context(bagel.new_context(), text_ids=self.prompt_ids(prompt))
            latents.append(self._guided_latent(bagel, context, bagel.new_context(), None,
                           (resolution // down, resolution // down), guidance, generator, steps))  # fmt: skip
        return latents

    @torch.no_grad()
    def round_trip(self, images, *, model=None, views: ViewSpec | None = None) -> list[Image.Image]:
        """The target views through the VAE alone: each encoded on its own (the posterior sampled from a fixed seed)
        and decoded."""
        bagel = unwrap_model(self._bound_model(model))
        views = views or self.default_views()
        targets = to_tensors([views.target_view(load_image(image)) for image in images], _PIXEL_MEAN, _PIXEL_STD)
        generator = torch.Generator(device=bagel.device).manual_seed(0)
        latents = [bagel.encode_latents([t.to(bagel.device)], generator=generator)[0] for t in targets]
        return self.decode_codes(bagel, latents)


def _side_errors(resolution: int, stride: int, largest: int, unit: str, table: str) -> list[str]:
    errors = []
    if resolution % stride:
        errors.append(f"must be a multiple of {stride} ({unit})")
    if resolution > largest:
        errors.append(f"must be at most {largest} (the {table} covers {largest // stride} of {stride} px)")
    return errors
