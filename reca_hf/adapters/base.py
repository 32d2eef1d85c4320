"""The contract every architecture adapter implements: :class:`UMMAdapter`.

An architecture adapter (not a LoRA adapter: those are trained weights, see reca_hf.lora) is the only place
that knows how one architecture lays out a RecA sample. It has two faces: a CPU face (:meth:`UMMAdapter.prepare`)
that turns images and instructions into tensors in dataloader workers without touching the model, and a model
face (:meth:`UMMAdapter.loss`, :meth:`UMMAdapter.reconstruct`) that runs the model. The registry is
:mod:`reca_hf.adapters.registry`; the helpers adapters share are :mod:`reca_hf.adapters.helpers`.
"""

from __future__ import annotations

import dataclasses
import warnings
from abc import ABC, abstractmethod
from importlib import import_module
from typing import Any, ClassVar

import torch
from PIL import Image

from ..images import (
    AUTO,
    CONDITION_SOURCES,
    FITS,
    INTERPOLATIONS,
    KeepBounds,
    ViewSpec,
    auto_condition_resolution,
    check_shortcut,
    load_image,
    resolve_views,
    shortcut_error,
    shortcut_problem,
)
from .helpers import eval_mode, model_device, unwrap_model
from .targets import GenerationTarget

CONDITION_RELATIONS = ("same", "derived", "separate")


