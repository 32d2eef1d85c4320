"""Show-o (`reca_hf.models.showo.ShowoModel`): one Phi reads and writes MAGVIT-v2 codes; masked-token generation.

Sequence of one RecA example in the VQ variant, the authors' (``t2i_recon_prompt``; ``N`` target codes)::

    [PAD]... <|mmu|> <|soi|> [condition codes] <|eoi|> <bos> USER: \\n {instruction} ASSISTANT: <eos>
    <|soi|> [target codes, round(N cos(pi t / 2)) of them masked] <|eoi|>  -> Phi, omni-attention -> CE at the masks

The condition block sees itself and ``<|mmu|>``, the target block sees every token after the pads
(`reca_hf.models.showo.prompting`). The loss is the cross-entropy at the masked codes on the unshifted logits of the
target block, a mean over the batch's masked codes (the authors'). Condition and target are both MAGVIT-v2 codes
(``condition_relation = "same"``): a 512-px condition for a 512-px target carries every target code, so the condition
is made the authors' way, the target tensor bilinear-resized to half the side (512 -> 256), or blurred
(``condition_bottleneck: blur``, ``blur_factor: 8``: 512 -> 64 -> 512), and reca_hf refuses a copyable one.

The CLIP variant (`ShowoClipAdapter`) reads the condition through CLIP ViT-L/14-336 and the projector instead
(``t2i_clip_recon_prompt``): ``<|mmu|> <|soi|> [CLIP features] <|eoi|> <bos> text <eos> [PAD]... <|soi|> target
<|eoi|>``; condition and target live in different spaces (``"separate"``).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from ...adapters.base import UMMAdapter
from ...adapters.helpers import IGNORE_INDEX, cached_key, unwrap_model
from ...adapters.registry import register_adapter
from ...adapters.targets import GenerationTarget, LossNoise
from ...images import ViewSpec, load_image, to_pil, to_tensor, view_size
from . import prompting as P

_VQ_MEAN = _VQ_STD = (0.5, 0.5, 0.5)  # MAGVIT-v2 reads pixels in [-1, 1]
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIPImageProcessor's (the understanding data path)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The authors' LLaVA system prompt of the CLIP variant's image-to-text rows (28 Phi tokens).
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def _build_tiny_showo(seed: int = 0):
    from .tiny import build_tiny_showo

    return build_tiny_showo(seed)


def _build_tiny_showo_clip(seed: int = 0):
    from .tiny import build_tiny_showo_clip

    return build_tiny_showo_clip(seed)


@register_adapter(tiny=_build_tiny_showo)
class ShowoAdapter(UMMAdapter):
    """Show-o's VQ variant; built for a CLIP-variant config (``w_clip_vit``), it is a :class:`ShowoClipAdapter`."""

    name = "showo"
    model_types = ("showo",)
    model_class = "reca_hf.models.showo.ShowoModel"
    condition_space = "magvitv2"
    generation_space = "magvitv2"
    condition_relation = "same"
    generation_target = GenerationTarget("masked_tokens")
    min_condition_resolution = 512  # Show-o-512 understands its own 512-px codes
    native_generation_resolution = 512
    parameter_sharing = "shared"
    understanding_modules = ()
    generation_modules = ()  # one Phi, one vocabulary: codes are rows of its embedding table and head
    shared_modules = ("showo",)
    tokenizer_modules = ("vq_model",)
    default_freeze = ("vq_model",)
    frozen_feature_sources = {"condition_codes": ("vq_model",), "target_codes": ("vq_model",)}
    null_prompt = ""
    default_cond_dropout_prob = 0.0  # the authors' recon prompt is never dropped
    target_fit = "stretch"  # the authors stretch every image to the square
    condition_fit = "stretch"
    condition_source = "target"  # the authors resize the [-1, 1] target tensor (512 -> 256), bilinear, no antialias
    condition_interpolation = "bilinear"
    lora_llm_targets = (
        r"showo\.model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|dense)",
        r"showo\.model\.layers\.\d+\.mlp\.fc[12]",
    )
    # No understanding_entry: one Phi forward reads and writes images, so LoRA cannot be scoped to generation.
    default_instruction = "Reconstruct this image."
    default_guidance_scale = 1.0  # the authors' reconstruction has no guidance
    text_to_image_guidance_scale = 6.0  # Show-o's guidance_scale 5 in its (1 + s) cond - s uncond convention
    # The authors' text around the instruction (``t2i_recon_prompt``) and the image-to-text rows (phi1.5 template).
    recon_template = "USER: \n {instruction} ASSISTANT:"
    understanding_template = "USER: {question} ASSISTANT:"
    # The VQ script draws one instruction per batch (``random.choice`` then ``* B``); False: one per row.
    one_instruction_per_batch = True
    maskgit_steps = 12  # the authors' ``generation_timesteps`` in their RecA configs
    _clip = False  # which variant's config the class takes (``w_clip_vit``)

    def __new__(cls, config=None, *args, **kwargs):
        if cls is ShowoAdapter and getattr(config, "w_clip_vit", False):
            cls = ShowoClipAdapter  # one model_type for both variants: the config says which
        return super().__new__(cls)

    def __init__(self, config, processor=None, model=None):
        if bool(getattr(config, "w_clip_vit", False)) != self._clip:
            want = "ShowoClipAdapter (adapter: showo_clip)" if not self._clip else "ShowoAdapter (adapter: showo)"
            raise ValueError(
                f"the {self.name} adapter is for Show-o's {'CLIP' if self._clip else 'VQ'} variant, but this config "
                f"has w_clip_vit={getattr(config, 'w_clip_vit', None)!r}: use {want}, or leave adapter unset."
            )
        super().__init__(config, processor, model)

    # Where a converted release (``reca convert showo``: weights and config, no tokenizer) takes its text tokenizer:
    # Phi-1.5's, with Show-o's special tokens added as the authors' prompting adds them.
    text_tokenizer_source = "microsoft/phi-1_5"

    @classmethod
    def load(cls, name_or_path: str, dtype: str = "float32", **kwargs):
        """The `ShowoModel` folder, and its tokenizer: the folder's own (a folder reca_hf saved), else
        :attr:`text_tokenizer_source`'s with Show-o's special tokens added (a converted release)."""
        from transformers import AutoTokenizer

        from .modeling_showo import ShowoModel
        from .tiny import add_showo_tokens

        revision, attention = kwargs.get("revision"), kwargs.get("attn_implementation")
        extra = {"attn_implementation": attention} if attention is not None else {}
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        model = ShowoModel.from_pretrained(name_or_path, dtype=torch_dtype, revision=revision, **extra)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
        except (OSError, ValueError, KeyError):
            tokenizer = add_showo_tokens(AutoTokenizer.from_pretrained(cls.text_tokenizer_source))
        expected = model.config.llm_vocab_size + model.config.num_new_special_tokens
        if len(tokenizer) != expected:
            raise ValueError(
                f"{name_or_path}: the tokenizer has {len(tokenizer)} tokens, but the model's config expects "
                f"{expected} (llm_vocab_size {model.config.llm_vocab_size} + {model.config.num_new_special_tokens} "
                f"special tokens); save the tokenizer Show-o was trained with into the folder, or set "
                f"{cls.__name__}.text_tokenizer_source to its text tokenizer."
            )
        return model, tokenizer

    # ---- what this model's config says ----

    @property
    def stride(self) -> int:
        return int(self.config.vq_config.stride)

    @property
    def codebook_size(self) -> int:
        return int(self.config.codebook_size)

    def config_min_condition_resolution(self) -> int:
        return int(self.config.image_size)

    def config_native_generation_resolution(self) -> int:
        return int(self.config.image_size)

    def round_condition_resolution(self, resolution: int) -> int:
        return max(self.stride, resolution - resolution % self.stride)

    def condition_resolution_errors(self, resolution: int) -> list[str]:
        if resolution < self.stride or resolution % self.stride:
            return [
                f"MAGVIT-v2 turns every {self.stride}x{self.stride}-px patch into one code: use a positive multiple "
                f"of {self.stride} (the authors read a 512-px target's condition at 256 px)."
            ]
        return []

    def generation_resolution_errors(self, resolution: int) -> list[str]:
        if resolution != self.config.image_size:
            return [
                f"this Show-o generates {self.config.num_vq_tokens} codes, a {self.config.image_size}-px image "
                f"(num_vq_tokens); use {self.config.image_size} or 'auto'."
            ]
        return []

    # ---- CPU face ----

    def _text_ids(self, text: str) -> list[int]:
        return self.text_tokenizer()(text, add_special_tokens=False)["input_ids"]

    def _instructions(self, instructions: list[str | None], dropped: list[bool] | None) -> list[str]:
        """The rows' instructions; with :attr:`one_instruction_per_batch`, every kept row takes the first kept one."""
        dropped = dropped or [False] * len(instructions)
        texts = [instruction or "" for instruction in instructions]
        kept = [text for text, drop in zip(texts, dropped) if not drop]
        if self.one_instruction_per_batch and kept:
            texts = [text if drop else kept[0] for text, drop in zip(texts, dropped)]
        return texts

    def _padded_text(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """``input_ids``: each row's text (the instruction in :attr:`recon_template`), right-padded with -1 (not a
        token), and ``text_lengths``; the model face builds the sequence around them."""
        ids = [self._text_ids(self.recon_template.format(instruction=text)) for text in texts]
        width = max(len(row) for row in ids)
        padded = torch.full((len(ids), width), -1, dtype=torch.long)
        for row, sequence in enumerate(ids):
            padded[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        return {"input_ids": padded, "text_lengths": torch.tensor([len(row) for row in ids])}

    def _check_size(self, images: list, role: str) -> None:
        sizes = {view_size(image) for image in images}
        if len(sizes) != 1:
            raise ValueError(f"the {role} images of a batch must share one size, got {sorted(sizes)}")
        width, height = sizes.pop()
        check = self.condition_resolution_errors if role == "condition" else self.generation_resolution_errors
        errors = check(width) or check(height) or ([] if width == height else ["Show-o's images are square"])
        if errors:
            raise ValueError(f"{role} images of {width}x{height} px: {errors[0]}")

    def condition_pixels(self, condition_images: list) -> torch.Tensor:
        """The condition views as the understanding path reads them: [-1, 1] pixels for MAGVIT-v2."""
        self._check_size(condition_images, "condition")
        return to_tensor(condition_images, _VQ_MEAN, _VQ_STD)

    def prepare(self, condition_images, target_images, instructions, *, dropped=None) -> dict[str, torch.Tensor]:
        """Condition and target pixels (``[-1, 1]``) and the instruction's text ids; the model face encodes the
        images and builds the sequence (codes need the model)."""
        batch = {"condition_pixel_values": self.condition_pixels(condition_images)}
        if target_images is not None:
            self._check_size(target_images, "target")
            batch["target_pixel_values"] = to_tensor(target_images, _VQ_MEAN, _VQ_STD)
        batch.update(self._padded_text(self._instructions(instructions, dropped)))
        return batch

    def prepare_image_to_text(self, images, questions, answers) -> dict[str, torch.Tensor]:
        """The authors' LLaVA rows (phi1.5 template): ``USER: {question} ASSISTANT: {answer}<|endoftext|>``,
        right-padded, labels on the answer and its end token."""
        tokenizer = self.text_tokenizer()
        rows, labels = [], []
        for question, answer in zip(questions, answers):
            prompt = self._text_ids(self.understanding_template.format(question=question.strip()))
            reply = self._text_ids(" " + answer.strip()) + [tokenizer.eos_token_id]
            rows.append(prompt + reply)
            labels.append([IGNORE_INDEX] * len(prompt) + reply)
        width = max(len(row) for row in rows)
        pad = self.config.special_token_id("[PAD]")
        input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
        label_ids = torch.tensor([row + [IGNORE_INDEX] * (width - len(row)) for row in labels])
        return {
            "condition_pixel_values": self.understanding_pixels(images),
            "input_ids": input_ids,
            "labels": label_ids,
        }

    def understanding_pixels(self, images: list) -> torch.Tensor:
        """Image-to-text pixels: [-1, 1] at the model's resolution (the authors resize LLaVA images to it)."""
        return to_tensor(images, _VQ_MEAN, _VQ_STD)

    # ---- model face ----

    def frozen_features(self, model, batch, names=None) -> dict[str, torch.Tensor]:
        showo = unwrap_model(model)
        names = tuple(self.frozen_feature_sources) if names is None else names
        views = {"condition_codes": "condition_pixel_values", "target_codes": "target_pixel_values"}
        return {name: self._codes(showo, batch[views[name]]) for name in names}

    @staticmethod
    def _codes(showo, pixel_values: torch.Tensor) -> torch.Tensor:
        """MAGVIT-v2 codes ``(B, N)`` (not offset)."""
        return showo.image_ids(pixel_values.to(showo.device)) - showo.config.code_offset

    def _batch_codes(self, showo, batch: dict[str, Any], name: str, view: str) -> torch.Tensor:
        codes = batch.get(cached_key(name))
        return self._codes(showo, batch[view]) if codes is None else codes.to(showo.device)

    @staticmethod
    def _texts(batch: dict[str, Any]) -> list[list[int]]:
        lengths = batch["text_lengths"].tolist()
        return [row[:length] for row, length in zip(batch["input_ids"].tolist(), lengths)]

    def _draws(self, showo, target: torch.Tensor, noise: LossNoise | None):
        """The masked target, its labels (LLM ids), from fresh draws or from ``noise`` (``timesteps`` are the
        authors' ``t``; ``mask_ratio`` fixes the masked share, ``t = 2 arccos(ratio) / pi``)."""
        config = showo.config
        generator, timesteps = None, None
        if noise is not None:
            generator = noise.generator(target.device)
            timesteps = noise.levels(target.shape[0], target.device)
            if noise.mask_ratio is not None:
                t = 2.0 * math.acos(noise.mask_ratio) / math.pi
                timesteps = torch.full((target.shape[0],), t, device=target.device)
        ids, labels, _ = P.mask_image_tokens(
            target + config.code_offset, config.mask_token_id, generator=generator, timesteps=timesteps
        )
        return ids, labels

    def _recon_sequence(self, config, texts: list[list[int]], condition, target_ids, target_labels):
        """``recon_inputs``; where a text exceeds ``max_seq_length`` (the authors grow that row) every row is
        padded to the longest, so the batch keeps one length."""
        longest = max(len(text) + 2 for text in texts)  # <bos>, <eos>
        if longest > config.max_seq_length:
            config = copy.copy(config)
            config.max_seq_length = longest
        return P.recon_inputs(config, texts, condition, target_ids, target_labels)

    def _sequence(self, showo, batch, target_ids, target_labels):
        """``(inputs, attention_mask, labels)`` of the recon rows: ``inputs`` a dict of ``input_ids`` (VQ)."""
        condition = self._batch_codes(showo, batch, "condition_codes", "condition_pixel_values")
        input_ids, labels = self._recon_sequence(
            showo.config, self._texts(batch), condition + showo.config.code_offset, target_ids, target_labels
        )
        return {"input_ids": input_ids}, P.recon_attention_mask(showo.config, input_ids), labels

    @staticmethod
    def _tail_logits(showo, inputs: dict, mask: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, N + 1, V)`` of the target block and its ``<|eoi|>`` (each code's own position: unshifted)."""
        return showo(**inputs, attention_mask=mask, logits_to_keep=showo.config.num_vq_tokens + 1).logits

    def loss(
        self, model, batch: dict[str, Any], *, reduction: str = "mean", noise: LossNoise | None = None
    ) -> torch.Tensor:
        """The authors' masked-token CE at the masked target codes (``"mean"``: over every masked code of the batch).

        ``reduction="none"``: each row's summed CE over the batch's mean count of masked codes, so the rows average
        to the ``"mean"`` loss; under ``noise`` with fixed ``timesteps`` or ``mask_ratio`` every row masks as many
        codes and each value is that row's own mean.
        """
        showo = unwrap_model(model)
        target = self._batch_codes(showo, batch, "target_codes", "target_pixel_values")
        target_ids, target_labels = self._draws(showo, target, noise)
        inputs, mask, labels = self._sequence(showo, batch, target_ids, target_labels)
        logits = self._tail_logits(showo, inputs, mask)
        labels = labels.to(logits.device)
        if reduction == "mean":
            return P.recon_loss(logits, labels, showo.config.num_vq_tokens)
        if reduction != "none":
            raise ValueError(f"reduction={reduction!r}: choose 'mean' or 'none'")
        labels = labels[:, -1 - showo.config.num_vq_tokens : -1]
        per_token = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
        )
        counted = (labels != IGNORE_INDEX).sum()
        return per_token.sum(1) * labels.shape[0] / counted.clamp(min=1)

    def image_to_text_loss(self, model, batch: dict[str, Any]) -> torch.Tensor:
        """The authors' image-to-text CE through Phi's head: ``<|mmu|> <|soi|> image <|eoi|> text``, shifted."""
        showo = unwrap_model(model)
        image = showo.image_ids(batch["condition_pixel_values"].to(showo.device))
        input_ids, labels = P.mmu_inputs(showo.config, image, batch["input_ids"], batch["labels"])
        logits = showo(input_ids, P.mmu_attention_mask(showo.config, input_ids)).logits
        return P.mmu_loss(logits, labels)

    def target_logits(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits over the codebook at an **all-masked** target ``(B, N, codebook)`` and the target's codes.

        A masked model has no teacher forcing: with every target code masked the prediction at each slot comes
        from the condition and the instruction alone, so the swap probe's ``swap_copy_rate`` says how far the
        prediction follows a swapped-in condition, ``own_accuracy`` is the one-step reconstruction accuracy from
        the own condition, and ``swap_target_rate`` (predicting from the target's own tokens) is chance by design.
        """
        showo = unwrap_model(model)
        config = showo.config
        target = self._batch_codes(showo, batch, "target_codes", "target_pixel_values")
        masked = torch.full_like(target, config.mask_token_id)
        inputs, mask, _ = self._sequence(showo, batch, masked, torch.full_like(target, IGNORE_INDEX))
        logits = self._tail_logits(showo, inputs, mask)[:, :-1]
        return logits[..., config.code_offset : config.code_offset + config.codebook_size], target

    @torch.no_grad()
    def round_trip(self, images, *, model=None, views: ViewSpec | None = None) -> list[Image.Image]:
        showo = unwrap_model(self._bound_model(model))
        views = views or self.default_views()
        targets = to_tensor([views.target_view(load_image(image)) for image in images], _VQ_MEAN, _VQ_STD)
        return self.decode_codes(showo, self._codes(showo, targets))

    def decode_codes(self, showo, codes: torch.Tensor) -> list[Image.Image]:
        return to_pil(showo.decode_image_ids(codes).clamp(-1, 1), _VQ_MEAN, _VQ_STD)

    def _maskgit(self, showo, input_ids, mask, uncond, guidance, temperature, generator):
        scale = guidance - 1.0  # reca_hf's w (uncond + w (cond - uncond)) as Show-o's s ((1 + s) cond - s uncond)
        return showo.t2i_generate(
            input_ids,
            mask,
            uncond if guidance != 1.0 else None,
            guidance_scale=scale,
            timesteps=self.maskgit_steps,
            temperature=temperature,
            generator=generator,
        )

    def sample_codes(self, showo, conditions, instructions, views, guidance, do_sample, temperature, generator):
        """MaskGIT (the authors' sampler, :attr:`maskgit_steps` steps) over an all-masked target in the recon
        sequence, conditioned on the condition's codes. With ``guidance != 1`` the unconditional rows have the empty
        instruction and an all-masked condition. ``do_sample=False`` samples at temperature 0 (confidence alone
        picks what stays masked; each slot is still drawn from its softmax, as the authors)."""
        batch = self.prepare(conditions, None, instructions)
        batch = {key: value.to(showo.device) for key, value in batch.items()}
        config = showo.config
        condition = self._codes(showo, batch["condition_pixel_values"]) + config.code_offset
        n = config.num_vq_tokens
        masked = torch.full((len(conditions), n), config.mask_token_id, device=showo.device)
        texts = self._texts(batch)
        uncond_texts = self._texts(self._padded_text([self.null_prompt] * len(conditions)))
        budget = max(len(text) + 2 for text in texts + uncond_texts)
        config = copy.copy(config)
        config.max_seq_length = max(config.max_seq_length, budget)
        input_ids, _ = P.recon_inputs(config, texts, condition, masked, masked)
        uncond = None
        if guidance != 1.0:
            uncond, _ = P.recon_inputs(config, uncond_texts, torch.full_like(condition, config.mask_token_id),
                                       masked, masked)  # fmt: skip
            mask = P.recon_attention_mask(config, torch.cat([input_ids, uncond]))
        else:
            mask = P.recon_attention_mask(config, input_ids)
        temperature = temperature if do_sample else 0.0
        return self._maskgit(showo, input_ids, mask, uncond, guidance, temperature, generator)

    def sample_text_codes(
        self, showo, prompts, resolution, guidance, generator, *, temperature: float = 1.0, do_sample: bool = True
    ) -> torch.Tensor:
        """Show-o's text-to-image: ``t2i_inputs`` with an all-masked image, MaskGIT with CFG against the empty
        prompt (the authors')."""
        config = showo.config
        n = config.num_vq_tokens
        masked = torch.full((len(prompts), n), config.mask_token_id, device=showo.device)
        input_ids = P.t2i_inputs(config, [self._text_ids(prompt) for prompt in prompts], masked)
        uncond = P.t2i_inputs(config, [[]] * len(prompts), masked) if guidance != 1.0 else None
        rows = input_ids if uncond is None else torch.cat([input_ids, uncond])
        mask = P.t2i_attention_mask(config, rows)
        temperature = temperature if do_sample else 0.0
        return self._maskgit(showo, input_ids, mask, uncond, guidance, temperature, generator)


@register_adapter(tiny=_build_tiny_showo_clip)
class ShowoClipAdapter(ShowoAdapter):
    """Show-o's CLIP variant: the condition through CLIP ViT-L/14-336 and the projector, the target MAGVIT-v2 codes."""

    name = "showo_clip"
    model_types = ("showo",)  # the same model_type: ShowoAdapter dispatches here on ``w_clip_vit``
    condition_space = "clip"
    condition_relation = "separate"
    min_condition_resolution = 336
    understanding_modules = ("vision_tower",)
    shared_modules = ("showo", "mm_projector")  # the projector feeds both the recon condition and image-to-text
    tokenizer_modules = ("vq_model",)
    default_freeze = ("vq_model", "vision_tower")
    frozen_feature_sources = {"condition_features": ("vision_tower",), "target_codes": ("vq_model",)}
    # How the condition's pixels reach CLIP: "authors" feeds the [-1, 1] tensor (mean = std = 0.5) as their RecA
    # script does; "clip" uses CLIP's own mean and std, as their image-to-text data path (and CLIP's training) does.
    clip_condition_scaling = "authors"
    # The authors build the recon embeddings under torch.no_grad(): the recon loss then trains neither the
    # projector nor the embedding table. True lets it train both.
    recon_trains_embeddings = False
    one_instruction_per_batch = False  # the CLIP script draws one instruction per row
    _clip = True

    def config_min_condition_resolution(self) -> int:
        return int(self.config.vision_config.image_size)

    def condition_resolution_errors(self, resolution: int) -> list[str]:
        return [] if resolution > 0 else ["use a positive size (CLIP reads it resized to its own side)"]

    @property
    def understanding_resolution(self) -> int:
        return int(self.config.vision_config.image_size)

    def condition_pixels(self, condition_images: list) -> torch.Tensor:
        """The condition views scaled by :attr:`clip_condition_scaling`; a view of another size than CLIP's is
        resized to it, bilinear (the authors' resize of the target tensor; at the default 336 px, none)."""
        self._check_size(condition_images, "condition")
        if self.clip_condition_scaling not in ("authors", "clip"):
            raise ValueError(
                f"ShowoClipAdapter.clip_condition_scaling={self.clip_condition_scaling!r}: choose 'authors' ([-1, 1], "
                "their RecA script) or 'clip' (CLIP's mean and std)."
            )
        authors = self.clip_condition_scaling == "authors"
        pixels = to_tensor(condition_images, *((_VQ_MEAN, _VQ_STD) if authors else (_CLIP_MEAN, _CLIP_STD)))
        side = int(self.config.vision_config.image_size)
        if pixels.shape[-1] != side:
            pixels = F.interpolate(pixels, size=(side, side), mode="bilinear", align_corners=False)
        return pixels

    def understanding_pixels(self, images: list) -> torch.Tensor:
        """Image-to-text pixels as CLIPImageProcessor gives them (the authors' LLaVA path): CLIP's mean and std."""
        return to_tensor(images, _CLIP_MEAN, _CLIP_STD)

    def prepare_image_to_text(self, images, questions, answers) -> dict[str, torch.Tensor]:
        batch = super().prepare_image_to_text(images, questions, answers)
        batch["system_ids"] = torch.tensor([self._text_ids(SYSTEM_PROMPT)] * len(questions))
        return batch

    def frozen_features(self, model, batch, names=None) -> dict[str, torch.Tensor]:
        showo = unwrap_model(model)
        names = tuple(self.frozen_feature_sources) if names is None else names
        features = {}
        if "condition_features" in names:
            features["condition_features"] = showo.clip_features(batch["condition_pixel_values"].to(showo.device))
        if "target_codes" in names:
            features["target_codes"] = self._codes(showo, batch["target_pixel_values"])
        return features

    def _sequence(self, showo, batch, target_ids, target_labels):
        features = batch.get(cached_key("condition_features"))
        if features is None:
            features = showo.clip_features(batch["condition_pixel_values"].to(showo.device))
        input_ids, labels = P.clip_recon_inputs(showo.config, self._texts(batch), target_ids, target_labels)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.recon_trains_embeddings):
            embeds = showo.embed_with_features(input_ids, features.to(showo.device))
        mask = P.clip_recon_attention_mask(showo.config, input_ids, features.shape[1])
        return {"inputs_embeds": embeds}, mask, labels

    def image_to_text_loss(self, model, batch: dict[str, Any]) -> torch.Tensor:
        """The authors' ``llava_tuning`` rows: ``<|mmu|> system <|soi|> [CLIP features] <|eoi|> text``, shifted CE."""
        showo = unwrap_model(model)
        features = showo.clip_features(batch["condition_pixel_values"].to(showo.device))
        system = batch["system_ids"][0].tolist()
        input_ids, labels = P.clip_mmu_inputs(
            showo.config, batch["input_ids"].to(showo.device), batch["labels"], system
        )
        at = 2 + len(system)
        embeds = showo.embed_with_features(input_ids, features, at=at)
        slots = torch.full((labels.shape[0], features.shape[1]), IGNORE_INDEX, device=labels.device)
        labels = torch.cat([labels[:, :at], slots, labels[:, at:]], dim=1)
        mask = P.clip_mmu_attention_mask(embeds.shape[1], embeds.shape[0], features.shape[1], len(system))
        logits = showo(inputs_embeds=embeds, attention_mask=mask.to(embeds.device)).logits
        return P.mmu_loss(logits, labels)

    def sample_codes(self, showo, conditions, instructions, views, guidance, do_sample, temperature, generator):
        """MaskGIT over an all-masked target after the CLIP features of the condition (the authors ported only
        the VQ path of their sampler; this runs the same steps on the CLIP recon sequence). No guidance: the CLIP
        sequence has no unconditional layout of the same length."""
        if guidance != 1.0:
            raise ValueError(
                f"guidance_scale={guidance!r}: the Show-o CLIP adapter reconstructs without guidance; use 1.0."
            )
        batch = self.prepare(conditions, None, instructions)
        batch = {key: value.to(showo.device) for key, value in batch.items()}
        config = showo.config
        n = config.num_vq_tokens
        masked = torch.full((len(conditions), n), config.mask_token_id, device=showo.device)
        inputs, mask, _ = self._sequence(showo, batch, masked, masked)
        input_ids, _ = P.clip_recon_inputs(config, self._texts(batch), masked, masked)
        embeddings = showo.get_input_embeddings()
        features = inputs["inputs_embeds"][:, 2 : 2 + inputs["inputs_embeds"].shape[1] - input_ids.shape[1]]
        temperature = temperature if do_sample else 0.0
        return _clip_maskgit(showo, input_ids, features, mask, embeddings, self.maskgit_steps, temperature, generator)


@torch.no_grad()
def _clip_maskgit(showo, input_ids, projected, mask, embeddings, steps, temperature, generator) -> torch.Tensor:
    """The MaskGIT loop of `ShowoModel.t2i_generate` on a sequence whose projected CLIP features sit after
    position 1: each step re-embeds the ids and re-inserts ``projected``."""
    wrapper = _FeatureForward(showo, projected, embeddings)
    return type(showo).t2i_generate(wrapper, input_ids, mask, timesteps=steps, temperature=temperature,
                                    generator=generator)  # fmt: skip


class _FeatureForward:
    """Duck-types the parts of `ShowoModel` that ``t2i_generate`` calls, inserting fixed CLIP features."""

    def __init__(self, showo, projected: torch.Tensor, embeddings):
        self.config, self._showo, self._projected, self._embeddings = showo.config, showo, projected, embeddings

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        embeds = self._embeddings(input_ids)
        embeds = torch.cat([embeds[:, :2], self._projected.to(embeds.dtype), embeds[:, 2:]], dim=1)
        return self._showo(inputs_embeds=embeds, attention_mask=attention_mask)
