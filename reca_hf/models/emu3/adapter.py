"""Emu3 (`Emu3ForConditionalGeneration`): VQ ids in, VQ ids out, one vocabulary.

Sequence of one RecA example (the condition sits where an image sits for understanding; ``h x w`` and
``H x W`` are the condition's and the target's grids of VQ ids, ``<eol>`` is the row end ``<|extra_200|>``)::

    <bos> USER: <|image start|>{h}*{w}<|image token|> [condition: h rows of (w VQ ids, <eol>)] <|extra_201|>
    <|image end|>{instruction} ASSISTANT: <|image start|>{H}*{W}<|image token|>
    [target: H rows of (W VQ ids, <eol>), teacher-forced] -> lm_head -> CE

The framing (``USER: ... ASSISTANT:``) is the processor's chat template; without one, Emu3's own
understanding prompt. The condition block is exactly what Emu3's processor writes for an image, and the
generation prefix is what it writes for text-to-image. Image ids are ordinary vocabulary ids, so the loss is
Emu3's own causal-LM loss with labels on the target only: its VQ ids and row ends. The closing
``<|extra_201|><|image end|><eos>`` is left out of training: constrained decoding forces it, its loss
would only dilute the mean, and nothing after the last target token changes a causal model's predictions.

Condition and target live in the same space (one VQ, one embedding table): at the same resolution the
model could copy its condition, so the condition is read smaller (``"auto"``: half the target side at
most) or blurred.

The condition is made from the source image (``condition_source = "image"``): resized by PIL as Emu3's image
processor resizes a picture, which is what its understanding path was trained on. No RecA authors' code exists
for Emu3; ``condition_source="target"`` is a user's choice, not a parity fix.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from PIL import Image

from ...adapters.base import UMMAdapter
from ...adapters.helpers import (
    IGNORE_INDEX,
    answer_batch,
    answer_length,
    answer_loss,
    cached_key,
    eval_mode,
    next_code,
    unwrap_model,
)
from ...adapters.registry import register_adapter
from ...adapters.targets import GenerationTarget, LossNoise, per_sample_cross_entropy, reduce_loss
from ...images import AUTO, ViewSpec, load_image, to_pil, to_tensor, view_size
from ...slots import check_once, slot_count_problem
from .tiny import build_tiny_emu3

_VQ_MEAN = _VQ_STD = (0.5, 0.5, 0.5)  # Emu3's VQ reads pixels in [-1, 1] (used when there is no processor)
_IGNORE = IGNORE_INDEX


@register_adapter(tiny=build_tiny_emu3)
class Emu3Adapter(UMMAdapter):
    name = "emu3"
    model_types = ("emu3",)
    model_class = "Emu3ForConditionalGeneration"
    condition_space = "vq"
    condition_relation = "same"
    generation_target = GenerationTarget("autoregressive_tokens")
    generation_space = "vq"
    min_condition_resolution = 512  # Emu3's image processor enlarges understanding images to 512x512 pixels
    native_generation_resolution = 720  # Emu3's processor generates 720x720-pixel images (image_area)
    parameter_sharing = "shared"
    understanding_modules = ()
    # None: image-token rows live in the shared embedding table and lm_head, which both paths use.
    generation_modules = ()
    shared_modules = ("model.text_model", "lm_head")
    tokenizer_modules = ("model.vqmodel",)
    default_freeze = ("model.vqmodel",)
    frozen_feature_sources = {"condition_codes": ("model.vqmodel",), "target_codes": ("model.vqmodel",)}
    null_prompt = ""
    condition_fit = "pad"  # Emu3's processor keeps an image's aspect (no crop, no stretch): a square view pads
    condition_source = "image"  # its processor's resize is what the understanding path was trained with
    lora_llm_targets = (
        r"model\.text_model\.layers\.\d+\.self_attn\.[qkvo]_proj",
        r"model\.text_model\.layers\.\d+\.mlp\.(gate|up|down)_proj",
    )
    # No understanding_entry: Emu3 reads and writes images through one forward, so text-to-image generation
    # and image understanding cannot be told apart by module, and LoRA on the LLM cannot be scoped.
    default_guidance_scale = 3.0  # the classifier-free guidance of Emu3-Gen's published example
    negative_prompt = ""  # the unconditional branch's text (Emu3's examples use a list of defects)
    prompt_positions: ClassVar[int] = 128  # positions kept for the framing, instruction and image wrappers

    @classmethod
    def generation_snippet(cls, repo_id: str) -> str:
        """reca_hf's sampler: Emu3's constrained generation (every position a VQ id, row ends forced), with CFG."""
        return (
            super()
            .generation_snippet(repo_id)
            .replace(
                "images = adapter", "# constrained decoding: VQ ids only, a row end after each row\nimages = adapter", 1
            )
        )

    # ---- what this model's config says -------------------------------------------------------

    @property
    def spatial_factor(self) -> int:
        """Pixels per VQ id along each side."""
        return 2 ** (len(self.config.vq_config.channel_multiplier) - 1)

    @property
    def max_positions(self) -> int:
        return int(self.config.text_config.max_position_embeddings)

    @property
    def codebook_size(self) -> int:
        return int(self.config.vq_config.codebook_size)

    def config_min_condition_resolution(self) -> int:
        """The square side at which Emu3's image processor stops enlarging images (``min_pixels``)."""
        min_pixels = getattr(getattr(self.processor, "image_processor", None), "min_pixels", None)
        if min_pixels is None:
            return type(self).min_condition_resolution
        factor = self.spatial_factor
        return max(factor, math.ceil(math.sqrt(min_pixels) / factor) * factor)

    def config_native_generation_resolution(self) -> int:
        """The side of Emu3's square generation area: ``config.image_area`` (the original checkpoints' knob,
        saved with the config), else the processor's ``image_area``, rounded to whole VQ ids like Emu3 does."""
        area = getattr(self.config, "image_area", None) or getattr(self.processor, "image_area", None)
        if area is None:
            return type(self).native_generation_resolution
        factor = self.spatial_factor
        return max(1, round(math.sqrt(area) / factor)) * factor

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Rows and columns of VQ ids of a ``height`` x ``width`` image."""
        return height // self.spatial_factor, width // self.spatial_factor

    @staticmethod
    def num_slots(rows: int, cols: int) -> int:
        """Sequence positions of an image: every row of ids ends with a row-end token."""
        return rows * (cols + 1)

    def num_image_tokens(self, resolution: int) -> int:
        """Sequence positions of a square image at ``resolution`` (its ids and row ends)."""
        return self.num_slots(*self.grid(resolution, resolution))

    def round_condition_resolution(self, resolution: int) -> int:
        factor = self.spatial_factor
        return max(factor, resolution - resolution % factor)

    def _largest_fitting_condition(self, generation: int) -> int:
        """The largest condition resolution whose sequence fits the text model's positions (0 if none does)."""
        room = self.max_positions - self.prompt_positions - self.num_image_tokens(generation)
        side = 0
        while self.num_slots(side + 1, side + 1) <= room:
            side += 1
        return side * self.spatial_factor

    def auto_condition_resolution(self, generation: int) -> int:
        """Half the target side at most (base rule), and small enough that the whole sequence fits the positions
        the text model was trained for (Emu3-Gen at 720 px: 8190 target positions of 9216, so 232 px)."""
        fitting = self._largest_fitting_condition(generation)
        return min(super().auto_condition_resolution(generation), max(fitting, self.spatial_factor))

    def condition_resolution_errors(self, resolution: int) -> list[str]:
        factor = self.spatial_factor
        if resolution < factor or resolution % factor:
            return [
                f"Emu3's VQ turns every {factor}x{factor}-px patch into one token: use a positive multiple of "
                f"{factor} (Emu3 understands images from {self.min_condition_resolution} px; RecA reads the "
                "condition smaller on purpose)."
            ]
        return []

    def generation_resolution_errors(self, resolution: int) -> list[str]:
        factor = self.spatial_factor
        if resolution < factor or resolution % factor:
            return [
                f"Emu3's VQ decodes {factor}x{factor}-px patches: use a positive multiple of {factor} (Emu3 "
                f"generates at {self.native_generation_resolution} px)."
            ]
        tokens = self.num_image_tokens(resolution)
        if tokens + self.prompt_positions > self.max_positions:
            return [
                f"a {resolution}-px target is {tokens} tokens, which with a prompt exceeds the {self.max_positions} "
                f"positions of Emu3's text model (max_position_embeddings); Emu3 generates at "
                f"{self.native_generation_resolution} px."
            ]
        return []

    def resolve_resolutions(self, condition_resolution: int | str, generation_resolution: int | str):
        """The base checks, plus one on the whole sequence: condition, target and prompt share the positions."""
        condition, generation = super().resolve_resolutions(condition_resolution, generation_resolution)
        needed = self.num_image_tokens(condition) + self.num_image_tokens(generation) + self.prompt_positions
        if needed > self.max_positions:
            raise ValueError(
                f"condition_resolution={condition_resolution!r}, generation_resolution={generation_resolution!r}: "
                f"an Emu3 RecA sequence holds the condition ({self.num_image_tokens(condition)} tokens at "
                f"{condition} px), the target ({self.num_image_tokens(generation)} tokens at {generation} px) and "
                f"up to {self.prompt_positions} prompt tokens, {needed} positions in all, more than the "
                f"{self.max_positions} the text model was trained for (max_position_embeddings). Set "
                f"condition_resolution to at most {self._largest_fitting_condition(generation)} (or {AUTO!r}), "
                "or lower generation_resolution."
            )
        return condition, generation

    # ---- CPU face ----------------------------------------------------------------------------

    def _tokenizer(self):
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("the Emu3 adapter needs the model's processor: pass processing_class=Emu3Processor(...)")
        return tokenizer

    def _pixel_stats(self):
        """The image processor's normalisation, which is what Emu3's VQ reads in understanding."""
        image_processor = getattr(self.processor, "image_processor", None)
        mean = getattr(image_processor, "image_mean", None)
        std = getattr(image_processor, "image_std", None)
        return (mean, std) if mean is not None and std is not None else (_VQ_MEAN, _VQ_STD)

    def _image_prefix(self, rows: int, cols: int) -> str:
        """What Emu3 writes before an image's ids: start marker, size text, image-token wrapper."""
        tokenizer = self._tokenizer()
        return f"{tokenizer.boi_token}{rows}*{cols}{tokenizer.image_wrapper_token}"

    def _image_block(self, rows: int, cols: int) -> str:
        """An image as Emu3's processor lays it out for understanding, with one slot per id and row end."""
        tokenizer = self._tokenizer()
        slots = tokenizer.image_token * self.num_slots(rows, cols)
        return f"{self._image_prefix(rows, cols)}{slots}{tokenizer.eof_token}{tokenizer.eoi_token}"

    def _with_bos(self, text: str) -> str:
        bos = self._tokenizer().bos_token  # Emu3's processor writes it; its tokenizer does not add it
        return text if bos is None or text.startswith(bos) else bos + text

    def format_prompt(
        self, instruction: str | None, condition_grid: tuple[int, int], target_grid: tuple[int, int]
    ) -> str:
        """The understanding prompt with the condition's slots, ending in the generation prefix of the target."""
        return self.understanding_prompt(instruction, condition_grid) + self._image_prefix(*target_grid)

    def understanding_prompt(self, instruction: str | None, condition_grid: tuple[int, int]) -> str:
        """The understanding prompt with an image's slots (and ``instruction``, unless None), ready for the
        assistant's answer."""
        tokenizer = self._tokenizer()
        image = tokenizer.image_token
        text_part = [] if instruction is None else [{"type": "text", "text": instruction}]
        conversation = [{"role": "user", "content": [{"type": "image"}, *text_part]}]
        if getattr(self.processor, "chat_template", None):
            text = self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        else:  # Emu3's own understanding prompt
            text = f"You are a helpful assistant. USER: {image}{instruction or ''} ASSISTANT:"
        if text.count(image) != 1:
            raise ValueError(f"the chat template must place exactly one {image!r} in a one-image prompt; got: {text!r}")
        return self._with_bos(text.replace(image, self._image_block(*condition_grid)))

    def unconditional_prompt(self, target_grid: tuple[int, int]) -> str:
        """Emu3's text-to-image input for the negative prompt: the unconditional branch of guidance."""
        return self._with_bos(self.negative_prompt) + self._image_prefix(*target_grid)

    def _tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = self._tokenizer()(
            texts, padding="longest", padding_side="left", add_special_tokens=False, return_tensors="pt"
        )
        return encoded["input_ids"], encoded["attention_mask"]

    def _grid_of(self, images: list, role: str) -> tuple[int, int]:
        sizes = {view_size(image) for image in images}
        if len(sizes) != 1:
            raise ValueError(f"the {role} images of a batch must share one size, got {sorted(sizes)}")
        width, height = sizes.pop()
        check = self.condition_resolution_errors if role == "condition" else self.generation_resolution_errors
        errors = check(min(width, height)) or check(max(width, height))
        if errors:
            raise ValueError(f"{role} images of {width}x{height} px: {errors[0]}")
        return self.grid(height, width)

    def prepare(
        self,
        condition_images: list[Image.Image],
        target_images: list[Image.Image] | None,
        instructions: list[str | None],
        *,
        dropped: list[bool] | None = None,
        generation_resolution: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Prompts with placeholder slots for both images (filled with VQ ids by the model face) and pixels.

        Without ``target_images`` the prompts end in the generation prefix of a ``generation_resolution``
        square (default: the native one), ready for :meth:`reconstruct`.
        """
        tokenizer = self._tokenizer()
        condition_grid = self._grid_of(condition_images, "condition")
        if target_images is not None:
            target_grid = self._grid_of(target_images, "target")
        else:
            side = generation_resolution or self.native_generation_resolution
            target_grid = self.grid(side, side)
        num_condition = self.num_slots(*condition_grid)
        num_target = self.num_slots(*target_grid) if target_images is not None else 0
        texts = [
            self.format_prompt(i, condition_grid, target_grid) + tokenizer.image_token * num_target
            for i in instructions
        ]
        input_ids, attention_mask = self._tokenize(texts)
        slots = input_ids == tokenizer.convert_tokens_to_ids(tokenizer.image_token)
        counts = slots.sum(-1)
        if not bool((counts == num_condition + num_target).all()):
            raise ValueError(
                f"the tokenizer turned the prompt into {counts.tolist()} image slots, expected "
                f"{num_condition + num_target} each: {tokenizer.image_token!r} must be a single special token"
            )
        rank = slots.cumsum(-1)  # condition slots come first, the target's follow
        mean, std = self._pixel_stats()
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "condition_mask": slots & (rank <= num_condition),
            "target_mask": slots & (rank > num_condition),
            "condition_pixel_values": to_tensor(condition_images, mean, std),
        }
        if target_images is not None:
            batch["target_pixel_values"] = to_tensor(target_images, mean, std)
        return batch

    def prepare_image_to_text(self, images, questions, answers) -> dict[str, Any]:
        tokenizer = self._tokenizer()
        grid = self._grid_of(images, "condition")
        prompts = [self.understanding_prompt(question, grid) for question in questions]
        input_ids, attention_mask, labels = answer_batch(tokenizer, prompts, answers, add_special_tokens=False)
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
        """Emu3's text-to-image input: the caption, then the target's generation prefix and slots."""
        tokenizer = self._tokenizer()
        grid = self._grid_of(target_images, "target")
        slots = tokenizer.image_token * self.num_slots(*grid)
        input_ids, attention_mask = self._tokenize(
            [self._with_bos(caption or "") + self._image_prefix(*grid) + slots for caption in captions]
        )
        mean, std = self._pixel_stats()
        target_mask = input_ids == tokenizer.convert_tokens_to_ids(tokenizer.image_token)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "target_mask": target_mask,
            "target_pixel_values": to_tensor(target_images, mean, std),
        }

    # ---- model face --------------------------------------------------------------------------

    @torch.no_grad()
    def image_codes(self, emu3, pixel_values: torch.Tensor) -> torch.Tensor:
        """VQ codes ``(B, rows, cols)`` of normalised images (the VQ always runs in eval mode)."""
        vq = emu3.model.vqmodel
        height, width = pixel_values.shape[-2:]
        with eval_mode(vq):
            encoded = vq.encode(pixel_values.to(vq.device, vq.dtype), [(height, width)] * pixel_values.shape[0])
        return torch.stack(encoded.image_tokens).long()

    def frozen_features(self, model, batch, names=None) -> dict[str, torch.Tensor]:
        emu3 = unwrap_model(model)
        names = tuple(self.frozen_feature_sources) if names is None else names
        views = {"condition_codes": "condition_pixel_values", "target_codes": "target_pixel_values"}
        return {name: self.image_codes(emu3, batch[views[name]]) for name in names}

    @staticmethod
    def _code_ids(emu3, device) -> torch.Tensor:
        """The vocabulary id of every VQ code, in code order."""
        return emu3.vocabulary_mapping.img2bpe_mapping_tensor.to(device=device, dtype=torch.long)

    def vocabulary_ids(self, emu3, codes: torch.Tensor) -> torch.Tensor:
        """VQ codes ``(B, rows, cols)`` as Emu3 lays them out in a sequence: ``(B, rows * (cols + 1))``, each row
        followed by the row-end token (what ``Emu3Model.get_image_tokens`` returns, per image, as int64)."""
        ids = self._code_ids(emu3, codes.device)[codes]
        row_ends = ids.new_full((*ids.shape[:-1], 1), emu3.vocabulary_mapping.eol_token_id)
        return torch.cat([ids, row_ends], dim=-1).flatten(1)

    def _fill(self, input_ids: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor, role: str) -> None:
        mask = mask.to(input_ids.device)
        message = (
            f"{{found}} {role} slots in the prompts but {{expected}} {role} tokens from the VQ: the collator's "
            "resolutions and the batch disagree"
        )
        check_once(self.checked_layouts, (role, *ids.shape[1:]), slot_count_problem(mask, ids.numel(), message))
        input_ids.masked_scatter_(mask, ids.to(input_ids.device, input_ids.dtype))  # boolean indexing would sync

    def _filled(self, emu3, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        input_ids = batch["input_ids"].clone()
        if "condition_pixel_values" in batch:  # text-to-image batches have none
            condition = batch.get(cached_key("condition_codes"))
            if condition is None:
                condition = self.image_codes(emu3, batch["condition_pixel_values"])
            self._fill(input_ids, batch["condition_mask"], self.vocabulary_ids(emu3, condition), "condition")
        codes = batch.get(cached_key("target_codes"))
        if codes is None:
            codes = self.image_codes(emu3, batch["target_pixel_values"])
        target_mask = batch["target_mask"].to(input_ids.device)
        self._fill(input_ids, target_mask, self.vocabulary_ids(emu3, codes), "target")
        attention_mask = batch["attention_mask"].to(input_ids.device)
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),  # left padding: positions skip the pads
            "labels": input_ids.masked_fill(~target_mask, _IGNORE),
        }
        return inputs, codes

    def model_inputs(self, model, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """A prepared batch as inputs of ``Emu3ForConditionalGeneration.forward``: both images' slots hold their VQ
        ids and row ends, and the labels are the target's (-100 elsewhere). ``model(**inputs).loss`` is the loss."""
        return self._filled(unwrap_model(model), batch)[0]

    def _target_hidden(self, emu3, batch: dict[str, Any]):
        """Hidden states from the position before the target to its end, their labels, and the target's codes."""
        inputs, codes = self._filled(emu3, batch)
        length = self.num_slots(*codes.shape[1:])
        labels = inputs["labels"][:, -length:]
        check_once(self.checked_layouts, ("left padding", length),
                   lambda: None if bool((labels != _IGNORE).all()) else "every RecA sequence must end with its "
                   "target: pad the prompts on the left")  # fmt: skip
        hidden = emu3.model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], position_ids=inputs["position_ids"]
        ).last_hidden_state
        return hidden[:, -length - 1 :], inputs["labels"][:, -length - 1 :], codes

    def loss(
        self, model, batch: dict[str, Any], *, reduction: str = "mean", noise: LossNoise | None = None
    ) -> torch.Tensor:
        """Emu3's own causal-LM loss, labels on the target's ids and row ends (-100 elsewhere).

        It is ``model(**self.model_inputs(model, batch)).loss``, computed through the model's parts: the
        :class:`~reca_hf.RecATrainer` routes the top module's forward to this loss, and vocabulary-wide logits
        are only needed from the position before the target on (``logits_to_keep``). Deterministic: ``noise``
        has nothing to fix. ``reduction="none"``: each sample's mean over its own target tokens.
        """
        emu3 = unwrap_model(model)
        hidden, labels, _ = self._target_hidden(emu3, batch)
        logits = emu3.lm_head(hidden)
        if reduction == "none":  # the causal shift of loss_function: position t predicts label t + 1
            return per_sample_cross_entropy(logits[:, :-1], labels[:, 1:].to(logits.device))
        loss = emu3.loss_function(logits=logits, labels=labels, vocab_size=emu3.config.text_config.vocab_size)
        return reduce_loss(loss, reduction)

    def text_to_image_loss(self, model, batch, *, reduction: str = "mean", noise: LossNoise | None = None):
        return self.loss(model, batch, reduction=reduction, noise=noise)

    def image_to_text_loss(self, model, batch: dict[str, Any]) -> torch.Tensor:
        """Cross-entropy of the answer tokens, the image's slots filled with its VQ ids."""
        emu3 = unwrap_model(model)
        input_ids = batch["input_ids"].clone()
        codes = self.image_codes(emu3, batch["condition_pixel_values"])
        self._fill(input_ids, batch["condition_mask"], self.vocabulary_ids(emu3, codes), "condition")
        attention_mask = batch["attention_mask"].to(input_ids.device)
        hidden = emu3.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0),
        ).last_hidden_state
        return answer_loss(hidden, batch["labels"], emu3.lm_head, batch.get("answer_length"))

    def _code_logits(self, emu3, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the VQ codes only (column ``k`` is code ``k``): the head's rows of the image tokens."""
        weight = emu3.lm_head.weight
        rows = weight[self._code_ids(emu3, weight.device)]
        return F.linear(hidden.to(weight.device, weight.dtype), rows)

    def target_logits(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced logits over the codebook at the target's VQ ids ``(B, rows * cols, codebook)`` and its
        codes ``(B, rows * cols)``. Row ends are forced at inference, so the probe skips them."""
        emu3 = unwrap_model(model)
        hidden, _, codes = self._target_hidden(emu3, batch)
        rows, cols = codes.shape[1:]
        before_codes = hidden[:, :-1].unflatten(1, (rows, cols + 1))[:, :, :cols].flatten(1, 2)
        return self._code_logits(emu3, before_codes), codes.flatten(1)

    @torch.no_grad()
    def round_trip(self, images, *, model=None, views: ViewSpec | None = None) -> list[Image.Image]:
        emu3 = unwrap_model(self._bound_model(model))
        views = views or self.default_views()
        mean, std = self._pixel_stats()
        targets = to_tensor([views.target_view(load_image(image)) for image in images], mean, std)
        vq = emu3.model.vqmodel
        codes = self.image_codes(emu3, targets)
        with eval_mode(vq):
            pixels = vq.decode(codes)
        return to_pil(pixels, mean, std)

    def sample_codes(self, emu3, conditions, instructions, views, guidance, do_sample, temperature, generator):
        """Sample the target grid ``(B, rows, cols)`` conditioned on the VQ ids of the condition views.

        Decoding is constrained: every position takes a VQ id, and each row end is forced. Classifier-free
        guidance (``guidance != 1``) follows Emu3's convention: the unconditional branch is its
        text-to-image input for :attr:`negative_prompt` (empty by default), without the condition.
        """
        side = views.generation_resolution
        rows, cols = self.grid(side, side)
        batch = self.prepare(conditions, None, instructions, generation_resolution=side)
        device = emu3.device
        input_ids = batch["input_ids"].to(device)
        condition = self.image_codes(emu3, batch["condition_pixel_values"].to(device))
        self._fill(input_ids, batch["condition_mask"], self.vocabulary_ids(emu3, condition), "condition")
        attention_mask = batch["attention_mask"].to(device)
        if guidance != 1.0:
            negative_ids, negative_mask = self._tokenize([self.unconditional_prompt((rows, cols))] * len(conditions))
            input_ids = _left_padded_cat(input_ids, negative_ids.to(device), self._tokenizer().pad_token_id)
            attention_mask = _left_padded_cat(attention_mask, negative_mask.to(device), 0)
        return self._sample(emu3, input_ids, attention_mask, rows, cols, guidance, do_sample, temperature, generator)

    def sample_text_codes(
        self, emu3, prompts, resolution, guidance, generator, *, do_sample: bool = True, temperature: float = 1.0
    ):
        """Emu3-Gen's text-to-image, constrained: the caption, then the image prefix of a ``resolution`` square;
        every position takes a VQ id and each row end is forced. CFG against :attr:`negative_prompt`."""
        rows, cols = self.grid(resolution, resolution)
        texts = [self._with_bos(prompt) + self._image_prefix(rows, cols) for prompt in prompts]
        input_ids, attention_mask = (t.to(emu3.device) for t in self._tokenize(texts))
        if guidance != 1.0:
            negative_ids, negative_mask = self._tokenize([self.unconditional_prompt((rows, cols))] * len(prompts))
            input_ids = _left_padded_cat(input_ids, negative_ids.to(emu3.device), self._tokenizer().pad_token_id)
            attention_mask = _left_padded_cat(attention_mask, negative_mask.to(emu3.device), 0)
        return self._sample(emu3, input_ids, attention_mask, rows, cols, guidance, do_sample, temperature, generator)

    def decode_codes(self, emu3, codes: torch.Tensor) -> list[Image.Image]:
        """Emu3's own decoding of a generated image sequence (ids, row ends and closing tokens)."""
        rows, cols = codes.shape[1:]
        pixels = emu3.decode_image_tokens(image_tokens=self._generated_sequence(emu3, codes), height=rows, width=cols)
        return to_pil(pixels, *self._pixel_stats())

    def _sample(
        self,
        emu3,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        rows: int,
        cols: int,
        guidance: float,
        do_sample: bool,
        temperature: float,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """KV-cached sampling of ``rows x cols`` codes; a row end is fed after every row without being sampled.

        With guidance, ``input_ids`` holds the conditional prompts, then the unconditional ones.
        """
        count = input_ids.shape[0] // (2 if guidance != 1.0 else 1)
        eol = emu3.vocabulary_mapping.eol_token_id
        code_ids = self._code_ids(emu3, input_ids.device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        step_ids, cache, codes = input_ids, None, []
        for index in range(rows * cols):
            out = emu3.model(
                input_ids=step_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
            )
            cache = out.cache
            logits = self._code_logits(emu3, out.last_hidden_state[:, -1])
            code = next_code(logits, guidance, do_sample, temperature, generator)
            codes.append(code)
            token = code_ids[code]
            step_ids = (torch.cat([token, token]) if guidance != 1.0 else token)[:, None]
            if (index + 1) % cols == 0:  # the row is complete: its row end goes in with the last id
                step_ids = torch.cat([step_ids, torch.full_like(step_ids, eol)], dim=1)
            new = step_ids.shape[1]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], new)], dim=1)
            position_ids = position_ids[:, -1:] + torch.arange(1, new + 1, device=position_ids.device)
        return torch.stack(codes, dim=1).view(count, rows, cols)

    def _generated_sequence(self, emu3, codes: torch.Tensor) -> torch.Tensor:
        """What Emu3 generates for an image: its ids with row ends, then end-of-frame, end-of-image and end of
        sequence (``decode_image_tokens`` drops those three)."""
        tokenizer = self._tokenizer()
        closing = [
            tokenizer.convert_tokens_to_ids(tokenizer.eof_token),
            tokenizer.convert_tokens_to_ids(tokenizer.eoi_token),
            tokenizer.eos_token_id,
        ]
        ids = self.vocabulary_ids(emu3, codes)
        return torch.cat([ids, torch.tensor(closing, device=ids.device).expand(ids.shape[0], -1)], dim=1)


def _left_padded_cat(first: torch.Tensor, second: torch.Tensor, pad_value: int) -> torch.Tensor:
    """Stack two left-padded batches along the batch axis, padding the shorter one further on the left."""
    length = max(first.shape[1], second.shape[1])
    return torch.cat([F.pad(t, (length - t.shape[1], 0), value=pad_value) for t in (first, second)])
