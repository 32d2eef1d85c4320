"""Show-o's sequences, omni-attention masks, token masking and losses, as the authors' RecA step builds them.

Pure functions over token ids (`Show-o/training/prompting_utils.py`, `training/utils.py` and the loss slices of
`models/modeling_showo.py` in the authors' repository), so an adapter can drive each piece and inject the
randomness:

- sequences: `recon_inputs` (VQ variant), `clip_recon_inputs` (CLIP variant, feature slots filled by the model),
  `mmu_inputs` / `clip_mmu_inputs` (image-to-text), `t2i_inputs` (text-to-image generation);
- masks: `recon_attention_mask`, `clip_recon_attention_mask`, `mmu_attention_mask`, `clip_mmu_attention_mask`,
  `t2i_attention_mask`, each ``(B, 1, L, L)`` additive floats: 0 where a row attends, `BLOCKED` where it does not
  (the authors' ``int64`` minimum cast to float, not ``finfo.min``);
- `mask_image_tokens`: the cosine-schedule masking, from a generator or from given draws;
- `recon_loss` and `mmu_loss`: the authors' cross-entropies and slices.

Positions are ``arange`` over the whole sequence, pads counted (Phi's default when no ``position_ids`` are given).
Text ids here are lists of ints from the tokenizer without special tokens; a ``<bos>`` is prepended as the authors
do (the Phi tokenizer writes none).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .configuration_showo import ShowoConfig

IGNORE_INDEX = -100
BLOCKED = float(torch.iinfo(torch.int64).min)  # -2**63, exactly representable in every float dtype


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(B, L, L)`` booleans (row attends to column) -> the ``(B, 1, L, L)`` additive mask Phi takes."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.tensor(BLOCKED, dtype=dtype, device=allowed.device))[:, None]


def _with_bos(text_ids: Sequence[int], bos_id: int) -> list[int]:
    """The authors' rule: an empty text becomes ``[bos]``; a text not starting with ``bos`` gets one."""
    text_ids = list(text_ids)
    if not text_ids:
        return [bos_id]
    return text_ids if text_ids[0] == bos_id else [bos_id, *text_ids]


def _ids(config: ShowoConfig, *tokens: str) -> list[int]:
    return [config.special_token_id(token) for token in tokens]


def _cat(parts: list, device: torch.device) -> torch.Tensor:
    return torch.cat([torch.as_tensor(part, dtype=torch.long, device=device).reshape(-1) for part in parts])


def recon_inputs(
    config: ShowoConfig,
    text_ids: Sequence[Sequence[int]],
    condition_ids: torch.Tensor,
    target_ids: torch.Tensor,
    target_labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The VQ variant's reconstruction sequence and labels (the authors' ``t2i_recon_prompt``).

    ``[PAD]... <|mmu|> <|soi|> condition <|eoi|> <bos> text <eos> <|soi|> target <|eoi|>``: the pads, ``<|mmu|>``
    and ``<bos> text <eos>`` fill ``max_seq_length + 1`` slots; a longer text is kept whole (no pads, a longer
    sequence), as theirs. ``condition_ids`` / ``target_ids`` are LLM ids (codes plus `code_offset`; masked target
    slots hold `mask_token_id`); ``target_labels`` are LLM ids at masked slots, `IGNORE_INDEX` elsewhere. Labels are
    `IGNORE_INDEX` outside the target. Returns ``(input_ids, labels)``, each ``(B, L)``.
    """
    bos, eos = config.llm_config.bos_token_id, config.llm_config.eos_token_id
    (pad,) = _ids(config, "[PAD]")
    mmu, soi, eoi = _ids(config, "<|mmu|>", "<|soi|>", "<|eoi|>")
    device = target_ids.device
    rows, labels = [], []
    for i, text in enumerate(text_ids):
        text = [*_with_bos(text, bos), eos]
        pads = [pad] * max(0, config.max_seq_length - len(text))
        rows.append(_cat([pads, [mmu, soi], condition_ids[i], [eoi], text, [soi], target_ids[i], [eoi]], device))
        ignored = len(pads) + 3 + condition_ids.shape[1] + len(text) + 1
        labels.append(_cat([[IGNORE_INDEX] * ignored, target_labels[i], [IGNORE_INDEX]], device))
    return _stack(rows, "text"), _stack(labels, "text")


def _stack(rows: list[torch.Tensor], what: str) -> torch.Tensor:
    lengths = {len(row) for row in rows}
    if len(lengths) > 1:
        raise ValueError(
            f"Show-o sequences of one batch must have one length, got {sorted(lengths)}: a {what} is longer than "
            "the budget (max_seq_length / clip_text_length); shorten it or raise the budget."
        )
    return torch.stack(rows)


def clip_recon_inputs(
    config: ShowoConfig,
    text_ids: Sequence[Sequence[int]],
    target_ids: torch.Tensor,
    target_labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CLIP variant's reconstruction ids and labels without the feature slots (``t2i_clip_recon_prompt``).

    ``<|mmu|> <|soi|> <|eoi|> <bos> text <eos> [PAD]... <|soi|> target <|eoi|>``, the first part right-padded to
    ``clip_text_length``; `ShowoModel.embed_with_features` puts the projected CLIP features after position 1 (so the
    sequence the LLM sees reads ``<|mmu|> <|soi|> features <|eoi|> ...``). A text that does not fit is refused (the
    authors' ``assert False``). The labels are theirs too: the ids of the text part (pads ignored) and the target
    labels; only the target slice enters `recon_loss`.
    """
    bos, eos = config.llm_config.bos_token_id, config.llm_config.eos_token_id
    (pad,) = _ids(config, "[PAD]")
    mmu, soi, eoi = _ids(config, "<|mmu|>", "<|soi|>", "<|eoi|>")
    device = target_ids.device
    rows, labels = [], []
    for i, text in enumerate(text_ids):
        head = [mmu, soi, eoi, *_with_bos(text, bos), eos]
        if len(head) > config.clip_text_length:
            raise ValueError(
                f"clip_recon_inputs: text {i} takes {len(head)} of the {config.clip_text_length} text slots "
                "(clip_text_length, with <|mmu|> <|soi|> <|eoi|> <bos> <eos>); shorten the prompt."
            )
        head += [pad] * (config.clip_text_length - len(head))
        rows.append(_cat([head, [soi], target_ids[i], [eoi]], device))
        row_labels = _cat([head, [soi], target_labels[i], [eoi]], device)
        labels.append(torch.where(row_labels == pad, IGNORE_INDEX, row_labels))
    return torch.stack(rows), torch.stack(labels)


