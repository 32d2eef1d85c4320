"""Show-o as one `PreTrainedModel`: Phi-1.5 over text, special tokens and MAGVIT-v2 codes, optionally CLIP.

The modules, named as the authors name them (`Show-o/models/modeling_showo.py`), so their checkpoints load with an
identity key map:

- ``showo``: `transformers.PhiForCausalLM` with the vocabulary extended to text + 10 special tokens + codes + mask
  (58,498 for the released models). Attention masks are the 4-D omni-attention masks of `.prompting`, which
  transformers passes through unchanged; positions are ``arange`` (pads counted).
- ``vq_model``: `MagvitV2` (frozen), the image tokenizer (Hub ``showlab/magvitv2``, published separately).
- ``vision_tower`` and ``mm_projector`` (CLIP variant only): `transformers.CLIPVisionModel` (ViT-L/14-336, frozen)
  and Linear-GELU-Linear from its width to Phi's.

Saved layout: ``config.json`` (a `ShowoConfig` with every part's config) and one ``model.safetensors`` with keys
``showo.*``, ``vq_model.*``, and for CLIP ``vision_tower.*`` and ``mm_projector.{0,2}.*``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import AutoModel, CLIPVisionModel, PhiForCausalLM, PreTrainedModel
from transformers import initialization as init

from .configuration_showo import ShowoConfig
from .magvit import MagvitV2
from .prompting import cosine_schedule


class ShowoModel(PreTrainedModel):
    """Show-o: one Phi for next-token text and masked image tokens.

    The model-side steps an adapter glues together: `image_ids` (MAGVIT-v2 codes as LLM ids), `clip_features` and
    `embed_with_features` (CLIP variant), `forward` (logits under an omni-attention mask), `t2i_generate` (the
    authors' MaskGIT sampler with CFG) and `decode_image_ids`. Sequences, masks, token masking and losses are the
    functions of `reca_hf.models.showo.prompting`.
    """

    config: ShowoConfig
    config_class = ShowoConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = False  # the omni-attention masks are dense 4-D masks
    _no_split_modules = ["PhiDecoderLayer", "CLIPEncoderLayer"]

    def __init__(self, config: ShowoConfig):
        super().__init__(config)
        self.showo = PhiForCausalLM(config.llm_config)
        self.vq_model = MagvitV2(config.vq_config)
        if config.w_clip_vit:
            self.vision_tower = CLIPVisionModel(config.vision_config)
            width, llm_width = config.vision_config.hidden_size, config.llm_config.hidden_size
            self.mm_projector = nn.Sequential(nn.Linear(width, llm_width), nn.GELU(), nn.Linear(llm_width, llm_width))
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """PyTorch's default Linear initialisation for the projector, as the authors' (the sub-models initialise
        themselves)."""
        if isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(module.in_features)
            init.uniform_(module.bias, -bound, bound)

    def get_input_embeddings(self) -> nn.Module:
        return self.showo.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.showo.set_input_embeddings(value)

    def train(self, mode: bool = True) -> ShowoModel:
        """The frozen tokenizer and CLIP tower stay in eval mode."""
        super().train(mode)
        self.vq_model.eval()
        if self.config.w_clip_vit:
            self.vision_tower.eval()
        return self

    @torch.no_grad()
    def image_ids(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """LLM ids ``(B, N)`` of ``pixel_values`` in [-1, 1]: MAGVIT-v2 codes plus `code_offset`."""
        return self.vq_model.encode(pixel_values) + self.config.code_offset

    @torch.no_grad()
    def decode_image_ids(self, ids: torch.Tensor, offset: bool = False) -> torch.Tensor:
        """Pixels (unclamped) of ``(B, N)`` codes, or of LLM ids with ``offset=True``."""
        codes = ids - self.config.code_offset if offset else ids
        return self.vq_model.decode(codes.clamp(0, self.config.codebook_size - 1))

    @torch.no_grad()
    def clip_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP features of ``pixel_values`` as given (no normalisation here: the RecA condition feeds the [-1, 1]
        tensor resized to 336, the understanding data CLIP-normalised pixels): the `clip_feature_layer` hidden
        state without ``post_layernorm``, CLS dropped. ``(B, patches, clip_width)``."""
        if not self.config.w_clip_vit:
            raise ValueError("ShowoModel.clip_features: this is the VQ variant (w_clip_vit=False), it has no CLIP.")
        outputs = self.vision_tower(pixel_values.to(self.vision_tower.dtype), output_hidden_states=True)
        return outputs.hidden_states[self.config.clip_feature_layer][:, 1:]

    def embed_with_features(self, input_ids: torch.Tensor, features: torch.Tensor, at: int = 2) -> torch.Tensor:
        """Token embeddings of ``input_ids`` with the projected CLIP ``features`` inserted before position ``at``
        (after ``<|mmu|> <|soi|>``, the authors' place)."""
        embeddings = self.get_input_embeddings()(input_ids)
        projected = self.mm_projector(features.to(embeddings.dtype))
        return torch.cat([embeddings[:, :at], projected, embeddings[:, at:]], dim=1)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ):
        """Phi's output (``.logits`` over the whole vocabulary) for ``input_ids`` or ``inputs_embeds`` under the
        ``(B, 1, L, L)`` additive ``attention_mask`` of `.prompting`; positions ``arange``."""
        if attention_mask is not None and attention_mask.dim() != 4:
            raise ValueError(
                f"ShowoModel.forward: attention_mask has shape {tuple(attention_mask.shape)}; Show-o needs a 4-D "
                "(batch, 1, length, length) omni-attention mask from reca_hf.models.showo.prompting."
            )
        reference = self.get_input_embeddings().weight
        if attention_mask is not None:
            attention_mask = attention_mask.to(reference.dtype)
        return self.showo(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, use_cache=False, **kwargs
        )

    @torch.no_grad()
    def t2i_generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        uncond_input_ids: torch.Tensor | None = None,
        *,
        guidance_scale: float = 0.0,
        timesteps: int = 18,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The authors' MaskGIT sampler (``Showo.t2i_generate``, VQ path); returns codes ``(B, N)``.

        ``input_ids`` end with ``<|soi|> image <|eoi|>`` (unknown slots hold the mask id; `.prompting.t2i_inputs`);
        with ``uncond_input_ids`` (as long, ending the same way: the empty prompt's) each step runs both halves under
        the ``2B``-row ``attention_mask`` and mixes ``(1 + s) * cond - s * uncond``, else ``attention_mask`` has
        ``B`` rows. Any prefix works (e.g. a condition's codes before the text), as long as the image comes last. Per step: sample every slot from the softmax (a ``multinomial`` draw), keep known slots, then re-mask
        the ``max(1, min(unknown - 1, floor(N cos(pi/2 * (step + 1) / timesteps))))`` least confident, confidence
        ``log p + temperature * gumbel`` (drawn after the multinomial, same generator), the temperature scaled by
        ``1 - ratio`` each step (it compounds, as theirs). ``input_ids`` is updated in place, as theirs.
        """
        config = self.config
        if uncond_input_ids is not None and uncond_input_ids.shape != input_ids.shape:
            raise ValueError(
                f"ShowoModel.t2i_generate: uncond_input_ids has shape {tuple(uncond_input_ids.shape)} but input_ids "
                f"{tuple(input_ids.shape)}; pad the unconditional prompt to the same length (prompting.t2i_inputs does)."
            )
        n, offset, mask_id = config.num_vq_tokens, config.code_offset, config.mask_token_id
        image = slice(-(n + 1), -1)
        known = input_ids[:, image].clone()
        known = torch.where(known == mask_id, mask_id, known - offset)
        # The unconditional rows take the conditional rows' current image block: everything before its <|soi|> is
        # their own (the authors slice at max_seq_length + 1, which is that point in the text-to-image layout).
        prefix = uncond_input_ids[:, : -(n + 2)] if uncond_input_ids is not None else None
        sampled = known
        for step in range(timesteps):
            if prefix is not None and guidance_scale >= 0:
                uncond = torch.cat([prefix, input_ids[:, -(n + 2) :]], dim=1)
                cond_logits, uncond_logits = self(torch.cat([input_ids, uncond]), attention_mask).logits.chunk(2)
                logits = (1 + guidance_scale) * cond_logits - guidance_scale * uncond_logits
            else:
                logits = self(input_ids, attention_mask).logits
            logits = logits[:, image, offset:-1]
            probs = logits.softmax(dim=-1)
            sampled = torch.multinomial(probs.reshape(-1, logits.shape[-1]), 1, generator=generator)[:, 0]
            sampled = sampled.view(*logits.shape[:-1])
            unknown = known == mask_id
            sampled = torch.where(unknown, sampled, known)
            ratio = (step + 1) / timesteps
            mask_len = (n * cosine_schedule(torch.tensor(ratio))).floor().unsqueeze(0).to(logits.device)
            mask_len = torch.max(
                torch.tensor([1], device=logits.device), torch.min(unknown.sum(-1, keepdim=True) - 1, mask_len)
            )
            selected = torch.gather(probs, -1, sampled.long()[..., None]).squeeze(-1)
            selected = torch.where(unknown, selected, torch.finfo(selected.dtype).max)
            temperature = temperature * (1.0 - ratio)
            masking = _mask_by_random_topk(mask_len, selected, temperature, generator)
            input_ids[:, image] = torch.where(masking, mask_id, sampled + offset)
            known = torch.where(masking, mask_id, sampled)
        return sampled


def _log(t: torch.Tensor, eps: float = 1e-20) -> torch.Tensor:
    return torch.log(t.clamp(min=eps))


def _mask_by_random_topk(
    mask_len: torch.Tensor, probs: torch.Tensor, temperature: float, generator: torch.Generator | None
) -> torch.Tensor:
    """True at the ``mask_len`` least confident slots per row, confidence ``log p + temperature * gumbel``."""
    uniform = torch.zeros_like(probs).uniform_(0, 1, generator=generator)
    confidence = _log(probs) + temperature * -_log(-_log(uniform))
    cut_off = torch.gather(torch.sort(confidence, dim=-1).values, 1, mask_len.long())
    return confidence < cut_off


AutoModel.register(ShowoConfig, ShowoModel, exist_ok=True)  # `AutoModel.from_pretrained` of a Show-o folder
