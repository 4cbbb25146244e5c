"""benchmarks/gpu_check.py --dry-run: every section of the GPU check runs on the CPU with tiny presets
and its checks pass (the script is ready for a GPU machine; the GPU figures come from running it there)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from helpers import import_benchmark


@pytest.fixture
def gpu_check(monkeypatch):
    yield import_benchmark(monkeypatch, "gpu_check")
    sys.modules.pop("gpu_check", None)


def test_dry_run_runs_every_section(gpu_check, tmp_path):
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    out = tmp_path / "gpu_check.json"
    try:
        # "eager": dynamo capture without AOT or code generation, so the compiled rows run in seconds
        code = gpu_check.main(["--dry-run", "--compile-backend", "eager", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    assert code == 0 and result["failed"] == []
    assert result["dry_run"] is True
    for section in gpu_check.SECTIONS:
        assert result[section], section
    parity = {(r["model"], r["precision"]): r for r in result["parity"]}
    assert parity[("tiny-vit", "fp32")]["check"] == "ok" and parity[("tiny-rn", "fp32")]["check"] == "ok"
    train = {r["row"]: r for r in result["train"]}
    assert len(train) == 5 and all(r["samples_per_s"] > 0 and r["gflop_step"] > 0 for r in train.values())
    assert sum(bool(r.get("compiled")) for r in train.values()) == 2
    assert any(r["impl"] == "openai" for r in train.values())
    assert result["ddp"][0]["check"] == "ok" and result["ddp"][0]["max_grad_rel_diff"] <= 1e-6
    paths = {(r["path"], r["workers"]) for r in result["input"]}
    assert ("fast", 0) in paths and ("exact", 1) in paths
    assert all(r["samples_per_s"] > 0 for r in result["input"])
