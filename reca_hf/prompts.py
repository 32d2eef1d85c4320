"""Reconstruction instructions: loading the templates and the seeded per-example draw.

RecA conditions generation on an image's understanding embeddings *plus* a generic "describe the
image" instruction. The guide recommends many diverse instructions (several hundred) over a single
one: it helps some models a lot and never hurts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ._resources import resource_dir

DEFAULT_PROMPTS_FILE = "reconstruction.txt"


def load_prompts(path: str | Path | None = None) -> list[str]:
    """Load reconstruction instructions.

    Args:
        path: ``None`` or ``"default"`` for the project's templates; otherwise a text file with one
            instruction per line (blank lines and lines starting with ``#`` are skipped) or a ``.json``
            file holding a list of strings.

    Returns:
        The instructions, in file order, stripped of surrounding whitespace.
    """
    if path is None or str(path) == "default":
        path = resource_dir("prompts") / DEFAULT_PROMPTS_FILE
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt_templates={str(path)!r}: no such file. Give a text file with one instruction per line, "
            "a JSON list of strings, or 'default'."
        )
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        prompts = json.loads(text)
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt_templates={str(path)!r}: a JSON prompt file must hold a list of strings.")
    else:
        prompts = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    prompts = [p.strip() for p in prompts if p.strip()]
    if not prompts:
        raise ValueError(f"prompt_templates={str(path)!r} holds no instructions.")
    return prompts


class PromptSampler:
    """Draws one instruction per example from ``(seed, epoch, index)`` alone.

    Because a draw depends on nothing else (no running state), a run is reproducible with any number
    of dataloader workers, and a run resumed from a checkpoint sees exactly the draws an
    uninterrupted run would have seen.
    """

    def __init__(self, prompts: list[str], null_prompt: str | None, dropout_prob: float = 0.0, seed: int = 0):
        if not prompts:
            raise ValueError("PromptSampler needs at least one prompt.")
        self.prompts = list(prompts)
        self.null_prompt = null_prompt
        self.dropout_prob = dropout_prob
        self.seed = seed

    def draw(self, index: int, epoch: int = 0) -> tuple[str | None, bool]:
        """Return ``(instruction, dropped)`` for dataset row ``index`` in ``epoch``.

        ``dropped`` is True when the instruction was replaced by the null prompt (prompt dropout,
        which trains the branch that classifier-free guidance contrasts against); a null prompt of None
        (no instruction at all) is returned as None.
        """
        rng = np.random.default_rng([self.seed, epoch, index])
        choice = int(rng.integers(len(self.prompts)))
        dropped = bool(rng.random() < self.dropout_prob)
        return (self.null_prompt if dropped else self.prompts[choice]), dropped

    def template(self, index: int, epoch: int = 0) -> str:
        """The instruction drawn for ``(index, epoch)`` without prompt dropout (image-to-text questions)."""
        rng = np.random.default_rng([self.seed, epoch, index])
        return self.prompts[int(rng.integers(len(self.prompts)))]
