"""Key maps from the authors' published checkpoints to reca_hf's models, refused with one error naming every problem.

Every ``reca convert <arch>`` converter describes its checkpoint layout as a :class:`KeyMap` (ordered rules: a
regular expression over the checkpoint key, the model key it becomes, an optional tensor transform), maps the
checkpoint with it and checks the result against the model's own state dict with :func:`check_checkpoint`. A
checkpoint with an unknown key, a missing key and a mis-shaped tensor then fails once, with all three named,
instead of three runs each finding the next problem (or torch's bare ``size mismatch``). Where a checkpoint repeats
weights that come from elsewhere too (a frozen part also published on its own), :func:`value_differences` finds
the tensors that differ from that reference, and the same error names them, largest difference first.

A low module: it imports only torch, so every architecture folder can use it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

Transform = Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class KeyRule:
    """One rule of a :class:`KeyMap`.

    ``pattern`` must match a whole checkpoint key; ``target`` is the model key it becomes (a ``re`` replacement
    template: ``\\1`` names a group), a tuple of keys when ``transform`` splits the tensor (e.g. a fused ``qkv``),
    or None when the key is known and deliberately left out (the reason goes in ``why``).
    """

    pattern: str
    target: str | tuple[str, ...] | None
    transform: Transform | None = None
    why: str = ""


@dataclass
class MappedCheckpoint:
    """What a :class:`KeyMap` made of a checkpoint."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # model key -> tensor
    sources: dict[str, str] = field(default_factory=dict)  # model key -> the checkpoint key it came from
    skipped: list[str] = field(default_factory=list)  # checkpoint keys a rule left out on purpose
    unknown: list[str] = field(default_factory=list)  # checkpoint keys no rule matched
    duplicates: dict[str, list[str]] = field(default_factory=dict)  # model key -> the checkpoint keys mapped to it


