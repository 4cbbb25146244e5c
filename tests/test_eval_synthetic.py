"""examples/eval_synthetic.py end to end at toy size (9 classes, a few steps): every output is written, and
the suite's numbers agree with independent calculations (zero-shot accuracy by a plain PIL/numpy loop,
effective robustness by the formula, the baseline line by numpy's polyfit)."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from clipforge.checkpoints import load

ROOT = Path(__file__).resolve().parents[1]
SHIFTED = ["background", "texture", "noise", "style", "blur"]
EPS = 1e-4


def _example():
    spec = importlib.util.spec_from_file_location("eval_synthetic", ROOT / "examples" / "eval_synthetic.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_synthetic")
    argv = [
        "--out", str(out), "--steps", "6", "--snapshots", "1", "--train-pairs", "128", "--batch-size", "32",
        "--train-per-class", "3", "--test-per-class", "2", "--ks", "1", "--fewshot-seeds", "1",
        "--probe-shots", "2", "--colours", "red,green,blue", "--shapes", "circle,square,triangle", "--quiet",
    ]  # fmt: skip
    assert _example().main(argv) == 0
    return out


def test_outputs_exist(run):
    suite = run / "suite"
    for f in ["suite.json", "suite.md", "shapes-seen_fewshot.png", "shapes-seen_confusion.png"]:
        assert (suite / f).stat().st_size > 0, f
    for s in SHIFTED:
        assert (suite / f"shapes-{s}_robustness.png").stat().st_size > 0
    assert (run / "robustness_snapshots.png").stat().st_size > 0
    assert sorted(p.name for p in (run / "models").glob("step_*")) == ["step_00006"]
    records = json.loads((suite / "suite.json").read_text())
    assert [r["task"] for r in records] == (
        ["zeroshot_classification"] * 2 + ["linear_probe", "few_shot"] + ["robustness"] * len(SHIFTED)
    )
    for r in records:
        assert set(r) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
    curve = records[3]["metrics"]["curve"]
    assert curve["k"] == [1]
    for kind in ("linear_probe", "zero_shot_prior"):
        assert [len(r) for r in curve[kind]["runs"]] == [1]
        assert all(0 <= a <= 1 for r in curve[kind]["runs"] for a in r)
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["accuracies"]) == {"step_00006"}
    assert "| k | plain probe | zero-shot-prior probe |" in (run / "summary.md").read_text()


def _zero_shot_accuracy_by_hand(model_dir: Path, folder: Path, templates: list[str]) -> float:
    """Independent of clipforge.eval: PIL + numpy preprocessing; normalise, average, renormalise per class."""
    model, _, tokenizer = load(model_dir)
    model.eval()
    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    std = np.array([0.26862954, 0.26130258, 0.27577711])
    names = json.loads((folder / "classnames.json").read_text())  # {folder: class name}
    folders = sorted(names)
    with torch.no_grad():
        weights = []
        for f in folders:
            t = model.encode_text(tokenizer([tpl.replace("{c}", names[f]) for tpl in templates]))
            t = t / t.norm(dim=-1, keepdim=True)
            m = t.mean(0)
            weights.append(m / m.norm())
        w = torch.stack(weights, 1)  # (D, C)
        correct = total = 0
        for label, f in enumerate(folders):
            for p in sorted((folder / f).glob("*.png")):
                a = (np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) / 255 - mean) / std
                x = torch.tensor(a, dtype=torch.float32).permute(2, 0, 1)[None]
                feat = model.encode_image(x)
                correct += int((feat / feat.norm() @ w).argmax().item() == label)
                total += 1
    return correct / total


def test_zero_shot_accuracy_matches_a_hand_computation(run):
    spec = yaml.safe_load((run / "tasks.yaml").read_text())
    templates = json.loads(Path(spec["templates"]).read_text())
    records = json.loads((run / "suite" / "suite.json").read_text())
    for rec, task in zip(records[:2], spec["tasks"][:2]):
        folder = Path(task["dataset"])
        n = sum(1 for _ in folder.rglob("*.png"))
        expected = _zero_shot_accuracy_by_hand(Path(spec["model"]), folder, templates)
        assert abs(rec["metrics"]["acc1"] - expected) <= 1 / n + 1e-9, (rec["dataset"], expected)


def _logit(p: float) -> float:
    p = min(max(p, EPS), 1 - EPS)
    return math.log(p / (1 - p))


def test_effective_robustness_and_baseline_line(run):
    spec = yaml.safe_load((run / "tasks.yaml").read_text())
    records = json.loads((run / "suite" / "suite.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    probes = [a for accs in summary["accuracies"].values() for k, a in accs.items() if k != "zero-shot"]
    for rec, task in zip(records[4:], spec["tasks"][4:]):
        (shift,) = task["shifted"]
        slope, intercept = task["baseline_fit"]
        acc_in, acc_s = rec["metrics"]["acc1"], rec["metrics"]["shifts"][shift]["acc1"]
        predicted = 1 / (1 + math.exp(-(slope * _logit(acc_in) + intercept)))
        assert rec["metrics"]["shifts"][shift]["effective_robustness"] == pytest.approx(
            acc_s - predicted, abs=1e-9
        )
        xs = [_logit(a["in"]) for a in probes]
        if max(xs) - min(xs) > 1e-6:  # a toy model can sit at one accuracy: the line is then undetermined
            ref = np.polyfit(xs, [_logit(a[shift]) for a in probes], 1)
            assert (slope, intercept) == pytest.approx(tuple(ref), abs=1e-6)