class UMMAdapter(ABC):
    """Base class of the per-architecture RecA adapters.

    A subclass declares every required attribute below and implements the four abstract methods (:meth:`prepare`,
    :meth:`loss`, and :meth:`sample_codes` / :meth:`decode_codes`, the hooks of :meth:`reconstruct`); both are
    checked when the subclass is defined, as are the paired optional hooks (:data:`PAIRED_HOOKS`). Class-level
    resolutions describe the public checkpoints; an instance reads the real values from the model config it was
    built for (:meth:`config_min_condition_resolution`, :meth:`config_native_generation_resolution`).
    """

    # ---- required attributes (a subclass missing one is a TypeError at class definition) ----
    name: ClassVar[str]  # registry key, e.g. "janus"
    model_types: ClassVar[tuple[str, ...]]  # transformers `config.model_type` values this adapter handles
    model_class: ClassVar[str]  # transformers class that loads such checkpoints
    condition_space: ClassVar[str]  # representation the understanding path reads, e.g. "siglip" or "vq"
    generation_space: ClassVar[str]  # representation the generation loss predicts, e.g. "vq"
    min_condition_resolution: ClassVar[int]  # smallest resolution the model was trained to understand at
    native_generation_resolution: ClassVar[int]  # resolution the model generates at
    parameter_sharing: ClassVar[str]  # "shared": one LLM understands and generates; "decoupled": separate
    understanding_modules: ClassVar[tuple[str, ...]]  # modules only the understanding path uses
    generation_modules: ClassVar[tuple[str, ...]]  # modules only the generation path uses
    shared_modules: ClassVar[tuple[str, ...]]  # modules both paths use
    tokenizer_modules: ClassVar[tuple[str, ...]]  # image tokenizers/autoencoders (always frozen)
    default_freeze: ClassVar[tuple[str, ...]]  # what `freeze="auto"` freezes
    # The instruction of a dropped prompt (prompt dropout, the branch classifier-free guidance contrasts against);
    # None: a dropped row's prompt leaves the instruction segment out entirely (BAGEL), not an empty string.
    null_prompt: ClassVar[str | None]
    generation_target: ClassVar[GenerationTarget]  # what the generator predicts (instances fill in the codebook)
    # How the condition relates to the target: "same" (the target's own tokens: copyable, guarded), "derived"
    # (a trainable encoder over the target's own latents at its resolution: warned), "separate" (no guard).
    condition_relation: ClassVar[str]

    # ---- optional attributes, with their defaults ----
    pipeline_tag: ClassVar[str] = "any-to-any"  # the Hub's pipeline tag of the base models (cards inherit it)
    default_cond_dropout_prob: ClassVar[float] = 0.1  # cond_dropout_prob="auto": the authors' rate
    # View fits of target_fit / condition_fit "auto" (see reca_hf.images): no RecA author pads a generation target;
    # a condition follows the model's understanding processor.
    target_fit: ClassVar[str] = "center_crop"
    condition_fit: ClassVar[str] = "pad"
    # Where condition_source / condition_interpolation "auto" make the condition from (see reca_hf.images):
    # "image" (the source image, resized as an understanding processor resizes it) or "target" (the target view's
    # float tensor, resampled by condition_interpolation, as the OpenUni and Show-o authors do). An adapter's
    # prepare() then receives PIL images or float tensors as conditions: reca_hf.images.to_tensor takes both.
    condition_source: ClassVar[str] = "image"
    condition_interpolation: ClassVar[str] = "bilinear"
    # Whether prepare() takes views of different sizes in one batch (the "keep" fit, which keeps each image's
    # aspect ratio; refused for adapters that stack their views), and the bounds of a "keep" view (an instance may
    # set its own from the model config: the strides its encoders need)
    variable_size: ClassVar[bool] = False
    target_keep: ClassVar[KeepBounds] = KeepBounds()
    condition_keep: ClassVar[KeepBounds] = KeepBounds()
    # Frozen-tower cache: feature name -> patterns of the modules it comes from (needs frozen_features)
    frozen_feature_sources: ClassVar[dict[str, tuple[str, ...]]] = {}
    # LoRA (full-name regular expressions of Linear layers, see reca_hf.lora)
    lora_generation_targets: ClassVar[tuple[str, ...]] = ()  # generation-only Linear layers
    lora_llm_targets: ClassVar[tuple[str, ...]] = ()  # the shared LLM's attention and MLP projections
    understanding_entry: ClassVar[str | None] = None  # module whose forward() is the text path (LoRA scoping)
    lora_modules_to_save: ClassVar[tuple[str, ...]] = ()  # trainable non-Linear parts saved with a LoRA adapter
    # Modules (full regular expressions on dotted name prefixes) trained without weight decay, beyond transformers'
    # rule (biases and norm weights), e.g. Harmon's diffusion head as its authors' optimizer constructor.
    no_weight_decay: ClassVar[tuple[str, ...]] = ()
    default_instruction: ClassVar[str] = "Describe the image in detail."  # reconstruct()'s instruction
    default_guidance_scale: ClassVar[float] = 1.0  # reconstruct()'s classifier-free guidance
    text_to_image_guidance_scale: ClassVar[float | None] = None  # text_to_image()'s (None: default_guidance_scale)

    _REQUIRED: ClassVar[tuple[str, ...]] = (
        "name",
        "model_types",
        "model_class",
        "condition_space",
        "generation_space",
        "min_condition_resolution",
        "native_generation_resolution",
        "parameter_sharing",
        "understanding_modules",
        "generation_modules",
        "shared_modules",
        "tokenizer_modules",
        "default_freeze",
        "null_prompt",
        "generation_target",
        "condition_relation",
    )
    # Optional hooks that only work together: an adapter overriding one of a pair overrides the other.
    PAIRED_HOOKS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("prepare_image_to_text", "image_to_text_loss"),
        ("prepare_text_to_image", "text_to_image_loss"),
    )

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        missing = [attr for attr in cls._REQUIRED if not hasattr(cls, attr)]
        if missing:
            raise TypeError(f"adapter {cls.__name__} does not declare {', '.join(missing)}")
        abstract = [name for name in dir(cls) if getattr(getattr(cls, name, None), "__isabstractmethod__", False)]
        if abstract:
            raise TypeError(
                f"adapter {cls.__name__} does not implement {', '.join(abstract)} "
                "(required methods of reca_hf.adapters.UMMAdapter)"
            )
        for first, second in cls.PAIRED_HOOKS:
            overridden = [hook for hook in (first, second) if getattr(cls, hook) is not getattr(UMMAdapter, hook)]
            if len(overridden) == 1:
                lacking = second if overridden == [first] else first
                raise TypeError(f"adapter {cls.__name__} implements {overridden[0]} but not {lacking}: implement both")
        if cls.frozen_feature_sources and cls.frozen_features is UMMAdapter.frozen_features:
            raise TypeError(
                f"adapter {cls.__name__} declares frozen_feature_sources but does not implement frozen_features"
            )
        if cls.parameter_sharing not in ("shared", "decoupled"):
            raise TypeError(f"adapter {cls.__name__}: parameter_sharing must be 'shared' or 'decoupled'")
        if cls.condition_relation not in CONDITION_RELATIONS:
            raise TypeError(
                f"adapter {cls.__name__}: condition_relation must be one of {', '.join(CONDITION_RELATIONS)}"
            )
        for attr, choices in (
            ("target_fit", FITS),
            ("condition_fit", FITS),
            ("condition_source", CONDITION_SOURCES),
            ("condition_interpolation", INTERPOLATIONS),
        ):
            if getattr(cls, attr) not in choices:
                raise TypeError(f"adapter {cls.__name__}: {attr} must be one of {', '.join(choices)}")
        if not isinstance(cls.generation_target, GenerationTarget):
            raise TypeError(f"adapter {cls.__name__}: generation_target must be a reca_hf.adapters.GenerationTarget")

    def __init__(self, config, processor=None, model=None):
        self.config = config
        self.processor = processor
        self.model = model
        # On an instance, the resolutions are this model's (from its config), not the public checkpoints'.
        self.min_condition_resolution = self.config_min_condition_resolution()
        self.native_generation_resolution = self.config_native_generation_resolution()
        target = type(self).generation_target
        if target.is_tokens and target.codebook_size is None and self.codebook_size:
            target = dataclasses.replace(target, codebook_size=self.codebook_size)
        self.generation_target = target
        self.checked_layouts: set = set()  # batch layouts whose slot counts were read once (reca_hf.slots)

    # ---- loading: what `RecATrainer("id")` and `reca train` call ----------------------------------

    @classmethod
    def load(cls, name_or_path: str, dtype: str = "float32", **kwargs) -> tuple[torch.nn.Module, Any]:
        """Load a checkpoint of this architecture: ``(model, processor)``.

        The default loads :attr:`model_class` (a transformers class name or a dotted import path) with
        ``from_pretrained``, and the processor with ``AutoProcessor``; a plain ``torch.nn.Module`` class is
        rebuilt from the ``config.json`` and ``model.safetensors`` that ``RecATrainer`` saves (see
        :func:`reca_hf.loading.load_module`). ``kwargs`` are ``trust_remote_code``, ``revision`` and
        ``attn_implementation``. Override it for a model composed of parts that load separately.
        """
        from ..loading import load_pretrained

        return load_pretrained(cls.model_class, name_or_path, dtype, **kwargs)

    @classmethod
    def load_config(cls, name_or_path: str, **kwargs):
        """The model config of a checkpoint, without its weights (``reca validate`` builds the adapter on it);
        ``kwargs`` are ``trust_remote_code`` and ``revision``. Override it together with :meth:`load`."""
        from ..loading import load_pretrained_config

        return load_pretrained_config(cls.model_class, name_or_path, **kwargs)

    def __getstate__(self):
        # Dataloader workers need the CPU face only: never pickle the model into them.
        return {**self.__dict__, "model": None}

    # ---- resolutions -------------------------------------------------------------------------

    def config_min_condition_resolution(self) -> int:
        """The minimum understanding resolution of *this* model, read from its config (override per
        architecture; the default is the public checkpoints' class value)."""
        return type(self).min_condition_resolution

    def config_native_generation_resolution(self) -> int:
        """The generation resolution of *this* model, read from its config (override per architecture)."""
        return type(self).native_generation_resolution

    @property
    def condition_resolution_floor(self) -> int:
        """Old name of :attr:`min_condition_resolution` on an instance (warns)."""
        _renamed("condition_resolution_floor", "min_condition_resolution")
        return self.min_condition_resolution

    @property
    def generation_resolution_native(self) -> int:
        """Old name of :attr:`native_generation_resolution` on an instance (warns)."""
        _renamed("generation_resolution_native", "native_generation_resolution")
        return self.native_generation_resolution

    def condition_resolution_errors(self, resolution: int) -> list[str]:
        """Why ``resolution`` cannot be a condition resolution for this model (empty when it can)."""
        return []

    def generation_resolution_errors(self, resolution: int) -> list[str]:
        """Why ``resolution`` cannot be a generation resolution for this model (empty when it can)."""
        return []

    @classmethod
    def shares_representation(cls) -> bool:
        """True when the condition is the target's own representation (``condition_relation == "same"``: e.g.
        both VQ ids), which a model can copy."""
        return cls.condition_relation == "same"

    # The bottleneck policy is RecA's (reca_hf.images); these keep it reachable from the adapter.

    @classmethod
    def shortcut_problem(cls, condition: int, generation: int, bottleneck: str) -> str | None:
        """Why this view setting lets the model copy its condition (see :func:`reca_hf.images.shortcut_problem`)."""
        return shortcut_problem(cls, condition, generation, bottleneck)

    @classmethod
    def shortcut_error(cls, condition: int, generation: int, bottleneck: str) -> str | None:
        """:meth:`shortcut_problem` as an error message naming the two fields (None when there is no problem)."""
        return shortcut_error(cls, condition, generation, bottleneck)

    def check_shortcut(self, views: ViewSpec, allow_shortcut: bool = False) -> None:
        """Refuse (or, with ``allow_shortcut``, warn about) condition views the model could simply copy."""
        check_shortcut(self, views, allow_shortcut)

    def round_condition_resolution(self, resolution: int) -> int:
        """The largest valid condition resolution not above ``resolution`` (override when sizes are quantised)."""
        return resolution

    def auto_condition_resolution(self, generation: int) -> int:
        """What ``condition_resolution="auto"`` means for this model (:func:`reca_hf.images.auto_condition_resolution`)."""
        return auto_condition_resolution(self, generation)

    def resolve_resolutions(self, condition_resolution: int | str, generation_resolution: int | str):
        """Turn ``"auto"`` into this model's values and check both; returns ``(condition, generation)``."""
        generation = self.native_generation_resolution if generation_resolution == AUTO else int(generation_resolution)
        condition = (
            self.auto_condition_resolution(generation) if condition_resolution == AUTO else int(condition_resolution)
        )
        errors = [
            f"condition_resolution={condition_resolution!r}: {e}" for e in self.condition_resolution_errors(condition)
        ]
        errors += [
            f"generation_resolution={generation_resolution!r}: {e}"
            for e in self.generation_resolution_errors(generation)
        ]
        if errors:
            raise ValueError("\n".join(errors))
        return condition, generation

    def default_views(self) -> ViewSpec:
        """The views of ``"auto"`` resolutions with the default bottleneck."""
        return resolve_views(self)

    def text_tokenizer(self):
        """The processor's tokenizer, or the processor itself when it is a tokenizer (an error naming
        ``processing_class`` when the adapter has neither)."""
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        if tokenizer is None:
            raise ValueError(
                f"the {self.name} architecture adapter needs the model's tokenizer or processor: pass processing_class=..."
            )
        return tokenizer

    @property
    def background_color(self) -> tuple[int, int, int]:
        """Colour used to pad images to a square (the model processor's, where it has one)."""
        color = getattr(getattr(self.processor, "image_processor", None), "background_color", None)
        return tuple(int(c) for c in color) if color is not None else (127, 127, 127)

    # ---- module groups -----------------------------------------------------------------------

    def module_groups(self) -> dict[str, tuple[str, ...]]:
        return {
            "understanding": self.understanding_modules,
            "generation": self.generation_modules,
            "shared": self.shared_modules,
            "tokenizers": self.tokenizer_modules,
        }

    def after_freeze(self, model, frozen: list[str]) -> None:
        """Called by :func:`reca_hf.freeze.apply_freeze` with the names it froze: for a model whose forward depends
        on what trains (BAGEL's ``freeze_und``). The default does nothing."""
        return None

    # ---- the two faces -----------------------------------------------------------------------

    @abstractmethod
    def prepare(
        self,
        condition_images: list[Image.Image | torch.Tensor],
        target_images: list[Image.Image] | None,
        instructions: list[str | None],
        *,
        dropped: list[bool] | None = None,
    ) -> dict[str, Any]:
        """CPU face: build the model inputs of a batch (no model access; runs in dataloader workers).

        ``dropped`` says which rows prompt dropout replaced (None: none did); their instruction is already the
        :attr:`null_prompt`, so None where that leaves the instruction segment out. Entries may be of any type
        and size (see :meth:`batch_size`). A condition is a PIL image, or under ``condition_source="target"`` a
        float tensor ``(3, H, W)`` on the 0..1 scale: :func:`reca_hf.images.to_tensor` turns either into pixels,
        :func:`reca_hf.images.view_size` reads either's size.
        """
        raise NotImplementedError

    def batch_size(self, batch: dict[str, Any]) -> int:
        """How many samples a prepared batch holds (the trainer weighs and counts task losses by it): the
        length of its first tensor or list. ``prepare`` may return entries of any type and size, so an adapter
        whose first entry is not per sample overrides this."""
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                return int(value.shape[0])
            if isinstance(value, list | tuple):
                return len(value)
        raise ValueError(f"the {self.name} adapter cannot tell the batch size of a batch with keys {sorted(batch)}")

    def loss_tokens(self, batch: dict[str, Any]) -> int | None:
        """How many items the ``"mean"`` :meth:`loss` of a prepared batch averages over, for a loss that is a
        mean over items (tokens) rather than over samples; read on the host, without the model. Where an adapter
        overrides it (BAGEL: its VAE tokens), the trainer makes the loss of a multi-process step the mean over all
        processes' items (the authors' global token count), not the mean of the processes' means. The default,
        None, is a per-sample mean."""
        return None

    @abstractmethod
    def loss(self, model, batch: dict[str, Any], *, reduction: str = "mean", noise=None) -> torch.Tensor:
        """Model face: the reconstruction loss of a prepared batch, in the model's native generation loss.

        ``reduction="none"`` returns one loss per sample ``(B,)`` (their mean is the ``"mean"`` loss up to
        rounding); ``noise`` (a :class:`~reca_hf.adapters.LossNoise`) fixes every random draw, so two calls
        with the same noise return the same value. Training passes ``noise=None``: fresh draws.
        """
        raise NotImplementedError

    # ---- the frozen-tower cache (optional: adapters without frozen_feature_sources are never cached) ----

    def frozen_features(self, model, batch: dict[str, Any], names: tuple[str, ...] | None = None) -> dict[str, Any]:
        """The outputs of frozen modules that :meth:`loss` reads, for a prepared reconstruction batch.

        One entry per name of ``frozen_feature_sources`` (or of ``names``), each ``(B, ...)`` and a function of
        that sample's views alone (not of its instruction), so that it can be computed once per image and
        cached (:mod:`reca_hf.frozen_cache`). :meth:`loss` uses ``batch[cached_key(name)]`` instead of
        recomputing ``name`` when the batch holds it.
        """
        return {}

    # ---- the other tasks of a mixed run (optional: adapters without them train reconstruction only) ----

    @property
    def understanding_resolution(self) -> int:
        """Resolution images are shown at for image-to-text (no bottleneck there)."""
        return self.min_condition_resolution

    def prepare_image_to_text(
        self, images: list[Image.Image], questions: list[str], answers: list[str]
    ) -> dict[str, torch.Tensor]:
        """CPU face of image-to-text: the image in an understanding prompt with ``questions``; ``labels``
        hold the ``answers`` (-100 elsewhere)."""
        raise NotImplementedError(f"the {self.name} adapter has no image-to-text task")

    def image_to_text_loss(self, model, batch: dict[str, Any]) -> torch.Tensor:
        """Caption cross-entropy of the text head (mean over answer tokens)."""
        raise NotImplementedError(f"the {self.name} adapter has no image-to-text task")

    def prepare_text_to_image(
        self, captions: list[str | None], target_images: list[Image.Image], *, dropped: list[bool] | None = None
    ) -> dict[str, Any]:
        """CPU face of text-to-image: a generation prompt from ``captions`` and the target images (``dropped``
        and a None caption as in :meth:`prepare`)."""
        raise NotImplementedError(f"the {self.name} adapter has no text-to-image task")

    def text_to_image_loss(self, model, batch: dict[str, Any]) -> torch.Tensor:
        """The ordinary generation loss, conditioned on the caption instead of understanding embeddings."""
        raise NotImplementedError(f"the {self.name} adapter has no text-to-image task")

    def supports(self, task: str) -> bool:
        """Whether this adapter implements ``task`` ("reconstruction", "image_to_text", "text_to_image")."""
        method = {"image_to_text": "image_to_text_loss", "text_to_image": "text_to_image_loss"}.get(task, "loss")
        return getattr(type(self), method) is not getattr(UMMAdapter, method)

    def target_logits(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced logits over the target tokens ``(B, T, V)`` and the target token ids ``(B, T)``.

        The collapse detector's condition-swap probe reads the argmax of these logits.
        """
        raise NotImplementedError

    @property
    def codebook_size(self) -> int | None:
        """Number of entries of the generation codebook (the uniform-guess loss is its log), if discrete."""
        return type(self).generation_target.codebook_size

    @torch.no_grad()
    def reconstruct(
        self,
        images,
        *,
        model=None,
        views: ViewSpec | None = None,
        instruction: str | None = None,
        guidance_scale: float | None = None,
        do_sample: bool = True,
        temperature: float = 1.0,
        seed: int | None = None,
    ) -> list[Image.Image]:
        """Generate images conditioned on the understanding of ``images``' condition views.

        The steps every architecture shares happen here (the bound model, the views, the condition views,
        the defaults, the seeded generator, eval mode); the architecture fills in :meth:`sample_codes` and
        :meth:`decode_codes`.
        """
        model = unwrap_model(self._bound_model(model))
        views = views or self.default_views()
        conditions = [views.condition_view(load_image(image)) for image in images]
        instructions = [self.default_instruction if instruction is None else instruction] * len(conditions)
        guidance = self.default_guidance_scale if guidance_scale is None else guidance_scale
        generator = torch.Generator(device=model_device(model)).manual_seed(seed) if seed is not None else None
        with eval_mode(model):
            codes = self.sample_codes(
                model, conditions, instructions, views, guidance, do_sample, temperature, generator
            )
            return self.decode_codes(model, codes)

    @abstractmethod
    def sample_codes(
        self,
        model,
        conditions: list[Image.Image | torch.Tensor],
        instructions: list[str],
        views: ViewSpec,
        guidance: float,
        do_sample: bool,
        temperature: float,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """Hook of :meth:`reconstruct`: sample the target's codes given the condition views (with guidance
        when ``guidance != 1``); ``model`` is the unwrapped model, in eval mode."""
        raise NotImplementedError(f"the {self.name} adapter cannot reconstruct")

    @abstractmethod
    def decode_codes(self, model, codes: torch.Tensor) -> list[Image.Image]:
        """Hook of :meth:`reconstruct`: the images that sampled codes decode to."""
        raise NotImplementedError(f"the {self.name} adapter cannot reconstruct")

    @torch.no_grad()
    def text_to_image(
        self,
        prompts: list[str],
        *,
        model=None,
        seed: int | None = None,
        num_images_per_prompt: int = 1,
        guidance_scale: float | None = None,
        resolution: int | None = None,
        **sampler,
    ) -> list[Image.Image]:
        """Generate images from text prompts: ``num_images_per_prompt`` per prompt, prompt by prompt (the
        images of the first prompt come first), at ``resolution`` (default: the model's generation resolution).

        ``sampler`` holds the architecture's sampler settings (token models: ``do_sample``, ``temperature``;
        diffusion and flow models: ``num_inference_steps``). One ``seed`` makes the whole call reproducible.
        The shared steps happen here; the architecture fills in :meth:`sample_text_codes` and
        :meth:`decode_codes`.
        """
        model = unwrap_model(self._bound_model(model))
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt={num_images_per_prompt!r}: use a positive integer")
        texts = [str(prompt) for prompt in prompts for _ in range(num_images_per_prompt)]
        if guidance_scale is None:
            guidance_scale = self.text_to_image_guidance_scale
        guidance = self.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        side = int(resolution or self.native_generation_resolution)
        errors = self.generation_resolution_errors(side)
        if errors:
            raise ValueError(f"resolution={side}: {errors[0]}")
        generator = torch.Generator(device=model.device).manual_seed(seed) if seed is not None else None
        with eval_mode(model):
            codes = self.sample_text_codes(model, texts, side, guidance, generator, **sampler)
            return self.decode_codes(model, codes)

    def sample_text_codes(
        self, model, prompts: list[str], resolution: int, guidance: float, generator: torch.Generator | None, **sampler
    ) -> torch.Tensor:
        """Hook of :meth:`text_to_image`: sample the codes (tokens or latents) of one image per prompt, with
        classifier-free guidance against the architecture's unconditional prompt when ``guidance != 1``."""
        raise NotImplementedError(
            f"the {self.name} architecture adapter has no text-to-image sampler: implement "
            f"{type(self).__name__}.sample_text_codes (see reca_hf.adapters.UMMAdapter.text_to_image)"
        )

    @classmethod
    def supports_text_to_image_sampling(cls) -> bool:
        """Whether :meth:`text_to_image` works for this architecture."""
        return cls.sample_text_codes is not UMMAdapter.sample_text_codes

    @classmethod
    def generation_snippet(cls, repo_id: str) -> str | None:
        """Python that loads ``repo_id`` and generates an image with this architecture (the model card's usage
        section; tested by running it). The default samples through reca_hf (:meth:`text_to_image`); an
        architecture whose library has its own image generation overrides it. None without a sampler."""
        if not cls.supports_text_to_image_sampling():
            return None
        return GENERATION_SNIPPET.format(repo_id=repo_id)

    def round_trip(self, images, *, model=None, views: ViewSpec | None = None) -> list[Image.Image] | None:
        """Target views encoded and decoded by the image tokenizer alone: the ceiling of any reconstruction.

        Optional: adapters without a discrete or autoencoding target return None.
        """
        return None

    def _bound_model(self, model):
        model = model if model is not None else self.model
        if model is None:
            raise ValueError(
                f"{type(self).__name__}.reconstruct needs a model: pass model=... or use get_adapter(model)."
            )
        return model


