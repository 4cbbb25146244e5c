"""--resume with changed settings: the schedule and optimizer settings are applied from the restored step,
changes that make it another run are refused, and experiment.yaml records what ran."""

from __future__ import annotations

import math

import pytest
import yaml

from clipforge.train.build import run_experiment
from clipforge.train.experiment import load_experiment
from clipforge.train.metrics import read_metrics
from clipforge.train.optim import WarmupCosine
from clipforge.train.resume import ResumeConfigError


def _args(out, *extra):
    return [
        "model.preset=tiny-vit",
        "model.tokenizer=openai",
        "model.context_length=16",
        "data.synthetic_train=32",
        "data.synthetic_val=16",
        "train.batch_size=8",
        "train.device=cpu",
        "optim.warmup_steps=1",
        "run.log_every=1",
        "run.tensorboard=false",
        f"run.output_dir={out}",
        *extra,
    ]


def _lrs(out):
    return {r["step"]: r["lr"] for r in read_metrics(out / "metrics.jsonl") if r.get("kind") == "train"}


@pytest.fixture()
def finished(tmp_path):
    out = tmp_path / "run"
    run_experiment(load_experiment(None, _args(out, "train.steps=4")), progress=False)
    return out


def test_more_steps_extend_the_schedule_and_the_record(finished):
    out = finished
    assert _lrs(out)[4] == pytest.approx(5e-4 * WarmupCosine(1, 4)(3))
    res = run_experiment(load_experiment(None, _args(out, "train.steps=8")), resume=True, progress=False)
    assert res.step == 8 and len(res.losses) == 4  # steps 5..8 ran, from the restored state
    lrs = _lrs(out)
    for step in range(5, 9):  # the 8-step cosine, continued at the restored step (not the old lr 0)
        assert lrs[step] == pytest.approx(5e-4 * WarmupCosine(1, 8)(step - 1))
    assert lrs[5] > 0 and all(math.isfinite(v) for v in lrs.values())
    assert yaml.safe_load((out / "experiment.yaml").read_text())["train"]["steps"] == 8


def test_a_new_learning_rate_is_applied_on_resume(finished):
    out = finished
    run_experiment(
        load_experiment(None, _args(out, "train.steps=6", "optim.lr=1e-3")), resume=True, progress=False
    )
    assert _lrs(out)[5] == pytest.approx(1e-3 * WarmupCosine(1, 6)(4))


@pytest.mark.parametrize(
    ("change", "named"),
    [("model.preset=tiny-rn", "model.preset: 'tiny-vit' -> 'tiny-rn'"),
     ("data.synthetic_train=40", "data.synthetic_train: 32 -> 40"),
     ("train.batch_size=16", "train.batch_size: 8 -> 16")],
)  # fmt: skip
def test_changes_that_make_another_run_are_refused(finished, change, named):
    out = finished
    with pytest.raises(ResumeConfigError, match="cannot resume") as e:
        run_experiment(
            load_experiment(None, _args(out, "train.steps=6", change)), resume=True, progress=False
        )
    assert named in str(e.value)
    recorded = yaml.safe_load((out / "experiment.yaml").read_text())
    assert recorded["train"]["steps"] == 4 and recorded["model"]["preset"] == "tiny-vit"  # untouched


def test_settings_added_by_a_newer_version_do_not_block_a_resume():
    from clipforge.train.resume import check_resume_config

    saved = {"train": {"steps": 4}, "model": {"preset": "tiny-vit"}}
    current = {"train": {"steps": 4, "compile": False}, "model": {"preset": "tiny-vit"}}
    check_resume_config(saved, current)  # no error: train.compile did not exist when the run started
    with pytest.raises(ResumeConfigError, match=r"model\.preset"):
        check_resume_config(saved, {**current, "model": {"preset": "tiny-rn"}})


def test_fewer_steps_than_the_checkpoint_are_refused(finished):
    out = finished  # 4 steps done
    before = (out / "experiment.yaml").read_text()
    # it "trained" 4 steps in 0 s and experiment.yaml then said train.steps: 2, for a 4-step model
    with pytest.raises(ValueError, match=r"step-00000004\.safetensors is at step 4, past this run's 2 steps"):
        run_experiment(load_experiment(None, _args(out, "train.steps=2")), resume=True, progress=False)
    assert (out / "experiment.yaml").read_text() == before
    res = run_experiment(load_experiment(None, _args(out, "train.steps=4")), resume=True, progress=False)
    assert res.step == 4 and res.losses == []  # a finished run resumed as it was: nothing left to do
