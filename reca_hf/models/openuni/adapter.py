"""OpenUni (`reca_hf.models.openuni`): a frozen InternVL3 reads the image, SANA regenerates it from meta-queries.

Sequence of one RecA example, the authors' chat layout (no system prompt)::

    <|im_start|>user\\n<img> [image_seq_length x <IMG_CONTEXT> <- InternVL features of the condition] </img>
    \\n{instruction}<|im_end|>\\n<|im_start|>assistant\\n<img> [meta-queries]

The frozen LLM's last hidden states at the queries -> connector -> projector -> SANA's encoder states. The
condition is InternVL's view of one 448-px tile (the model resizes the condition view to ``vit_input_size``;
no dynamic tiling); the target is the DC-AE latents of the generation view (512 px). Loss: the model's own
flow matching (:meth:`OpenUniModel.flow_loss`: uniform timesteps on the training grid, shift 1, velocity
target ``eps - x0``, mean per sample).

Views: both come from one square of the image, cut at a position drawn from (seed, epoch, row) as the authors
cut a random square (``target_fit = "random_crop"``); the grid and the probe use the centred square. The condition
is made the authors' way (``condition_source = "target"``): the target view's float tensor, bilinear without
antialias to ``vit_input_size`` (their 512 -> 448), not the source image through PIL. Bilinear resizing commutes
with the per-channel normalisations in between (to [-1, 1] here, ImageNet's in the model), so resizing before
them gives the authors' features up to float rounding; the model's own resize to the tile is then the identity.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from ...adapters.base import UMMAdapter
from ...adapters.helpers import cached_key, left_pad, unwrap_model
from ...adapters.registry import register_adapter
from ...adapters.targets import GenerationTarget, LossNoise
from ...images import ViewSpec, load_image, to_pil, to_tensor

_PIXEL_MEAN = _PIXEL_STD = (0.5, 0.5, 0.5)  # the model reads pixels in [-1, 1] (InternViT's norm is inside it)
_START_IMAGE, _END_IMAGE, _CONTEXT_IMAGE = "<img>", "</img>", "<IMG_CONTEXT>"  # InternVL3's image tokens


def _build_tiny_openuni(seed: int = 0):
    """:func:`.tiny.build_tiny_openuni`, imported on use so that registering the adapter imports no model code."""
    from .tiny import build_tiny_openuni

    return build_tiny_openuni(seed)


@register_adapter(tiny=_build_tiny_openuni)
class OpenUniAdapter(UMMAdapter):
    name = "openuni"
    model_types = ("openuni",)
    model_class = "reca_hf.models.openuni.OpenUniModel"
    condition_space = "internvl"
    generation_space = "dc-ae-latents"
    condition_relation = "separate"
    generation_target = GenerationTarget("flow")
    min_condition_resolution = 448  # one InternViT tile
    native_generation_resolution = 512  # OpenUni-*-512
    parameter_sharing = "decoupled"
    understanding_modules = (r"lmm\.model\.vision_tower", r"lmm\.model\.multi_modal_projector", r"lmm\.lm_head")
    generation_modules = ("meta_queries", "connector", "projector", "transformer")
    shared_modules = (r"lmm\.model\.language_model",)  # the frozen LLM also runs the queries
    tokenizer_modules = ("vae",)
    default_freeze = ("lmm", "vae")  # the authors freeze InternVL in every stage
    null_prompt = "Generate an image."  # the authors' unconditional prompt for classifier-free guidance
    default_cond_dropout_prob = 0.0  # the authors' reconstruction data has no prompt dropout
    # InternViT + projector features of the condition view, and the DC-AE latents of the target view. (The
    # frozen LLM's states depend on the instruction too, so they are not per-image outputs.)
    frozen_feature_sources = {
        "condition_features": (r"lmm\.model\.vision_tower", r"lmm\.model\.multi_modal_projector"),
        "target_latents": ("vae",),
    }
    target_fit = "random_crop"  # both views from one random square crop, as the authors
    condition_fit = "stretch"  # InternVL's transform resizes an image to its square tile (where the target pads)
    condition_source = "target"  # the authors bilinear-resize the 512-px target tensor (no antialias) to 448
    condition_interpolation = "bilinear"
    text_to_image_template = "Generate an image: {caption}"
    lora_generation_targets = (
        r"transformer\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
        r"connector\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.fc[12])",
        r"projector",
    )
    lora_modules_to_save = ("meta_queries",)
    # The authors' sampler (scripts/image_edit.py): 20 DPM-Solver steps. Their CFG 4.5 against the same
    # prompt and image is a no-op, so reconstruct() samples without guidance by default.
    num_inference_steps = 20
    default_guidance_scale = 1.0
    text_to_image_guidance_scale = 4.5

    # ---- what this model's config says ----

    def config_min_condition_resolution(self) -> int:
        return int(self.config.vit_input_size)

    def config_native_generation_resolution(self) -> int:
        return int(self.config.image_size)

    @property
    def latent_stride(self) -> int:
        """Pixels per SANA token: DC-AE's downsampling times the transformer's patch size."""
        vae_factor = 2 ** (len(self.config.vae_config["encoder_block_out_channels"]) - 1)
        return vae_factor * int(self.config.transformer_config.get("patch_size", 1))

    def generation_resolution_errors(self, resolution: int) -> list[str]:
        if resolution % self.latent_stride:
            return [f"must be a multiple of {self.latent_stride} (DC-AE's stride times SANA's patch size)"]
        return []

    # The condition view may have any size: the model resizes it to one InternViT tile.

    # ---- CPU face ----

    def format_prompt(self, instruction: str | None, with_image: bool) -> str:
        """The authors' prompt, ending at the ``<img>`` the meta-queries follow (``instruction`` None: the image
        alone in the user turn)."""
        tokenizer = self.text_tokenizer()
        start = getattr(tokenizer, "start_image_token", None) or _START_IMAGE
        end = getattr(tokenizer, "end_image_token", None) or _END_IMAGE
        context = getattr(tokenizer, "context_image_token", None) or _CONTEXT_IMAGE
        image = [f"{start}{context * self.config.internvl_config.image_seq_length}{end}"] if with_image else []
        text = [] if instruction is None else [instruction.strip()]
        user = "\n".join(image + text)
        return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{start}"

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokenizer = self.text_tokenizer()
        sequences = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        return left_pad(sequences, tokenizer.pad_token_id)  # the authors left-pad too

    def prepare(self, condition_images, target_images, instructions, *, dropped=None) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = self._encode([self.format_prompt(text, True) for text in instructions])
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "condition_pixel_values": to_tensor(condition_images, _PIXEL_MEAN, _PIXEL_STD),
        }
        if target_images is not None:
            batch["target_pixel_values"] = to_tensor(target_images, _PIXEL_MEAN, _PIXEL_STD)
        return batch

    def text_to_image_prompt(self, caption: str | None) -> str | None:
        """The authors' text-to-image instruction; the null prompt (prompt dropout, CFG) stays as it is."""
        if caption is None:
            return None
        caption = caption.strip()
        return caption if caption == self.null_prompt else self.text_to_image_template.format(caption=caption)

    def prepare_text_to_image(self, captions, target_images, *, dropped=None) -> dict[str, torch.Tensor]:
        prompts = [self.format_prompt(self.text_to_image_prompt(caption), False) for caption in captions]
        input_ids, attention_mask = self._encode(prompts)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "target_pixel_values": to_tensor(target_images, _PIXEL_MEAN, _PIXEL_STD),
        }

    # ---- model face ----

    @staticmethod
    def encoder_states(model, batch: dict[str, Any]) -> torch.Tensor:
        """SANA's encoder states for a prepared batch (with or without a condition image)."""
        features = batch.get(cached_key("condition_features"))
        condition = batch.get("condition_pixel_values")
        if features is None and condition is not None:
            features = model.semantic_features(condition.to(model.device))
        input_ids, attention_mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
        queries = model.query_states(input_ids, attention_mask, features)
        return model.encoder_states(queries)

    def frozen_features(self, model, batch, names=None) -> dict[str, torch.Tensor]:
        openuni = unwrap_model(model)
        names = tuple(self.frozen_feature_sources) if names is None else names
        features = {}
        if "condition_features" in names:
            features["condition_features"] = openuni.semantic_features(
                batch["condition_pixel_values"].to(openuni.device)
            )
        if "target_latents" in names:
            features["target_latents"] = openuni.encode_latents(batch["target_pixel_values"].to(openuni.device))
        return features

    @staticmethod
    def training_timesteps(model, levels: torch.Tensor) -> torch.Tensor:
        """Noise levels in [0, 1] as timesteps of the model's training grid: the grid sigma nearest each level
        (the authors' sigma is always a grid value, ``timesteps[floor(1000 u)] / 1000``)."""
        scheduler = model.train_scheduler
        grid = scheduler.sigmas[: len(scheduler.timesteps)].to(levels.device, torch.float32)
        indices = (grid[None, :] - levels[:, None].float()).abs().argmin(dim=1).cpu()
        return scheduler.timesteps[indices]

    def loss(
        self, model, batch: dict[str, Any], *, reduction: str = "mean", noise: LossNoise | None = None
    ) -> torch.Tensor:
        openuni = unwrap_model(model)
        states = self.encoder_states(openuni, batch)
        latents = batch.get(cached_key("target_latents"))
        if latents is None:
            latents = openuni.encode_latents(batch["target_pixel_values"].to(openuni.device))
        generator, timesteps = None, None
        if noise is not None:
            generator = noise.generator(latents.device)
            levels = noise.levels(latents.shape[0])
            timesteps = self.training_timesteps(openuni, levels) if levels is not None else None
        return openuni.flow_loss(latents, states, generator=generator, timesteps=timesteps, reduction=reduction)

    def text_to_image_loss(self, model, batch, *, reduction: str = "mean", noise: LossNoise | None = None):
        return self.loss(model, batch, reduction=reduction, noise=noise)

    @torch.no_grad()
    def round_trip(self, images, *, model=None, views: ViewSpec | None = None) -> list[Image.Image]:
        openuni = unwrap_model(self._bound_model(model))
        views = views or self.default_views()
        targets = to_tensor([views.target_view(load_image(image)) for image in images], _PIXEL_MEAN, _PIXEL_STD)
        latents = openuni.encode_latents(targets.to(openuni.device))
        return to_pil(openuni.decode_latents(latents), _PIXEL_MEAN, _PIXEL_STD)

    def _sample(self, openuni, states, negative, resolution: int, guidance: float, generator, steps: int):
        return openuni.generate(
            states,
            negative if guidance > 1 else None,
            height=resolution,
            width=resolution,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generator,
            output_type="latent",
        )

    def sample_codes(self, openuni, conditions, instructions, views, guidance, do_sample, temperature, generator):
        """DC-AE latents from diffusers' SANA pipeline (DPM-Solver, the authors' 20 steps), conditioned on the
        condition views; with ``guidance > 1`` the unconditional branch is the null prompt with the image kept
        (the authors' CFG keeps the image). ``do_sample`` and ``temperature`` belong to token samplers."""
        states = self.encoder_states(openuni, self.prepare(conditions, None, instructions))
        negative = None
        if guidance > 1:
            null = self.prepare(conditions, None, [self.null_prompt] * len(conditions))
            negative = self.encoder_states(openuni, null)
        return self._sample(
            openuni, states, negative, views.generation_resolution, guidance, generator, self.num_inference_steps
        )

    def decode_codes(self, openuni, codes: torch.Tensor) -> list[Image.Image]:
        return to_pil(openuni.decode_latents(codes), _PIXEL_MEAN, _PIXEL_STD)

    def sample_text_codes(
        self, openuni, prompts, resolution, guidance, generator, *, num_inference_steps: int | None = None
    ) -> torch.Tensor:
        """Text-to-image as the authors: "Generate an image: {caption}", CFG (4.5 by default) against the null
        prompt "Generate an image.", 20 DPM-Solver steps."""

        def states(texts: list[str]) -> torch.Tensor:
            input_ids, attention_mask = self._encode(
                [self.format_prompt(self.text_to_image_prompt(t), False) for t in texts]
            )
            return self.encoder_states(openuni, {"input_ids": input_ids, "attention_mask": attention_mask})

        negative = states([self.null_prompt] * len(prompts)) if guidance > 1 else None
        steps = num_inference_steps or self.num_inference_steps
        return self._sample(openuni, states(prompts), negative, resolution, guidance, generator, steps)
