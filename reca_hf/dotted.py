"""Objects named by dotted paths (``"package.module:Name"``): adapter classes, model classes."""

from __future__ import annotations

import importlib


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
