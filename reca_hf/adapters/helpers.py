"""Helpers the architecture adapters share: eval mode, decoding steps, padding, answer losses, unwrapping.

Nothing here knows an architecture; each function is a step several adapters take the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Run ``module`` in eval mode inside the block, then give every submodule back its own training flag.

    Per submodule, not ``module.train(was_training)``: a frozen image tokenizer kept in eval mode inside a
    training model (e.g. Emu3's BatchNorm VQ) must stay in eval mode afterwards, or encoding would use batch
    statistics and overwrite its running ones.
    """
    modes = [(submodule, submodule.training) for submodule in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for submodule, training in modes:
            submodule.training = training


def next_code(
    logits: torch.Tensor, guidance: float, do_sample: bool, temperature: float, generator: torch.Generator | None
) -> torch.Tensor:
    """One decoding step over a codebook: classifier-free guidance (``logits`` holds the conditional rows, then
    the unconditional ones, when ``guidance != 1``), then sampling at ``temperature`` or the argmax."""
    logits = logits.float()
    if guidance != 1.0:
        conditional, unconditional = logits.chunk(2)
        logits = unconditional + guidance * (conditional - unconditional)
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits / max(temperature, 1e-5), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(sequences: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``(ids, attention_mask)`` tensors (prompts end where generation starts)."""
    width = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), width), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            ids[row, -len(sequence) :] = torch.tensor(sequence)
            mask[row, -len(sequence) :] = 1
    return ids, mask


CACHED_PREFIX = "cached_"  # batch keys of precomputed frozen features (see UMMAdapter.frozen_features)


def cached_key(name: str) -> str:
    """The batch key under which a precomputed frozen feature ``name`` travels, e.g. ``cached_target_codes``."""
    return CACHED_PREFIX + name


IGNORE_INDEX = -100  # label of positions without a loss


def answer_batch(tokenizer, prompts: list[str], answers: list[str], add_special_tokens: bool = True):
    """Image-to-text sequences: each prompt, then its answer and EOS; ``labels`` cover the answers only.

    Returns ``(input_ids, attention_mask, labels)``, left-padded.
    """
    sequences, labels = [], []
    for prompt, answer in zip(prompts, answers):
        prompt_ids = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
        reply = tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        sequences.append(prompt_ids + reply)
        labels.append([IGNORE_INDEX] * len(prompt_ids) + reply)
    input_ids, attention_mask = left_pad(sequences, tokenizer.pad_token_id)
    return input_ids, attention_mask, left_pad(labels, IGNORE_INDEX)[0]


def answer_length(labels: torch.Tensor) -> int:
    """How many trailing positions of left-padded ``labels`` hold answer tokens, read where the batch is made (on
    the CPU): :func:`answer_loss` then scores that fixed span instead of selecting positions by value, which
    would make the step wait for the device."""
    labelled = (labels != IGNORE_INDEX).any(0)
    return int(labels.shape[1] - int(labelled.int().argmax())) if bool(labelled.any()) else 0


def answer_loss(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, length: int | None = None):
    """Next-token cross-entropy of the labelled (answer) positions; the head runs on the answers' span only.

    ``length`` (:func:`answer_length`, from the batch) is the span: the last positions, padding inside it ignored.
    Without it the labelled positions are selected by value (one host-device sync).
    """
    if length is None:
        labels = labels[:, 1:].to(hidden.device)
        answer = labels != IGNORE_INDEX
        logits = head(hidden[:, :-1][answer])
        return torch.nn.functional.cross_entropy(logits.float(), labels[answer])
    length = max(1, min(length, labels.shape[1] - 1))  # the first position has nothing before it to predict it
    labels = labels[:, -length:].to(hidden.device)
    logits = head(hidden[:, -length - 1 : -1])
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's weights are (a plain ``torch.nn.Module`` has no ``.device``)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def unwrap_model(model):
    """The transformers model under PEFT / DDP / compile wrappers (LoRA layers stay injected in it)."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
