"""Imports point down the layers and form no cycles: the import-linter contracts of pyproject.toml
([tool.importlinter], the layer picture of docs/architecture.md), run on the package, and run on a
fake package with one upward import and one cycle to show that the check can fail."""

from __future__ import annotations

import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import clipforge

pytest.importorskip("importlinter")

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
PACKAGE_PARENT = Path(clipforge.__file__).resolve().parents[1]  # src/ of the clipforge under test


def _lint(config: Path, path: Path) -> subprocess.CompletedProcess:
    """`lint-imports <config>` with `path` first on the import path (the package analysed is found there)."""
    code = "from importlinter.cli import lint_imports_command; lint_imports_command()"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(path), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-c", code, str(config), "--no-cache"],
        capture_output=True,
        text=True,
        env=env,
        cwd=config.parent,
        timeout=300,
    )


def _layers() -> list[str]:
    """The module names of the layers contract, optional ones included, top layer first."""
    from importlinter import api

    contracts = api.read_configuration(str(PYPROJECT))["contracts_options"]
    (layers,) = [c["layers"] for c in contracts if c["type"] == "layers"]
    return [name.strip("() ") for layer in layers for name in re.split(r"[|:]", layer)]


def test_imports_point_down_the_layers_without_cycles():
    result = _lint(PYPROJECT, PACKAGE_PARENT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def test_every_top_level_module_sits_in_a_layer():
    """A new top-level module must be placed in the layer picture, or nothing checks its imports."""
    declared = set(_layers())
    modules = {m.name for m in pkgutil.iter_modules(clipforge.__path__)} - {"__main__"}
    assert modules - declared == set(), "add these modules to the layers in pyproject.toml"


def test_the_check_catches_an_upward_import_and_a_cycle(tmp_path):
    """The same contracts on a fake `clipforge` made of empty layer modules plus two bad imports, one
    inside a function (import-linter sees those too)."""
    pkg = tmp_path / "clipforge"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in _layers():
        if name not in ("serve", "use"):  # optional layers
            (pkg / f"{name}.py").write_text("")
    (pkg / "config.py").write_text("def f():\n    from . import train\n")  # bottom layer imports up
    (pkg / "tokenizer.py").write_text("from . import bpe_train\n")  # same layer, a cycle
    (pkg / "bpe_train.py").write_text("from . import tokenizer\n")
    config = tmp_path / "pyproject.toml"
    config.write_text(PYPROJECT.read_text(encoding="utf-8"), encoding="utf-8")

    result = _lint(config, tmp_path)
    assert result.returncode != 0
    assert "Contracts: 0 kept, 2 broken." in result.stdout, result.stdout + result.stderr
    assert "clipforge.config is not allowed to import clipforge.train" in result.stdout
    assert re.search(r"\.tokenizer -> \.bpe_train|\.bpe_train -> \.tokenizer", result.stdout)
