"""Janus and Janus-Pro (`JanusForConditionalGeneration`): SigLIP features in, VQ codes out.

Sequence of one RecA example (the condition sits where an image sits for understanding)::

    <bos> <|User|>: <boi> [condition slots: SigLIP+aligner features] <eoi> \\n {instruction} \\n\\n <|Assistant|>: <boi>
    [VQ codes of the target, teacher-forced through the generation embeddings] -> generation_head -> CE

Janus' ``forward()`` only returns text logits, so the generation loss is assembled here. Condition
(SigLIP) and target (VQ) live in different spaces: a natural bottleneck, so 384 px in and out is safe.

The condition is made from the source image (``condition_source = "image"``): padded and resized by PIL as
Janus' image processor does, which is what its understanding path was trained on. No RecA authors' code
exists for Janus; ``condition_source="target"`` (the target tensor, resampled by torch) is a choice a user
can make, not a parity fix.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from ...adapters.base import UMMAdapter
from ...adapters.helpers import answer_batch, answer_length, answer_loss, cached_key, next_code, unwrap_model
from ...adapters.registry import register_adapter
from ...adapters.targets import GenerationTarget, LossNoise, per_sample_cross_entropy, reduce_loss
from ...images import ViewSpec, load_image, to_pil, to_tensor, view_size
from ...slots import check_once, slot_count_problem
from .tiny import build_tiny_janus, build_tiny_janus_demo

_VQ_MEAN = _VQ_STD = (0.5, 0.5, 0.5)  # Janus' VQ encoder reads pixels in [-1, 1]


JANUS_SNIPPET = """\
import torch
from PIL import Image
from transformers import AutoProcessor, JanusForConditionalGeneration

