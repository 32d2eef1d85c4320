"""Harmon (`reca_hf.models.harmon`): one Qwen2.5 understands and generates; MAR with a per-token diffusion head.

Sequence of one RecA example, the authors' (``Harmon/src/models/harmon_dev.py::recon_loss``)::

    <|im_start|>user\\n [h*w + buffer slots <- MAR encoder over the condition's latents, proj_in, grad x 0.1]
    \\n{instruction}<|im_end|>\\n<|im_start|>assistant\\n [right padding] [visible target latents: MAR encoder, proj_in]

The LLM's states at the visible latents go through ``proj_out`` and are added to the encoder states; the MAR
decoder predicts a condition for every token and the diffusion head scores the masked ones (epsilon MSE plus the
variational bound, each token ``diffusion_batch_mul`` times). Masking: one ratio per batch from a normal of mean 1
and std 0.25 truncated to [0.7, 1], one random order per sample, the first ``ceil(n * ratio)`` positions masked.

Views: the image is stretched to a square at 512 px (``target_fit = "stretch"``); the condition is the target
tensor itself (``condition_source = "target"``, same resolution: no bottleneck, ``condition_relation =
"derived"``). A dropped prompt is "Generate an image." with the image kept. Image-to-text pads the image to a
square with grey 127 (the authors' ``expand2square``) and scores the answer with the LLM's text head.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from PIL import Image

from ...adapters.base import UMMAdapter
from ...adapters.helpers import IGNORE_INDEX, unwrap_model
from ...adapters.registry import register_adapter
from ...adapters.targets import GenerationTarget, LossNoise
from ...images import ViewSpec, load_image, to_pil, to_tensor, view_size

_PIXEL_MEAN = _PIXEL_STD = (0.5, 0.5, 0.5)  # the VAE reads pixels in [-1, 1]
_USER, _END, _ASSISTANT = "<|im_start|>user\n", "<|im_end|>", "\n<|im_start|>assistant\n"  # Qwen2.5's chat turns


def _build_tiny_harmon(seed: int = 0):
    """:func:`.tiny.build_tiny_harmon`, imported on use so that registering the adapter imports no model code."""
    from .tiny import build_tiny_harmon

    return build_tiny_harmon(seed)


@register_adapter(tiny=_build_tiny_harmon)
class HarmonAdapter(UMMAdapter):
    name = "harmon"
    model_types = ("harmon",)
    model_class = "reca_hf.models.harmon.HarmonModel"
    condition_space = "mar-encoder"  # the trainable MAR encoder over the KL-16 latents
    generation_space = "kl-latents"
    condition_relation = "derived"
    generation_target = GenerationTarget("diffusion")
    min_condition_resolution = 512  # the authors' condition is the 512-px target itself
    native_generation_resolution = 512
    parameter_sharing = "shared"
    # The text head serves only image-to-text, but the authors train it (tied to the embeddings in Qwen2.5-0.5B
    # and 1.5B), so it is shared here: `freeze: auto` freezes understanding-only modules.
    understanding_modules = ()
    generation_modules = (
        r"mar\.(decoder_embed|mask_token|decoder_pos_embed_learned|decoder_blocks|decoder_norm)",
        r"mar\.(diffusion_pos_embed_learned|diffloss)",
        "proj_out",
    )
    shared_modules = (
        "llm",
        r"mar\.(z_proj|z_proj_ln|fake_latent|encoder_pos_embed_learned|encoder_blocks|encoder_norm)",
        "proj_in",
    )
    tokenizer_modules = ("vae",)
    default_freeze = ("vae", r"mar\.class_emb")  # the authors train the rest; Harmon never reads class_emb
    null_prompt = "Generate an image."  # the authors' unconditional prompt; the image stays
    default_cond_dropout_prob = 0.1
    target_fit = "stretch"  # text2image.py resizes the image to a square without cropping
    condition_fit = "pad"  # image-to-text: expand2square with grey 127, then 512 px
    condition_source = "target"  # the condition is the target tensor itself
    condition_interpolation = "bilinear"
    lora_generation_targets = (
        r"mar\.decoder_embed",
        r"mar\.decoder_blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))",
        r"mar\.diffloss\.net\.(time_embed\.mlp\.[02]|cond_embed|input_proj)",
        r"mar\.diffloss\.net\.(res_blocks\.\d+\.(mlp\.[02]|adaLN_modulation\.1))",
        r"mar\.diffloss\.net\.final_layer\.(linear|adaLN_modulation\.1)",
        r"proj_out\.[02]",
    )
    no_weight_decay = (r"mar\.diffloss",)  # the authors' optimizer constructor: no decay on the diffusion head
    default_instruction = "Describe this image in details."  # the authors' sample_recon prompt
    default_guidance_scale = 3.0  # the authors' sample_recon: CFG 3.0 against the null prompt without the image
    text_to_image_template = "Generate an image: {caption}"
    grad_scale = 0.1  # on the understanding features (the authors' _ScaleGradient)
    mask_ratio_std = 0.25  # MAR's truncated normal (mean 1, lower end from the config)
    num_iter = 64  # MAR sampling rounds of reconstruct() and text_to_image()

    # ---- what this model's config says ----

    @property
    def latent_stride(self) -> int:
        """Pixels per MAR token: the VAE's stride times MAR's patch size."""
        return int(self.config.vae_stride) * int(self.config.patch_size)

    def config_min_condition_resolution(self) -> int:
        return self.config_native_generation_resolution()  # the condition is the target itself

    def config_native_generation_resolution(self) -> int:
        # MAR's position tables cover `img_size` (256 px); Harmon trains and samples at twice that (512 px, a
        # 32 x 32 grid on the interpolated 16 x 16 tables), as the tiny model does at 64 px.
        return 2 * int(self.config.img_size)

    def _stride_errors(self, resolution: int) -> list[str]:
        if resolution % self.latent_stride:
            return [f"must be a multiple of {self.latent_stride} (the VAE's stride times MAR's patch size)"]
        return []

    def condition_resolution_errors(self, resolution: int) -> list[str]:
        return self._stride_errors(resolution)

    def generation_resolution_errors(self, resolution: int) -> list[str]:
        return self._stride_errors(resolution)

    def round_condition_resolution(self, resolution: int) -> int:
        return max(self.latent_stride, resolution - resolution % self.latent_stride)

    def image_slots(self, height: int, width: int) -> int:
        """Prompt slots of an ``height x width``-pixel image: its tokens plus MAR's buffer tokens."""
        return (height // self.latent_stride) * (width // self.latent_stride) + int(self.config.buffer_size)

    # ---- CPU face ----

    def _ids(self, text: str) -> list[int]:
        return self.text_tokenizer()(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, text: str | None, slots: int) -> list[int]:
        """The authors' generation prompt: the chat turn tokenised whole, ``slots`` image tokens inserted after
        the user header (their index 3 in Qwen2.5); ``text`` None: no instruction."""
        ids = self._ids(f"{_USER}{text or ''}{_END}{_ASSISTANT}")
        at = len(self._ids(_USER))
        return ids[:at] + [int(self.config.image_token_id)] * slots + ids[at:]

    def instruction_text(self, instruction: str | None) -> str | None:
        """An instruction as the authors write it into the prompt: ``"\\n{prompt}"``, the null prompt as it is."""
        if instruction is None or instruction == self.null_prompt:
            return instruction
        return f"\n{instruction}"

    def _right_pad(self, sequences: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), value, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            mask[row, : len(sequence)] = 1
        return ids, mask

    def _pad_id(self) -> int:
        pad = self.text_tokenizer().pad_token_id
        return 0 if pad is None else int(pad)

    def prepare(self, condition_images, target_images, instructions, *, dropped=None) -> dict[str, torch.Tensor]:
        sizes = {view_size(image) for image in condition_images}
        if len(sizes) != 1:
            raise ValueError(f"the harmon adapter needs condition views of one size in a batch, got {sorted(sizes)}")
        slots = self.image_slots(*next(iter(sizes)))
        sequences = [self.prompt_ids(self.instruction_text(text), slots) for text in instructions]
        input_ids, attention_mask = self._right_pad(sequences, self._pad_id())
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "condition_pixel_values": to_tensor(condition_images, _PIXEL_MEAN, _PIXEL_STD),
        }
        if target_images is not None:
            batch["target_pixel_values"] = to_tensor(target_images, _PIXEL_MEAN, _PIXEL_STD)
        return batch

    def prepare_image_to_text(self, images, questions, answers) -> dict[str, Any]:
        """The authors' LLaVA layout (xtuner's Qwen chat): ``<|im_start|>user\\n[slots]\\n{question}<|im_end|>
        \\n<|im_start|>assistant\\n{answer}<|im_end|>``, right-padded; ``labels`` cover the answer and its end."""
        slots = self.image_slots(*view_size(images[0]))
        end = self._ids(_END)
        sequences, labels = [], []
        for question, answer in zip(questions, answers):
            prompt = self._ids(_USER) + [int(self.config.image_token_id)] * slots
            prompt += self._ids(f"\n{question.strip()}{_END}{_ASSISTANT}")
            reply = self._ids(answer.strip()) + end
            sequences.append(prompt + reply)
            labels.append([IGNORE_INDEX] * len(prompt) + reply)
        input_ids, attention_mask = self._right_pad(sequences, self._pad_id())
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": self._right_pad(labels, IGNORE_INDEX)[0],
            "condition_pixel_values": to_tensor(images, _PIXEL_MEAN, _PIXEL_STD),
        }

    # ---- model face ----

    def _latents(self, harmon, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(harmon.device)
        if pixels.shape[0] == 1 and max(pixels.shape[-2:]) <= self.latent_stride:
            # A one-token image reaches the VAE's last level as a 1 x 1 map, where torch refuses a GroupNorm
            # over one value per group at batch 1; GroupNorm normalises each sample alone, so a second copy
            # leaves the first one's latents as they are.
            return harmon.encode_latents(pixels.repeat(2, 1, 1, 1))[:1]
        return harmon.encode_latents(pixels)

    def _condition_latents(self, harmon, batch: dict[str, Any], latents: torch.Tensor) -> torch.Tensor | None:
        """The condition's latents, or None when the condition is the target itself (the authors' one encoding)."""
        condition = batch.get("condition_pixel_values")
        target = batch["target_pixel_values"]
        if condition is None or (condition.shape == target.shape and torch.equal(condition, target)):
            return None
        return self._latents(harmon, condition)

    def mask_ratio(self, generator: torch.Generator | None = None) -> float:
        """One MAR mask ratio: a normal of mean 1 and std 0.25 truncated to [mask_ratio_min, 1]."""
        from .modeling_harmon import truncated_normal_mask_ratio

        uniform = float(torch.rand((), generator=generator))
        return truncated_normal_mask_ratio(uniform, float(self.config.mask_ratio_min), self.mask_ratio_std)

    def draw_mask(self, harmon, batch_size: int, tokens: int, noise: LossNoise | None = None):
        """``(mask, generator)``: the ``(batch, tokens)`` MAR mask (1 = masked) with one ratio for the batch
        (``noise.mask_ratio`` when fixed) and one random order per sample, drawn from ``noise``'s CPU generator
        (returned, for the draws after it) or in training from the global one (None)."""
        from .modeling_harmon import mask_from_orders

        generator = noise.generator("cpu") if noise is not None else None
        ratio = noise.mask_ratio if noise is not None and noise.mask_ratio is not None else None
        ratio = self.mask_ratio(generator) if ratio is None else ratio
        orders = harmon.sample_orders(batch_size, tokens, generator)
        return mask_from_orders(orders, int(math.ceil(tokens * ratio))), generator

    def loss(
        self, model, batch: dict[str, Any], *, reduction: str = "mean", noise: LossNoise | None = None
    ) -> torch.Tensor:
        harmon = unwrap_model(model)
        latents = self._latents(harmon, batch["target_pixel_values"])
        condition = self._condition_latents(harmon, batch, latents)
        b, h, w, _ = latents.shape
        tokens = h * w
        mask, generator = self.draw_mask(harmon, b, tokens, noise)
        draws = {}
        if noise is not None:  # every draw from one CPU generator: the same values on every device
            rows = harmon.config.diffusion_batch_mul * b * tokens
            timesteps, gaussian = harmon.mar.diffloss.draw(rows, latents.device, generator)
            levels = noise.levels(b)
            if levels is not None:
                steps = harmon.mar.diffloss.train_schedule.num_timesteps
                per_sample = (levels * steps).long().clamp(max=steps - 1)
                timesteps = per_sample.repeat_interleave(tokens).repeat(harmon.config.diffusion_batch_mul)
            draws = {"timesteps": timesteps.to(latents.device), "noise": gaussian}
        return harmon.reconstruction_loss(
            latents,
            batch["input_ids"].to(latents.device),
            batch["attention_mask"].to(latents.device),
            mask.to(latents.device),
            grad_scale=self.grad_scale,
            condition_latents=condition,
            reduction=reduction,
            **draws,
        )

    def image_to_text_loss(self, model, batch: dict[str, Any]) -> torch.Tensor:
        harmon = unwrap_model(model)
        latents = self._latents(harmon, batch["condition_pixel_values"])
        return harmon.image_to_text_loss(
            batch["input_ids"].to(latents.device),
            batch["attention_mask"].to(latents.device),
            batch["labels"].to(latents.device),
            latents,
            grad_scale=self.grad_scale,
        )

    @torch.no_grad()
    def round_trip(self, images, *, model=None, views: ViewSpec | None = None) -> list[Image.Image]:
        harmon = unwrap_model(self._bound_model(model))
        views = views or self.default_views()
        targets = to_tensor([views.target_view(load_image(image)) for image in images], _PIXEL_MEAN, _PIXEL_STD)
        return to_pil(harmon.decode_latents(self._latents(harmon, targets)), _PIXEL_MEAN, _PIXEL_STD)

    def _prompts(self, harmon, conditional: list[list[int]], features, guidance: float):
        """Embeddings and attention mask of the prompts, then (``guidance != 1``) the null prompts without image."""
        sequences = list(conditional)
        if guidance != 1.0:
            sequences += [self.prompt_ids(self.null_prompt, 0)] * len(conditional)
        input_ids, attention_mask = self._right_pad(sequences, self._pad_id())
        input_ids, attention_mask = input_ids.to(harmon.device), attention_mask.to(harmon.device)
        n = len(conditional)
        embeds = harmon.embed_prompt(input_ids[:n], features)
        if guidance != 1.0:
            embeds = torch.cat([embeds, harmon.embed_prompt(input_ids[n:])])
        return embeds, attention_mask

    def _sample(self, harmon, embeds, attention_mask, side: int, guidance: float, temperature, generator, num_iter):
        grid = side // self.latent_stride
        rows = embeds.shape[0] // 2 if guidance != 1.0 else embeds.shape[0]
        device = generator.device if generator is not None else torch.device("cpu")
        orders = torch.stack([torch.randperm(grid * grid, generator=generator, device=device) for _ in range(rows)])
        return harmon.sample_latents(
            embeds,
            attention_mask,
            image_shape=(grid, grid),
            num_iter=num_iter,
            cfg=guidance,
            temperature=temperature,
            orders=orders,
            generator=generator,
        )

    def sample_codes(self, harmon, conditions, instructions, views, guidance, do_sample, temperature, generator):
        """The authors' MAR sampler (``num_iter`` rounds, CFG on epsilon against the null prompt without the image,
        as their ``sample_recon``), conditioned on the understanding features of the condition views in the
        training prompt. ``do_sample`` belongs to token samplers: MAR always samples."""
        batch = self.prepare(conditions, None, instructions)
        _, features = harmon.visual_features(self._latents(harmon, batch["condition_pixel_values"]))
        sequences = [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
        embeds, attention_mask = self._prompts(harmon, sequences, features, guidance)
        return self._sample(
            harmon, embeds, attention_mask, views.generation_resolution, guidance, temperature, generator, self.num_iter
        )

    def decode_codes(self, harmon, codes: torch.Tensor) -> list[Image.Image]:
        return to_pil(harmon.decode_latents(codes), _PIXEL_MEAN, _PIXEL_STD)

    def sample_text_codes(
        self, harmon, prompts, resolution, guidance, generator, *, num_inference_steps: int | None = None
    ) -> torch.Tensor:
        """Text-to-image as the authors: "Generate an image: {caption}", CFG on epsilon against "Generate an
        image.", ``num_inference_steps`` MAR rounds (default 64)."""
        sequences = [self.prompt_ids(self.text_to_image_template.format(caption=p.strip()), 0) for p in prompts]
        embeds, attention_mask = self._prompts(harmon, sequences, None, guidance)
        steps = num_inference_steps or self.num_iter
        return self._sample(harmon, embeds, attention_mask, resolution, guidance, 1.0, generator, steps)
