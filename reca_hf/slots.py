"""Checks on a batch's layout that read a count from the device, done once per layout rather than every step.

Reading a number off an accelerator (``int(mask.sum())``) makes the host wait for every queued kernel: a
host-device sync that stalls the step. What these checks guard (a prompt's image slots against the features or
codes that fill them, the padding side) is fixed by the shapes the collator produces, and the collator checks
every prompt's slots on the CPU already, so each distinct layout is checked once.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable


def check_once(checked: set, key: Hashable, problem: Callable[[], str | None]) -> None:
    """Raise ``ValueError(problem())`` when ``problem()`` reports one; each ``key`` (the layout that fixes the
    answer, e.g. the image shapes) is checked once and remembered in ``checked``."""
    if key in checked:
        return
    message = problem()
    if message:
        raise ValueError(message)
    checked.add(key)


def slot_count_problem(mask, expected: int, message: str) -> Callable[[], str | None]:
    """``problem`` for :func:`check_once`: ``mask`` marks other than ``expected`` slots; ``message`` is formatted
    with ``found`` and ``expected``."""

    def problem() -> str | None:
        found = int(mask.sum())
        return None if found == expected else message.format(found=found, expected=expected)

    return problem
