"""Locating the data folders that ship with reca_hf (prompts, recipes, model card templates).

In a wheel they live in ``reca_hf/_data/<name>``; in a source checkout or an editable install they are
the top-level folders of the repository.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    """Return the folder ``name`` ("prompts", "recipes" or "model_cards") of this installation."""
    for candidate in (_PACKAGE_DIR / "_data" / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"reca_hf's {name!r} folder is missing from this installation (looked in {_PACKAGE_DIR / '_data'} "
        f"and {_PACKAGE_DIR.parent}); reinstall the package."
    )