class KeyMap:
    """Ordered :class:`KeyRule` s; the first rule whose pattern matches a key decides it."""

    def __init__(self, architecture: str, rules: Iterable[KeyRule | tuple]):
        self.architecture = architecture
        self.rules = [rule if isinstance(rule, KeyRule) else KeyRule(*rule) for rule in rules]
        self._compiled = [re.compile(rule.pattern) for rule in self.rules]

    def rename(self, key: str) -> tuple[KeyRule, re.Match] | None:
        """The rule deciding ``key`` and its match (None: no rule knows the key)."""
        for rule, pattern in zip(self.rules, self._compiled):
            match = pattern.fullmatch(key)
            if match:
                return rule, match
        return None

    def map(self, checkpoint: Mapping[str, torch.Tensor], prefix: str = "") -> MappedCheckpoint:
        """Apply the rules to every key of ``checkpoint``; model keys get ``prefix`` in front."""
        mapped = MappedCheckpoint()
        seen: dict[str, list[str]] = {}
        for key, tensor in checkpoint.items():
            found = self.rename(key)
            if found is None:
                mapped.unknown.append(key)
                continue
            rule, match = found
            if rule.target is None:
                mapped.skipped.append(key)
                continue
            targets = (rule.target,) if isinstance(rule.target, str) else rule.target
            values = rule.transform(tensor) if rule.transform is not None else tensor
            values = values if isinstance(values, tuple) else (values,)
            if len(values) != len(targets):
                raise ValueError(
                    f"convert {self.architecture}: the rule for {rule.pattern!r} makes {len(values)} tensors from "
                    f"{key!r} for {len(targets)} keys"
                )
            for target, value in zip(targets, values):
                name = prefix + match.expand(target)
                seen.setdefault(name, []).append(key)
                mapped.tensors[name] = value
                mapped.sources[name] = key
        mapped.duplicates = {name: keys for name, keys in seen.items() if len(keys) > 1}
        return mapped


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the model: every unknown, missing, mis-shaped and doubly mapped key at once."""

    def __init__(
        self,
        architecture: str,
        *,
        unknown: list[str] = (),
        missing: list[str] = (),
        mis_shaped: list[tuple[str, str, tuple, tuple]] = (),
        duplicates: Mapping[str, list[str]] | None = None,
        hint: str = "",
        differing: list[tuple[str, str, float]] = (),
    ):
        self.architecture = architecture
        self.unknown = list(unknown)
        self.missing = list(missing)
        self.mis_shaped = list(mis_shaped)  # (model key, checkpoint key, checkpoint shape, model shape)
        self.duplicates = dict(duplicates or {})
        self.differing = list(differing)  # (model key, checkpoint key, largest absolute difference), largest first
        parts = []
        if self.unknown:
            parts.append(f"{len(self.unknown)} checkpoint key(s) no rule of the key map knows: {listing(self.unknown)}")
        if self.missing:
            parts.append(f"{len(self.missing)} model key(s) the checkpoint does not provide: {listing(self.missing)}")
        if self.mis_shaped:
            shown = [
                f"{source!r} -> {key!r} has shape {tuple(got)}, the model expects {tuple(want)}"
                for key, source, got, want in self.mis_shaped
            ]
            parts.append(f"{len(shown)} tensor(s) of the wrong shape: {listing(shown, quote=False)}")
        if self.duplicates:
            shown = [f"{key!r} <- {', '.join(map(repr, sources))}" for key, sources in self.duplicates.items()]
            parts.append(
                f"{len(shown)} model key(s) mapped from several checkpoint keys: {listing(shown, quote=False)}"
            )
        if self.differing:
            shown = [f"{source!r} -> {key!r} differs by up to {diff:.3g}" for key, source, diff in self.differing]
            parts.append(
                f"{len(shown)} tensor(s) differ from the reference weights (largest first): "
                f"{listing(shown, limit=5, quote=False)}"
            )
        message = (
            f"convert {architecture}: the checkpoint does not fit the model, nothing was written.\n- "
            + "\n- ".join(parts)
        )
        super().__init__(message + (f"\n{hint}" if hint else ""))


def listing(items: list[str], limit: int = 12, quote: bool = True) -> str:
    """The first ``limit`` items, comma-separated, then how many more."""
    shown = ", ".join(repr(item) if quote else str(item) for item in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def value_differences(
    mapped: MappedCheckpoint,
    reference: Mapping[str, torch.Tensor],
    *,
    keys: Callable[[str], bool] | None = None,
    rtol: float = 1e-2,
    atol: float = 1e-5,
) -> list[tuple[str, str, float]]:
    """The mapped tensors that differ from ``reference`` (e.g. public weights the model loaded) beyond
    ``|a - b| <= atol + rtol * |b|`` anywhere, compared in float32: ``(model key, checkpoint key, largest absolute
    difference)``, largest first. Only keys both hold with one shape are compared (``keys`` narrows them); the
    default tolerance passes a bfloat16 copy of float32 weights."""
    found = []
    for key, tensor in mapped.tensors.items():
        other = reference.get(key)
        if other is None or (keys is not None and not keys(key)) or tuple(other.shape) != tuple(tensor.shape):
            continue
        a, b = tensor.detach().float(), other.detach().float()
        if not torch.all((a - b).abs() <= atol + rtol * b.abs()):
            found.append((key, mapped.sources.get(key, key), float((a - b).abs().max())))
    return sorted(found, key=lambda item: -item[2])


def check_checkpoint(
    mapped: MappedCheckpoint,
    expected: Mapping[str, torch.Tensor | torch.Size | tuple],
    *,
    architecture: str,
    required: Callable[[str], bool] | Iterable[str] | None = None,
    hint: str = "",
    differing: list[tuple[str, str, float]] = (),
) -> None:
    """Raise one :class:`CheckpointMismatchError` naming every problem of ``mapped`` against ``expected``.

    ``expected`` is the model's state dict (or key -> shape). A mapped key the model lacks counts as unknown (with
    the checkpoint key it came from); ``required`` says which model keys the checkpoint must provide (a predicate
    or a collection; default: every key of ``expected``), the rest come from elsewhere (public parts).
    ``differing`` (from :func:`value_differences`) are value mismatches the caller refuses, named in the same error.
    """
    shapes = {key: tuple(value.shape if isinstance(value, torch.Tensor) else value) for key, value in expected.items()}
    if required is None:
        needed = set(shapes)
    elif callable(required):
        needed = {key for key in shapes if required(key)}
    else:
        needed = set(required)
    unknown = list(mapped.unknown)
    unknown += [f"{mapped.sources.get(key, key)} (as {key})" for key in mapped.tensors if key not in shapes]
    missing = sorted(needed - mapped.tensors.keys())
    mis_shaped = [
        (key, mapped.sources.get(key, key), tuple(tensor.shape), shapes[key])
        for key, tensor in mapped.tensors.items()
        if key in shapes and tuple(tensor.shape) != shapes[key]
    ]
    if unknown or missing or mis_shaped or mapped.duplicates or differing:
        raise CheckpointMismatchError(
            architecture,
            unknown=unknown,
            missing=missing,
            mis_shaped=mis_shaped,
            duplicates=mapped.duplicates,
            hint=hint,
            differing=differing,
        )


def load_checked(
    model: torch.nn.Module,
    mapped: MappedCheckpoint,
    *,
    architecture: str,
    required: Callable[[str], bool] | Iterable[str] | None = None,
    hint: str = "",
) -> None:
    """:func:`check_checkpoint` against ``model``'s state dict, then load the tensors (keys not required keep the
    model's own values, e.g. public parts loaded before)."""
    state = model.state_dict()
    check_checkpoint(mapped, state, architecture=architecture, required=required, hint=hint)
    model.load_state_dict(mapped.tensors, strict=False)
