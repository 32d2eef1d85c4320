"""Dotted names: objects named by dotted paths (``"package.module:Name"``: adapter classes, model classes), and
module patterns matched against dotted parameter names."""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable


def matches(name: str, patterns: Iterable[str]) -> bool:
    """True when a pattern fully matches ``name`` or one of its dotted prefixes (module paths).

    Full matching keeps a pattern like ``model.aligner`` from catching ``model.generation_aligner``.
    """
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(re.fullmatch(pattern, prefix) for pattern in patterns for prefix in prefixes)


def import_object(path: str, field: str):
    """The object a dotted path names: ``"package.module:name"`` or ``"package.module.name"``; a ValueError
    naming ``field`` and the fix when it cannot be imported."""
    module_name, sep, attribute = path.partition(":")
    if not sep:
        module_name, _, attribute = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(
            f"{field}={path!r} cannot be imported ({type(error).__name__}: {error}); name it as "
            "'package.module:Name' with the package installed or its folder on PYTHONPATH"
        ) from error