def mmu_inputs(
    config: ShowoConfig, image_ids: torch.Tensor, text_ids: torch.Tensor, text_labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The VQ variant's image-to-text sequence: ``<|mmu|> <|soi|> image <|eoi|> text`` (``text_ids`` already
    tokenised and padded as the LLaVA data gives them), labels `IGNORE_INDEX` over the image part."""
    batch = image_ids.shape[0]
    mmu, soi, eoi = (
        torch.full((batch, 1), i, device=image_ids.device) for i in _ids(config, "<|mmu|>", "<|soi|>", "<|eoi|>")
    )
    input_ids = torch.cat([mmu, soi, image_ids, eoi, text_ids.to(image_ids.device)], dim=1).long()
    ignored = torch.full((batch, image_ids.shape[1] + 3), IGNORE_INDEX, device=image_ids.device)
    return input_ids, torch.cat([ignored, text_labels.to(image_ids.device)], dim=1).long()


def clip_mmu_inputs(
    config: ShowoConfig, text_ids: torch.Tensor, text_labels: torch.Tensor, system_ids: Sequence[int] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CLIP variant's image-to-text ids and labels without the feature slots (the authors' ``llava_tuning``
    layout): ``<|mmu|> system <|soi|> <|eoi|> text``; `ShowoModel.embed_with_features` with
    ``at=2 + len(system_ids)`` puts the features between ``<|soi|>`` and ``<|eoi|>``. Labels ignore all but the
    text's own."""
    batch, device = text_ids.shape[0], text_ids.device
    mmu, soi, eoi = _ids(config, "<|mmu|>", "<|soi|>", "<|eoi|>")
    head = torch.tensor([mmu, *system_ids, soi, eoi], device=device).expand(batch, -1)
    ignored = torch.full(head.shape, IGNORE_INDEX, device=device)
    return torch.cat([head, text_ids], dim=1).long(), torch.cat([ignored, text_labels.to(device)], dim=1).long()


def t2i_inputs(config: ShowoConfig, text_ids: Sequence[Sequence[int]], image_ids: torch.Tensor) -> torch.Tensor:
    """The text-to-image sequence (``t2i_gen_prompt``): ``[PAD]... <|t2i|> <bos> text <eos> <|soi|> image <|eoi|>``,
    left-padded to ``max_seq_length + 1`` text slots; a longer text is cut and ends with ``<eos>``."""
    bos, eos = config.llm_config.bos_token_id, config.llm_config.eos_token_id
    pad, t2i, soi, eoi = _ids(config, "[PAD]", "<|t2i|>", "<|soi|>", "<|eoi|>")
    budget = config.max_seq_length + 1
    rows = []
    for i, text in enumerate(text_ids):
        text = [t2i, *_with_bos(text, bos), eos]
        text = [pad] * (budget - len(text)) + text if len(text) <= budget else [*text[: budget - 1], eos]
        rows.append(_cat([text, [soi], image_ids[i], [eoi]], image_ids.device))
    return torch.stack(rows)


