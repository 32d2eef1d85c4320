"""What an adapter's generator predicts, and how to fix every random draw of its loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch

TARGET_KINDS = ("autoregressive_tokens", "masked_tokens", "diffusion", "flow")
TOKEN_KINDS = ("autoregressive_tokens", "masked_tokens")


@dataclass(frozen=True)
class GenerationTarget:
    """The kind of generation target an adapter trains.

    ``kind``: ``"autoregressive_tokens"`` (Janus, Emu3), ``"masked_tokens"`` (Show-o), ``"diffusion"``
    (Harmon's per-token diffusion head) or ``"flow"`` (flow matching on autoencoder latents: OpenUni,
    BAGEL). ``codebook_size`` is the number of codes of a token target (its log is the uniform-guess
    loss); continuous targets have none.
    """

    kind: str
    codebook_size: int | None = None

    def __post_init__(self):
        if self.kind not in TARGET_KINDS:
            raise ValueError(f"GenerationTarget kind={self.kind!r}: choose one of {', '.join(TARGET_KINDS)}")
        if self.is_tokens and self.codebook_size is not None and self.codebook_size < 2:
            raise ValueError(f"GenerationTarget codebook_size={self.codebook_size!r}: a codebook has 2 or more codes")
        if not self.is_tokens and self.codebook_size is not None:
            raise ValueError(f"GenerationTarget kind={self.kind!r} is continuous: it has no codebook_size")

    @property
    def is_tokens(self) -> bool:
        return self.kind in TOKEN_KINDS


@dataclass(frozen=True)
class LossNoise:
    """Every random draw of one generation loss, fixed.

    ``seed`` seeds the ``torch.Generator`` that all draws come from (Gaussian noise, timesteps, masks,
    orders, posterior samples). ``timesteps`` in [0, 1] replace the drawn noise levels: sample ``i`` uses
    ``timesteps[i % len(timesteps)]`` (an adapter maps the level to its own scale: a flow sigma, a DDPM
    step, a mask probability). ``mask_ratio`` fixes the masked share of a masked-token or MAR target.
    Two loss calls on the same batch with the same ``LossNoise`` return the same value.
    """

    seed: int
    timesteps: tuple[float, ...] | None = None
    mask_ratio: float | None = None

    def __post_init__(self):
        if self.timesteps is not None:
            levels = tuple(float(t) for t in self.timesteps)
            if not levels or any(not 0.0 <= t <= 1.0 for t in levels):
                raise ValueError(f"LossNoise timesteps={self.timesteps!r}: give one or more levels in [0, 1]")
            object.__setattr__(self, "timesteps", levels)
        if self.mask_ratio is not None and not 0.0 < self.mask_ratio <= 1.0:
            raise ValueError(f"LossNoise mask_ratio={self.mask_ratio!r}: choose a value in (0, 1]")

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed)

    def levels(self, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The fixed noise level of each of ``batch_size`` samples, or None when they are drawn."""
        if self.timesteps is None:
            return None
        return torch.tensor([self.timesteps[i % len(self.timesteps)] for i in range(batch_size)], device=device)


def reduce_loss(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    """``"mean"`` (a scalar) or ``"none"`` (one loss per sample, ``(B,)``)."""
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"reduction={reduction!r}: choose 'mean' or 'none'")


def per_sample_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``(B,)``: each sample's mean cross-entropy over its labelled tokens (``logits`` ``(B, T, V)``,
    ``labels`` ``(B, T)``, ``ignore_index`` unlabelled)."""
    per_token = torch.nn.functional.cross_entropy(
        logits.float().transpose(1, 2), labels, reduction="none", ignore_index=ignore_index
    )
    counted = (labels != ignore_index).sum(1).clamp(min=1)
    return per_token.sum(1) / counted
