"""The house rules the suite keeps: the import layers of pyproject.toml (import-linter) and ruff's lint."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert found, f"{name} is not installed: pip install -e '.[test]' (the test extras include it)"
    return found


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_imports_point_one_way_and_architecture_folders_are_independent():
    result = _run([_tool("lint-imports"), "--no-cache"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_ruff_finds_nothing():
    result = _run([sys.executable, "-m", "ruff", "check", "reca_hf", "tests"])
    assert result.returncode == 0, result.stdout + result.stderr