def _image_segments(input_ids: torch.Tensor, soi: int, eoi: int) -> torch.Tensor:
    """Positions inside an image, ``<|soi|>`` and ``<|eoi|>`` included."""
    is_soi, is_eoi = input_ids == soi, input_ids == eoi
    return (is_soi.cumsum(1) > is_eoi.cumsum(1)) | is_soi | is_eoi


def _last_pad(input_ids: torch.Tensor, pad: int) -> torch.Tensor:
    """The last pad position per row, -1 where a row has none."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return torch.where(input_ids == pad, positions, -1).amax(dim=1)


def t2i_attention_mask(
    config: ShowoConfig, input_ids: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Show-o's text-to-image omni-attention (``create_attention_mask_predict_next`` with ``rm_pad_in_image``):
    causal text, image rows see every token; rows after the last pad see no position up to it."""
    pad, soi, eoi = _ids(config, "[PAD]", "<|soi|>", "<|eoi|>")
    length = input_ids.shape[1]
    positions = torch.arange(length, device=input_ids.device)
    causal = positions[:, None] >= positions[None, :]
    in_image = _image_segments(input_ids, soi, eoi)
    allowed = causal[None] | in_image[:, :, None]
    last_pad = _last_pad(input_ids, pad)[:, None, None]
    allowed &= ~((positions[None, :, None] > last_pad) & (positions[None, None, :] <= last_pad))
    return additive_mask(allowed, dtype)