# The usage snippet of a model card: reca_hf loads any of its architectures and samples with the adapter.
GENERATION_SNIPPET = """\
from reca_hf import load_for_generation

model, processor, adapter = load_for_generation("{repo_id}")  # add device="cuda" on a GPU
images = adapter.text_to_image(["a red circle on a white background"], seed=0, num_images_per_prompt=2)
images[0].save("sample.png")"""


def _renamed(old: str, new: str) -> None:
    warnings.warn(
        f"UMMAdapter.{old} is the 0.1 name of {new}: use {new}; the old name will be removed",
        FutureWarning,
        stacklevel=3,
    )


# Names that lived in this module before the registry and the shared helpers had modules of their own.
_MOVED = {
    **dict.fromkeys(
        ("CACHED_PREFIX", "IGNORE_INDEX", "answer_batch", "answer_length", "answer_loss", "cached_key", "left_pad",
         "next_code"),
        "reca_hf.adapters.helpers",
    ),
    "import_object": "reca_hf.dotted",
    **dict.fromkeys(
        ("ENTRY_POINT_GROUP", "adapter_class_for", "get_adapter", "load_entry_points", "register_adapter",
         "registered_adapters", "resolve_adapter_class", "supported_model_types", "tiny_builders"),
        "reca_hf.adapters.registry",
    ),
}  # fmt: skip


def __getattr__(name: str):
    if name in _MOVED:
        return getattr(import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
