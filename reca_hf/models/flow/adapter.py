"""The tiny flow-matching UMM of `reca_hf.models.flow`: SigLIP features in, flow matching on latents out.

Sequence of one RecA example::

    <bos> <|User|>: <boi> [condition slots: SigLIP features, projected] <eoi> {instruction} \\n\\n <|Assistant|>:
    [learnable queries] -> hidden states at the queries -> projector -> SANA transformer (cross-attention)

Loss: rectified-flow matching on the target's autoencoder latents, as OpenUni trains SANA: a noise level
sigma ~ U(0, 1) per sample, x_t = (1 - sigma) x0 + sigma eps, the transformer predicts the velocity eps - x0,
mean squared error per sample. Condition and target live in different spaces (``condition_relation
"separate"``); :class:`FlowLatentsAdapter` is the same model reading the target's own latents instead, the
copyable setting of the bottleneck ablation.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from ...adapters.base import UMMAdapter
from ...adapters.helpers import left_pad, unwrap_model
from ...adapters.registry import register_adapter
from ...adapters.targets import GenerationTarget, LossNoise, reduce_loss
from ...images import ViewSpec, load_image, to_pil, to_tensor, view_size
from .tiny import build_tiny_flow, build_tiny_flow_latents

_PIXEL_MEAN = _PIXEL_STD = (0.5, 0.5, 0.5)  # both encoders and the autoencoder read pixels in [-1, 1]


@register_adapter(tiny=build_tiny_flow)
class FlowAdapter(UMMAdapter):
    name = "flow"
    model_types = ("reca_tiny_flow",)
    model_class = "reca_hf.models.flow.modeling_flow.TinyFlowModel"
    condition_space = "siglip"
    generation_space = "kl-latents"
    condition_relation = "separate"
    generation_target = GenerationTarget("flow")
    min_condition_resolution = 32
    native_generation_resolution = 32
    parameter_sharing = "decoupled"
    understanding_modules = ("vision_model",)
    generation_modules = ("queries", "query_projector", "transformer")
    shared_modules = ("condition_projector", "language_model")
    tokenizer_modules = ("vae",)
    default_freeze = ("vision_model", "condition_projector", "language_model", "vae")
    null_prompt = ""
    default_cond_dropout_prob = 0.0
    lora_generation_targets = (
        r"transformer\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
        r"query_projector",
    )
    lora_modules_to_save = ("queries",)
    num_inference_steps = 20  # Euler steps of reconstruct()

    # ---- what this model's config says ----

    def config_min_condition_resolution(self) -> int:
        return int(self.config.image_size)

    def config_native_generation_resolution(self) -> int:
        return int(self.config.image_size)

    @property
    def latent_stride(self) -> int:
        return 2 ** (len(self.config.vae_config["block_out_channels"]) - 1)

    def num_condition_tokens(self, resolution: int) -> int:
        return (resolution // self.config.vision_config.patch_size) ** 2

    def condition_resolution_errors(self, resolution: int) -> list[str]:
        patch = self.config.vision_config.patch_size
        if resolution % patch:
            return [f"must be a multiple of the vision encoder's patch size {patch}"]
        return []

    def generation_resolution_errors(self, resolution: int) -> list[str]:
        if resolution % self.latent_stride:
            return [f"must be a multiple of the autoencoder's stride {self.latent_stride}"]
        return []

    # ---- CPU face ----

    def format_prompt(self, instruction: str | None, num_condition_tokens: int) -> str:
        """The user turn: the condition slots (if any), then ``instruction`` (None: left out)."""
        tokenizer = self.text_tokenizer()
        slots = tokenizer.image_token * num_condition_tokens
        image = [f"{tokenizer.boi_token}{slots}{tokenizer.eoi_token}"] if num_condition_tokens else []
        text = [] if instruction is None else [instruction.strip()]
        return f"<|User|>: {' '.join(image + text)}\n\n<|Assistant|>:"

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokenizer = self.text_tokenizer()
        sequences = [tokenizer(text)["input_ids"] for text in texts]
        return left_pad(sequences, tokenizer.pad_token_id)

    def prepare(self, condition_images, target_images, instructions, *, dropped=None) -> dict[str, torch.Tensor]:
        num_slots = self.num_condition_tokens(view_size(condition_images[0])[0])
        input_ids, attention_mask = self._encode([self.format_prompt(text, num_slots) for text in instructions])
        image_token = self.text_tokenizer().convert_tokens_to_ids(self.text_tokenizer().image_token)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "condition_mask": input_ids == image_token,
            "condition_pixel_values": to_tensor(condition_images, _PIXEL_MEAN, _PIXEL_STD),
        }
        if target_images is not None:
            batch["target_pixel_values"] = to_tensor(target_images, _PIXEL_MEAN, _PIXEL_STD)
        return batch

    def prepare_text_to_image(self, captions, target_images, *, dropped=None) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = self._encode([self.format_prompt(caption, 0) for caption in captions])
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "target_pixel_values": to_tensor(target_images, _PIXEL_MEAN, _PIXEL_STD),
        }

    # ---- model face ----

    @staticmethod
    def _states(model, batch: dict[str, Any]) -> torch.Tensor:
        return model.encoder_states(
            batch["input_ids"],
            batch["attention_mask"],
            batch.get("condition_pixel_values"),
            batch.get("condition_mask"),
        )

    def loss(
        self, model, batch: dict[str, Any], *, reduction: str = "mean", noise: LossNoise | None = None
    ) -> torch.Tensor:
        flow = unwrap_model(model)
        states = self._states(flow, batch)
        with torch.no_grad():
            x0 = flow.latents(batch["target_pixel_values"]).float()
        generator = noise.generator(x0.device) if noise is not None else None
        sigmas = noise.levels(x0.shape[0], x0.device) if noise is not None else None
        if sigmas is None:
            sigmas = torch.rand(x0.shape[0], device=x0.device, generator=generator)
        eps = torch.randn(x0.shape, device=x0.device, generator=generator)
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1 - s) * x0 + s * eps
        prediction = flow.velocity(noisy, sigmas, states).float()
        per_sample = (prediction - (eps - x0)).pow(2).flatten(1).mean(1)
        return reduce_loss(per_sample, reduction)

    def text_to_image_loss(self, model, batch, *, reduction: str = "mean", noise: LossNoise | None = None):
        return self.loss(model, batch, reduction=reduction, noise=noise)

    @torch.no_grad()
    def round_trip(self, images, *, model=None, views: ViewSpec | None = None) -> list[Image.Image]:
        flow = unwrap_model(self._bound_model(model))
        views = views or self.default_views()
        targets = to_tensor([views.target_view(load_image(image)) for image in images], _PIXEL_MEAN, _PIXEL_STD)
        latents = flow.latents(targets.to(flow.device))
        return to_pil(flow.decode(latents), _PIXEL_MEAN, _PIXEL_STD)

    def sample_codes(self, flow, conditions, instructions, views, guidance, do_sample, temperature, generator):
        """Euler-integrate the flow from noise to latents, conditioned on the understanding features of the
        condition views; with ``guidance != 1`` the unconditional branch is the null prompt without an image.
        (``do_sample`` and ``temperature`` belong to token samplers: a flow sample is drawn by its noise.)"""
        device = flow.device
        batch = {k: v.to(device) for k, v in self.prepare(conditions, None, instructions).items()}
        states = self._states(flow, batch)
        unconditional_states = self._null_states(flow, len(conditions)) if guidance != 1.0 else None
        return self._integrate(
            flow,
            states,
            unconditional_states,
            views.generation_resolution,
            guidance,
            generator,
            self.num_inference_steps,
        )

    def _null_states(self, flow, count: int) -> torch.Tensor:
        """The unconditional branch of classifier-free guidance: the null prompt, without an image, ``count`` times."""
        input_ids, attention_mask = self._encode([self.format_prompt(self.null_prompt, 0)] * count)
        return self._states(
            flow, {"input_ids": input_ids.to(flow.device), "attention_mask": attention_mask.to(flow.device)}
        )

    def sample_text_codes(
        self, flow, prompts, resolution, guidance, generator, *, num_inference_steps: int | None = None
    ) -> torch.Tensor:
        """Text-to-image: the prompt without an image as the condition, CFG against the null prompt."""
        device = flow.device
        input_ids, attention_mask = self._encode([self.format_prompt(prompt, 0) for prompt in prompts])
        states = self._states(flow, {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)})
        unconditional_states = self._null_states(flow, len(prompts)) if guidance != 1.0 else None
        return self._integrate(
            flow,
            states,
            unconditional_states,
            resolution,
            guidance,
            generator,
            num_inference_steps or self.num_inference_steps,
        )

    def _integrate(
        self, flow, states, unconditional_states, resolution: int, guidance: float, generator, steps: int
    ) -> torch.Tensor:
        """Euler steps from noise (sigma 1) to latents (sigma 0); with ``guidance != 1`` CFG against
        ``unconditional_states``, in one batched call when both branches' states have one shape (they differ
        when the conditional ones carry condition slots, as with ``aligned_condition``)."""
        device = flow.device
        count = states.shape[0]
        side = resolution // self.latent_stride
        shape = (count, flow.vae.config.latent_channels, side, side)
        latents = torch.randn(shape, device=device, generator=generator)
        sigmas = torch.linspace(1.0, 0.0, steps + 1, device=device)
        batched = unconditional_states is not None and unconditional_states.shape[1:] == states.shape[1:]
        both = torch.cat([states, unconditional_states]) if batched else None
        for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:]):
            if unconditional_states is None:
                velocity = flow.velocity(latents, sigma.expand(count), states).float()
                latents = latents + (next_sigma - sigma) * velocity
                continue
            if batched:
                velocity = flow.velocity(torch.cat([latents, latents]), sigma.expand(2 * count), both).float()
                conditional, unconditional_velocity = velocity.chunk(2)
            else:
                conditional = flow.velocity(latents, sigma.expand(count), states).float()
                unconditional_velocity = flow.velocity(latents, sigma.expand(count), unconditional_states).float()
            velocity = unconditional_velocity + guidance * (conditional - unconditional_velocity)
            latents = latents + (next_sigma - sigma) * velocity
        return latents

    def decode_codes(self, flow, codes: torch.Tensor) -> list[Image.Image]:
        return to_pil(flow.decode(codes), _PIXEL_MEAN, _PIXEL_STD)


@register_adapter(tiny=build_tiny_flow_latents)
class FlowLatentsAdapter(FlowAdapter):
    """The tiny flow model with the autoencoder as its understanding encoder: the condition is the target's
    own latents, the same representation it generates, and the language model's states at the condition slots
    also reach the transformer on its latent grid (``aligned_condition``). Only the bottleneck ablation wants
    this."""

    name = "flow_latents"
    model_types = ("reca_tiny_flow_latents",)
    condition_space = "kl-latents"
    condition_relation = "same"
    understanding_modules = ()
    generation_modules = ("queries", "query_projector", "grid_projector", "transformer")
    default_freeze = ("condition_projector", "language_model", "vae")
    lora_generation_targets = (*FlowAdapter.lora_generation_targets, r"grid_projector")

    def num_condition_tokens(self, resolution: int) -> int:
        return (resolution // self.latent_stride) ** 2

    def condition_resolution_errors(self, resolution: int) -> list[str]:
        if resolution % self.latent_stride:
            return [f"must be a multiple of the autoencoder's stride {self.latent_stride}"]
        return []