def recon_attention_mask(
    config: ShowoConfig, input_ids: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The VQ reconstruction mask (``create_attention_mask_predict_next_recon``).

    Text is causal; the condition block (its ``<|soi|>`` to ``<|eoi|>``) attends within itself and to ``<|mmu|>``,
    nothing after its ``<|eoi|>``; the target block attends to every token after the pads; no row after the pads sees
    a pad; pad rows attend causally to earlier pads. (The authors' code stops on a row without pads; here such a row
    simply has none to hide.)
    """
    pad, soi, eoi = _ids(config, "[PAD]", "<|soi|>", "<|eoi|>")
    length = input_ids.shape[1]
    positions = torch.arange(length, device=input_ids.device)
    rows, cols = positions[None, :, None], positions[None, None, :]
    last_pad = _last_pad(input_ids, pad)[:, None, None]
    first_soi = (input_ids == soi).int().argmax(dim=1)[:, None, None]
    first_eoi = (input_ids == eoi).int().argmax(dim=1)[:, None, None]
    after_pads = (rows > last_pad) & (cols <= last_pad)
    text = (rows >= cols) & ~after_pads
    image = ~(
        ((rows >= first_soi) & (cols <= last_pad)) | ((rows >= first_soi) & (rows <= first_eoi) & (cols > first_eoi))
    )
    in_image = _image_segments(input_ids, soi, eoi)[:, :, None]
    return additive_mask(torch.where(in_image, image, text), dtype)


def mmu_attention_mask(
    config: ShowoConfig, input_ids: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The VQ image-to-text mask (``create_attention_mask_for_mmu``): causal, plus every row sees the image prefix up
    to the first row's ``<|eoi|>`` (the authors use row 0's position for the batch); pads are not masked."""
    (eoi,) = _ids(config, "<|eoi|>")
    length = input_ids.shape[1]
    positions = torch.arange(length, device=input_ids.device)
    found = (input_ids[0] == eoi).nonzero()
    if len(found) == 0:
        raise ValueError("mmu_attention_mask: the first row has no <|eoi|>; build the rows with mmu_inputs.")
    prefix_end = int(found[0])
    allowed = (positions[:, None] >= positions[None, :]) | (positions[None, :] <= prefix_end)
    return additive_mask(allowed.expand(input_ids.shape[0], length, length), dtype)


def clip_recon_attention_mask(
    config: ShowoConfig, input_ids: torch.Tensor, num_features: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The CLIP reconstruction mask (``create_attention_mask_for_mmu_vit_recon``) over the sequence with the
    ``num_features`` CLIP slots inserted after position 1 (``input_ids`` from `clip_recon_inputs`, without them).

    Causal; every row sees the feature slots; the target codes attend to each other; no row sees a pad column.
    """
    (pad,) = _ids(config, "[PAD]")
    batch = input_ids.shape[0]
    slots = torch.full((batch, num_features), IGNORE_INDEX, dtype=input_ids.dtype, device=input_ids.device)
    full = torch.cat([input_ids[:, :2], slots, input_ids[:, 2:]], dim=1)
    length, n = full.shape[1], config.num_vq_tokens
    positions = torch.arange(length, device=input_ids.device)
    rows, cols = positions[:, None], positions[None, :]
    allowed = (rows >= cols) | ((cols >= 2) & (cols < 2 + num_features))
    target = (rows >= length - 1 - n) & (rows < length - 1) & (cols >= length - 1 - n) & (cols < length - 1)
    allowed = (allowed | target)[None] & (full != pad)[:, None, :]
    return additive_mask(allowed, dtype)


def clip_mmu_attention_mask(
    length: int, batch: int, num_features: int, system_prompt_length: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The CLIP image-to-text mask (``create_attention_mask_for_mmu_vit``): causal, and every row sees the
    ``num_features`` feature slots after ``<|mmu|>``, the system prompt and ``<|soi|>``."""
    positions = torch.arange(length)
    start = 2 + system_prompt_length
    allowed = (positions[:, None] >= positions[None, :]) | (
        (positions[None, :] >= start) & (positions[None, :] < start + num_features)
    )
    return additive_mask(allowed.expand(batch, length, length), dtype)


def cosine_schedule(t: torch.Tensor) -> torch.Tensor:
    """The share of tokens masked at time ``t`` in [0, 1]: ``cos(pi t / 2)``."""
    return torch.cos(t * math.pi * 0.5)


def mask_image_tokens(
    image_ids: torch.Tensor,
    mask_token_id: int,
    *,
    generator: torch.Generator | None = None,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    min_masking_rate: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The authors' ``mask_or_random_replace_tokens`` (``noise_type: mask``) on ``(B, N)`` image ids.

    Per row ``t ~ U[0, 1)``, mask share ``cos(pi t / 2)`` (at least ``min_masking_rate``), ``count = round(N * share)``
    (half to even), at least 1; slot ``j`` is masked when ``argsort(noise)[j] < count`` with ``noise ~ U[0, 1)^(B, N)``
    (its rank in the permutation, as theirs). ``t`` then ``noise`` are drawn from ``generator`` unless given (the
    authors' order). Returns ``(input_ids, labels, mask_prob)``: masked slots hold ``mask_token_id``, labels hold the
    ids there and `IGNORE_INDEX` elsewhere.
    """
    batch, length = image_ids.shape
    draw = {"generator": generator, "device": generator.device if generator is not None else image_ids.device}
    if timesteps is None:
        timesteps = torch.rand(batch, **draw)
    if noise is None:
        noise = torch.rand(batch, length, **draw)
    timesteps, noise = timesteps.to(image_ids.device), noise.to(image_ids.device)
    mask_prob = cosine_schedule(timesteps).clip(min_masking_rate)
    count = (length * mask_prob).round().clamp(min=1)
    mask = noise.argsort(dim=-1) < count[:, None]
    input_ids = torch.where(mask, mask_token_id, image_ids)
    labels = torch.where(mask, image_ids, IGNORE_INDEX)
    return input_ids, labels, mask_prob


def recon_loss(logits: torch.Tensor, labels: torch.Tensor, num_vq_tokens: int, reduction: str = "mean") -> torch.Tensor:
    """The masked-token cross-entropy on the **unshifted** logits of the target block, ``[:, -1 - N:-1]``.

    ``reduction="mean"`` is the authors' (a mean over every masked slot of the batch); ``"none"`` gives each row's
    mean over its own masked slots, ``(B,)``.
    """
    logits = logits[:, -1 - num_vq_tokens : -1].float()
    labels = labels[:, -1 - num_vq_tokens : -1]
    return _cross_entropy(logits, labels, reduction, "recon_loss")


def mmu_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy (logits at ``i`` predict label ``i + 1``); reductions as `recon_loss`."""
    return _cross_entropy(logits[:, :-1].float(), labels[:, 1:], reduction, "mmu_loss")


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str, name: str) -> torch.Tensor:
    if reduction == "mean":
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    if reduction != "none":
        raise ValueError(f"{name}: reduction={reduction!r}; use 'mean' (the authors') or 'none' (per row).")
    per_token = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    counted = (labels != IGNORE_INDEX).sum(dim=1)
    return per_token.sum(dim=1) / counted.clamp(min=1)
