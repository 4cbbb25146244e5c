"""The study scripts in examples/ refuse bad arguments with a one-line usage error before doing any work
(they trained for minutes, or wrote data and pretrained a tower, then died in a traceback)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"


def _main(name: str, monkeypatch):
    """The script's main(), with its first piece of real work replaced by a failure."""
    spec = importlib.util.spec_from_file_location(f"{name}_example", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)

    def work_started(*args, **kwargs):
        raise AssertionError(f"{name} started work on bad arguments")

    first_work = {"typographic_study": "classification_set", "lit_design_study": "write_synthetic"}[name]
    monkeypatch.setattr(module, first_work, work_started)
    return module.main


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("typographic_study", ["--text-rate", "2"], "--text-rate must be in (0, 1], got 2"),
        ("typographic_study", ["--text-rate", "0"], "--text-rate must be in (0, 1], got 0"),
        ("typographic_study", ["--per-class", "0"], "--per-class must be >= 1, got 0"),
        ("typographic_study", ["--steps", "-5"], "--steps must be >= 1 and --minutes > 0"),
        ("lit_design_study", ["--policies", "LU,XY"], "--policies: LiT policy 'XY' must be two letters"),
        ("lit_design_study", ["--steps", "0"], "--steps must be >= 1, got 0"),
        ("lit_design_study", ["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ],
)
def test_bad_arguments_are_one_line_usage_errors(script, argv, message, monkeypatch, capsys, tmp_path):
    main = _main(script, monkeypatch)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--out", str(tmp_path / "out"), *argv])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    assert f"error: {message}" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()