model = JanusForConditionalGeneration.from_pretrained("{repo_id}")
processor = AutoProcessor.from_pretrained("{repo_id}")
messages = [{{"role": "user", "content": [{{"type": "text", "text": "a red circle on a white background"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=prompt, generation_mode="image", return_tensors="pt").to(model.device)
torch.manual_seed(0)
tokens = model.generate(**inputs, generation_mode="image", do_sample=True, guidance_scale=5.0)
pixels = model.decode_image_tokens(tokens)  # (batch, height, width, 3), in [-1, 1]
image = Image.fromarray(((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy())
image.save("sample.png")"""


@register_adapter(tiny=build_tiny_janus, demo=build_tiny_janus_demo)
class JanusAdapter(UMMAdapter):
    name = "janus"
    model_types = ("janus",)
    model_class = "JanusForConditionalGeneration"
    condition_space = "siglip"
    generation_space = "vq"
    min_condition_resolution = 384
    native_generation_resolution = 384
    condition_relation = "separate"
    generation_target = GenerationTarget("autoregressive_tokens")
    parameter_sharing = "shared"
    understanding_modules = ("model.vision_model", "model.aligner", "lm_head")
    generation_modules = ("model.generation_embeddings", "model.generation_aligner", "model.generation_head")
    shared_modules = ("model.language_model",)
    tokenizer_modules = ("model.vqmodel",)
    # Trained by default: the language model (minus its token embeddings) and the generation modules.
    default_freeze = (
        "model.vision_model",
        "model.aligner",
        "model.vqmodel",
        "lm_head",
        "model.language_model.embed_tokens",
    )
    null_prompt = ""
    condition_fit = "pad"  # JanusImageProcessor pads to a square with its background colour
    condition_source = "image"  # its processor's resize is what the understanding path was trained with
    # SigLIP + aligner features of the condition view, and the VQ codes of the target view.
    frozen_feature_sources = {
        "condition_features": ("model.vision_model", "model.aligner"),
        "target_codes": ("model.vqmodel",),
    }
    lora_generation_targets = (
        r"model\.generation_aligner\.(fc1|hidden_layers\.\d+)",
        r"model\.generation_head\.(proj_out|vision_head)",
    )
    lora_llm_targets = (
        r"model\.language_model\.layers\.\d+\.self_attn\.[qkvo]_proj",
        r"model\.language_model\.layers\.\d+\.mlp\.(gate|up|down)_proj",
    )
    # Text goes through JanusModel.forward; the RecA loss, reconstruct() and generate(generation_mode="image")
    # call model.language_model and model.generation_head directly.
    understanding_entry = "model"
    default_guidance_scale = 5.0  # Janus-Pro's published text-to-image guidance, also reconstruct()'s

    @classmethod
    def generation_snippet(cls, repo_id: str) -> str:
        """transformers' own Janus text-to-image: ``generate(generation_mode="image")``, then the VQ decoder."""
        return JANUS_SNIPPET.format(repo_id=repo_id)

    # ---- what this model's config says -------------------------------------------------------

    @property
    def patch_size(self) -> int:
        return int(self.config.vision_config.patch_size)

    @property
    def vq_downsample(self) -> int:
        return 2 ** (len(self.config.vq_config.channel_multiplier) - 1)

    def config_min_condition_resolution(self) -> int:
        return int(self.config.vision_config.image_size)

    def config_native_generation_resolution(self) -> int:
        return int(self.config.vq_config.num_patches) * self.vq_downsample

    @property
    def num_target_tokens(self) -> int:
        return int(self.config.vq_config.num_patches) ** 2

    def num_condition_tokens(self, resolution: int) -> int:
        return (resolution // self.patch_size) ** 2

    def round_condition_resolution(self, resolution: int) -> int:
        return max(self.patch_size, resolution - resolution % self.patch_size)

    def condition_resolution_errors(self, resolution: int) -> list[str]:
        if resolution < self.patch_size or resolution % self.patch_size:
            return [
                f"Janus' SigLIP encoder reads {self.patch_size}-px patches: use a positive multiple of "
                f"{self.patch_size} (its native resolution is {self.min_condition_resolution})."
            ]
        return []

    def generation_resolution_errors(self, resolution: int) -> list[str]:
        native = self.native_generation_resolution
        if resolution != native:
            grid = self.config.vq_config.num_patches
            return [f"Janus' VQ decoder has a fixed {grid}x{grid} grid ({native} px); set it to 'auto' or {native}."]
        return []

    # ---- CPU face ----------------------------------------------------------------------------

    def _tokenizer(self):
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("the Janus adapter needs the model's processor: pass processing_class=JanusProcessor(...)")
        return tokenizer

    def _pixel_stats(self):
        image_processor = getattr(self.processor, "image_processor", None)
        mean = getattr(image_processor, "image_mean", None)
        std = getattr(image_processor, "image_std", None)
        if mean is None or std is None:
            raise ValueError("the Janus processor's image processor has no image_mean/image_std to normalise with")
        return mean, std

    def _chat(self, text: str | None, with_image: bool) -> str:
        """One user turn (an optional image, then ``text``; None: no text) in the processor's chat format, ready
        for the answer."""
        tokenizer = self._tokenizer()
        image = tokenizer.image_token
        content = [{"type": "image"}] if with_image else []
        if text is not None:
            content.append({"type": "text", "text": text})
        conversation = [{"role": "user", "content": content}]
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        image_line = f"{image}\n" if with_image else ""
        return f"<|User|>: {image_line}{text or ''}\n\n<|Assistant|>:"  # Janus' own conversation format

    def format_prompt(self, instruction: str | None, num_condition_tokens: int, generation: bool = True) -> str:
        """The chat prompt with ``num_condition_tokens`` condition slots; for generation it ends in <boi>."""
        tokenizer = self._tokenizer()
        image, boi, eoi = tokenizer.image_token, tokenizer.boi_token, tokenizer.eoi_token
        text = self._chat(instruction, with_image=True)
        if text.count(image) != 1:
            raise ValueError(f"the chat template must place exactly one {image!r} in a one-image prompt; got: {text!r}")
        return text.replace(image, boi + image * num_condition_tokens + eoi) + (boi if generation else "")

    def prepare(self, condition_images, target_images, instructions, *, dropped=None) -> dict[str, torch.Tensor]:
        tokenizer = self._tokenizer()
        resolution = view_size(condition_images[0])[0]
        num_slots = self.num_condition_tokens(resolution)
        texts = [self.format_prompt(instruction, num_slots) for instruction in instructions]
        encoded = tokenizer(texts, padding="longest", padding_side="left", return_tensors="pt")
        input_ids = encoded["input_ids"]
        condition_mask = input_ids == tokenizer.convert_tokens_to_ids(tokenizer.image_token)
        counts = condition_mask.sum(-1)
        if not bool((counts == num_slots).all()):
            raise ValueError(
                f"the tokenizer turned the prompt into {counts.tolist()} image slots, expected {num_slots} each: "
                f"{tokenizer.image_token!r} must be a single special token"
            )
        mean, std = self._pixel_stats()
        batch = {
            "input_ids": input_ids,
            "attention_mask": encoded["attention_mask"],
            "condition_mask": condition_mask,
            "condition_pixel_values": to_tensor(condition_images, mean, std),
        }
        if target_images is not None:
            batch["target_pixel_values"] = to_tensor(target_images, _VQ_MEAN, _VQ_STD)
        return batch

    def prepare_image_to_text(self, images, questions, answers) -> dict[str, Any]:
        tokenizer = self._tokenizer()
        num_slots = self.num_condition_tokens(view_size(images[0])[0])
        prompts = [self.format_prompt(question, num_slots, generation=False) for question in questions]
        input_ids, attention_mask, labels = answer_batch(tokenizer, prompts, answers)
        mean, std = self._pixel_stats()
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "answer_length": answer_length(labels),
            "condition_mask": input_ids == tokenizer.convert_tokens_to_ids(tokenizer.image_token),
            "condition_pixel_values": to_tensor(images, mean, std),
        }

    def prepare_text_to_image(self, captions, target_images, *, dropped=None) -> dict[str, torch.Tensor]:
        tokenizer = self._tokenizer()
        texts = [self._chat(caption, with_image=False) + tokenizer.boi_token for caption in captions]
        encoded = tokenizer(texts, padding="longest", padding_side="left", return_tensors="pt")
        return {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "target_pixel_values": to_tensor(target_images, _VQ_MEAN, _VQ_STD),
        }

    # ---- model face --------------------------------------------------------------------------

    def _condition_embeddings(self, janus, batch) -> torch.Tensor:
        """Prompt embeddings with the understanding features scattered into the condition slots (if any)."""
        if "condition_pixel_values" not in batch:  # text-to-image: the caption is the only condition
            return janus.model.language_model.get_input_embeddings()(batch["input_ids"])
        features = batch.get(cached_key("condition_features"))
        if features is None:
            features = self.understanding_features(janus, batch["condition_pixel_values"])
        embeddings = janus.model.language_model.get_input_embeddings()(batch["input_ids"])
        mask = batch["condition_mask"].to(embeddings.device)
        message = (
            "{found} condition slots in the prompt but {expected} understanding features: the collator's "
            "condition_resolution and the batch disagree"
        )
        expected = features.shape[0] * features.shape[1]
        check_once(self.checked_layouts, ("condition", *features.shape[1:]),
                   slot_count_problem(mask, expected, message))  # fmt: skip
        return embeddings.masked_scatter(mask.unsqueeze(-1), features.to(embeddings.dtype))

    def understanding_features(self, janus, pixels: torch.Tensor) -> torch.Tensor:
        """SigLIP + aligner features of condition pixels ``(B, slots, width)``."""
        native = pixels.shape[-1] == self.min_condition_resolution
        return janus.model.get_image_features(
            pixel_values=pixels.to(janus.model.vision_model.dtype), interpolate_pos_encoding=not native
        ).pooler_output

    def frozen_features(self, model, batch, names=None) -> dict[str, torch.Tensor]:
        janus = unwrap_model(model)
        names = tuple(self.frozen_feature_sources) if names is None else names
        features = {}
        if "condition_features" in names:
            features["condition_features"] = self.understanding_features(janus, batch["condition_pixel_values"])
        if "target_codes" in names:
            features["target_codes"] = self.target_codes(janus, batch["target_pixel_values"])
        return features

    @torch.no_grad()
    def target_codes(self, janus, target_pixel_values: torch.Tensor) -> torch.Tensor:
        vq = janus.model.vqmodel
        codes = vq.encode(target_pixel_values.to(vq.dtype)).image_tokens
        return codes.view(target_pixel_values.shape[0], -1)

    @property
    def codebook_size(self) -> int:
        return int(self.config.vq_config.num_embeddings)

    def loss(
        self, model, batch: dict[str, Any], *, reduction: str = "mean", noise: LossNoise | None = None
    ) -> torch.Tensor:
        """Cross-entropy of the teacher-forced VQ codes. Deterministic: ``noise`` has nothing to fix."""
        logits, codes = self.target_logits(model, batch)
        if reduction == "none":
            return per_sample_cross_entropy(logits, codes)
        return reduce_loss(F.cross_entropy(logits.float().flatten(0, 1), codes.flatten()), reduction)

    def text_to_image_loss(self, model, batch, *, reduction: str = "mean", noise: LossNoise | None = None):
        return self.loss(model, batch, reduction=reduction, noise=noise)

    def image_to_text_loss(self, model, batch: dict[str, Any]) -> torch.Tensor:
        janus = unwrap_model(model)
        embeddings = self._condition_embeddings(janus, batch)
        attention_mask = batch["attention_mask"]
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        # Through JanusModel.forward, the text path (understanding_entry): a "generation+llm" LoRA is off there,
        # as it is when the saved adapter reads an image.
        hidden = janus.model(
            inputs_embeds=embeddings, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state
        return answer_loss(hidden, batch["labels"], janus.lm_head, batch.get("answer_length"))

    def target_logits(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        janus = unwrap_model(model)
        codes = batch.get(cached_key("target_codes"))
        if codes is None:
            codes = self.target_codes(janus, batch["target_pixel_values"])
        prompt = self._condition_embeddings(janus, batch)
        teacher = janus.prepare_embeddings_for_image_generation(codes[:, :-1]).to(prompt.dtype)
        embeddings = torch.cat([prompt, teacher], dim=1)
        attention_mask = torch.cat([batch["attention_mask"], torch.ones_like(codes[:, :-1])], dim=1)
        # Prompts are left-padded, so positions must skip the padding explicitly.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        hidden = janus.model.language_model(
            inputs_embeds=embeddings, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state
        # The hidden state at the prompt's last token (<boi>) predicts the first code, and so on.
        return janus.model.generation_head(hidden[:, prompt.shape[1] - 1 :]), codes

    @torch.no_grad()
    def round_trip(self, images, *, model=None, views: ViewSpec | None = None) -> list[Image.Image]:
        janus = unwrap_model(self._bound_model(model))
        views = views or self.default_views()
        targets = to_tensor([views.target_view(load_image(image)) for image in images], _VQ_MEAN, _VQ_STD)
        codes = self.target_codes(janus, targets.to(janus.device))
        return to_pil(janus.decode_image_tokens(codes), _VQ_MEAN, _VQ_STD)

    def sample_codes(self, janus, conditions, instructions, views, guidance, do_sample, temperature, generator):
        """Sample VQ codes conditioned on the understanding embeddings of the condition views (with CFG).

        The unconditional branch of classifier-free guidance is Janus' own: every prompt token except
        <bos> and <boi> becomes padding, and no condition features are inserted.
        """
        batch = self.prepare(conditions, None, instructions)
        return self._sample(janus, batch, guidance, do_sample, temperature, generator)

    def sample_text_codes(
        self, janus, prompts, resolution, guidance, generator, *, do_sample: bool = True, temperature: float = 1.0
    ):
        """Janus' own text-to-image: the caption as a user turn, generation from ``<boi>``, CFG against the
        prompt with every token but ``<bos>`` and ``<boi>`` padded (what ``generate(generation_mode="image")``
        does)."""
        tokenizer = self._tokenizer()
        texts = [self._chat(prompt, with_image=False) + tokenizer.boi_token for prompt in prompts]
        encoded = tokenizer(texts, padding="longest", padding_side="left", return_tensors="pt")
        batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        return self._sample(janus, batch, guidance, do_sample, temperature, generator)

    def _sample(self, janus, batch, guidance, do_sample, temperature, generator) -> torch.Tensor:
        """KV-cached sampling of the VQ codes after a prompt batch (with or without condition features)."""
        device = janus.device
        batch = {k: v.to(device) for k, v in batch.items()}
        embeddings = self._condition_embeddings(janus, batch)
        attention_mask = batch["attention_mask"]
        if guidance != 1.0:
            tokenizer = self._tokenizer()
            keep = torch.isin(
                batch["input_ids"],
                torch.tensor(
                    [tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids(tokenizer.boi_token)],
                    device=device,
                ),
            )
            unconditional = batch["input_ids"].masked_fill(~keep, tokenizer.pad_token_id)
            embeddings = torch.cat([embeddings, janus.model.language_model.get_input_embeddings()(unconditional)])
            attention_mask = torch.cat([attention_mask, attention_mask])
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)

        codes = []
        cache = None
        step_input = embeddings
        for _ in range(self.num_target_tokens):
            out = janus.model.language_model(
                inputs_embeds=step_input,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
            )
            cache = out.cache
            logits = janus.model.generation_head(out.last_hidden_state[:, -1])
            token = next_code(logits, guidance, do_sample, temperature, generator)
            codes.append(token)
            token = torch.cat([token, token]) if guidance != 1.0 else token
            step_input = janus.prepare_embeddings_for_image_generation(token[:, None]).to(embeddings.dtype)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
            position_ids = position_ids[:, -1:] + 1
        return torch.stack(codes, dim=1)

    def decode_codes(self, janus, codes: torch.Tensor) -> list[Image.Image]:
        return to_pil(janus.decode_image_tokens(codes), _VQ_MEAN, _VQ_STD)
