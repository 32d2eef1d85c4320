"""Applying a freeze policy, and the table of trainable and frozen parameters per module group."""

from __future__ import annotations

from torch import nn

from .adapters.base import UMMAdapter
from .adapters.helpers import unwrap_model
from .dotted import matches

_MANAGED = "_reca_freeze_managed"  # marks a parameter whose requires_grad a freeze policy has set


def auto_freeze(adapter: UMMAdapter) -> tuple[str, ...]:
    """What ``freeze="auto"`` freezes: image tokenizers and understanding-only modules for every model, the
    adapter's own extras (``default_freeze``), and for decoupled models the whole understanding path."""
    patterns = [*adapter.tokenizer_modules, *adapter.understanding_modules, *adapter.default_freeze]
    if adapter.parameter_sharing == "decoupled":
        patterns += adapter.shared_modules
    return tuple(dict.fromkeys(patterns))


def resolve_freeze(adapter: UMMAdapter, freeze: str | list[str]) -> tuple[str, ...]:
    if freeze == "auto":
        return auto_freeze(adapter)
    if freeze == "none":
        return ()
    return tuple([freeze] if isinstance(freeze, str) else freeze)


def apply_freeze(model: nn.Module, adapter: UMMAdapter, freeze: str | list[str] = "auto") -> list[str]:
    """Set ``requires_grad`` from the policy: frozen where a pattern matches, trainable elsewhere.

    A parameter that was already frozen before any policy touched it (one the model creates with
    ``requires_grad=False``, such as a fixed sin-cos position table, or one PEFT froze) stays frozen whatever the
    policy says. Returns the names of the frozen parameters. An explicit pattern that matches nothing is an error.
    """
    patterns = resolve_freeze(adapter, freeze)
    named = list(unwrap_model(model).named_parameters())
    if freeze not in ("auto", "none"):
        unused = [p for p in patterns if not any(matches(name, [p]) for name, _ in named)]
        if unused:
            raise ValueError(
                f"freeze patterns {unused} match no parameter of the model (names look like {named[0][0]!r})"
            )
    frozen = []
    for name, parameter in named:
        if not parameter.requires_grad and not getattr(parameter, _MANAGED, False):
            frozen.append(name)  # frozen by the model itself (e.g. fixed position tables): never re-enabled
            continue
        parameter.requires_grad_(not matches(name, patterns))
        setattr(parameter, _MANAGED, True)  # ours from now on: a later policy (a resume) may change it
        if not parameter.requires_grad:
            frozen.append(name)
    adapter.after_freeze(model, frozen)
    return frozen


def parameter_table(model: nn.Module, adapter: UMMAdapter) -> dict[str, dict[str, int]]:
    """Trainable and frozen parameter counts per module group (first matching group wins; else "other")."""
    groups = adapter.module_groups()
    table = {group: {"trainable": 0, "frozen": 0} for group in [*groups, "other"]}
    for name, parameter in unwrap_model(model).named_parameters():
        group = next((g for g, patterns in groups.items() if matches(name, patterns)), "other")
        table[group]["trainable" if parameter.requires_grad else "frozen"] += parameter.numel()
    if not any(table["other"].values()):
        del table["other"]
    return table


def format_table(table: dict[str, dict[str, int]], title: str) -> str:
    rows = [(group, counts["trainable"], counts["frozen"]) for group, counts in table.items()]
    rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows)))
    width = max(len(r[0]) for r in rows)
    lines = [title, f"{'group':<{width}}  {'trainable':>14}  {'frozen':>14}"]
    lines += [f"{group:<{width}}  {trainable:>14,}  {frozen:>14,}" for group, trainable, frozen in rows]
    return "\n".join(lines)
