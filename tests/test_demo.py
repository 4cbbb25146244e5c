"""The built-in demo end to end (a very short run) and the `clipforge train` glue on the synthetic set."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from clipforge.demo import DemoConfig, demo_model_config, format_results, resolve_precision, run_demo
from clipforge.models import create_model
from clipforge.train.build import run_experiment
from clipforge.train.experiment import load_experiment

TINY = dict(
    steps=3,
    train_images=192,
    batch_size=32,
    eval_per_class=1,
    retrieval_pairs=24,
    warmup_steps=1,
    width=64,
    layers=1,
    text_layers=1,
    embed_dim=32,
    vocab_size=600,
    progress=False,
    threads=1,
)


def test_short_demo_writes_results_and_plots(tmp_path):
    r = run_demo(DemoConfig(out=str(tmp_path / "a"), **TINY))
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved == json.loads(json.dumps(r))
    assert r["num_classes"] == 64 and r["chance"] == pytest.approx(1 / 64)
    assert (
        r["seen_combinations"] + len(r["unseen_combinations"]) == 64 and len(r["unseen_combinations"]) == 13
    )
    for key in ("seen_top1", "unseen_top1"):
        assert 0.0 <= r[key] <= 1.0
    assert set(r["retrieval"]) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
    for name in ("loss.png", "temperature.png", "lr.png", "eval.png", "zeroshot.png"):
        assert (tmp_path / "a" / "plots" / name).stat().st_size > 0
    assert "unseen combinations (13)" in format_results(r)
    # the exported model loads with its own vocabulary and the demo's 64 px preprocessing
    from clipforge import load

    model, preprocess, tok = load(r["model_dir"])
    assert tok.vocab_size == model.config.text.vocab_size and preprocess.config.image_size == 64
    # same seed, same numbers (the step count never depends on timing)
    r2 = run_demo(DemoConfig(out=str(tmp_path / "b"), **TINY))
    for key in ("seen_top1", "unseen_top1", "final_loss", "retrieval"):
        assert r2[key] == r[key]


def test_demo_step_count_is_fixed_by_minutes():
    assert (
        DemoConfig(minutes=5).num_steps()
        == DemoConfig(minutes=5).num_steps()
        > DemoConfig(minutes=2).num_steps()
    )
    assert DemoConfig(minutes=5, steps=7).num_steps() == 7


def test_demo_model_towers_and_precision():
    rn = demo_model_config(600, DemoConfig())
    assert rn.vision.kind == "resnet" and rn.text.vocab_size == 600
    vit = demo_model_config(600, DemoConfig(image_tower="vit", width=64, layers=1, patch_size=16))
    assert (vit.vision.kind, vit.vision.width, vit.vision.patch_size) == ("vit", 64, 16)
    out = create_model(vit).encode_image(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, vit.embed_dim)
    with pytest.raises(ValueError, match="image_tower"):
        demo_model_config(600, DemoConfig(image_tower="mlp"))
    assert resolve_precision("fp32") == "fp32" and resolve_precision("auto") in ("bf16", "fp32")


def test_demo_cli_parser():
    from clipforge.cli import demo

    parser = argparse.ArgumentParser()
    demo.register(parser.add_subparsers())
    args = parser.parse_args(["demo", "--minutes", "2", "--seed", "3", "--out", "x"])
    assert (args.minutes, args.seed, args.out, args.threads, args.func) == (2.0, 3, "x", 0, demo.run)


def test_train_experiment_on_synthetic_data_and_resume(tmp_path):
    overrides = [
        "model.preset=tiny-vit",
        "model.tokenizer=bpe",
        "model.vocab_size=600",
        "model.context_length=32",
        "data.synthetic_train=96",
        "data.synthetic_val=64",
        "train.steps=4",
        "train.batch_size=16",
        "train.accum_steps=2",
        "train.mask_ratio=0.5",
        "train.unmasked_steps=1",
        "optim.warmup_steps=1",
        f"run.output_dir={tmp_path / 'run'}",
        "run.checkpoint_every=2",
        "run.keep_last=1",
        "run.log_every=1",
    ]
    exp = load_experiment(None, overrides)
    res = run_experiment(exp, progress=False)
    assert res.step == 4 and len(res.losses) == 4
    assert {"zeroshot_unseen/acc1", "zeroshot_seen/acc1", "retrieval/image_retrieval_recall@5"} <= set(
        res.eval
    )
    run = tmp_path / "run"
    assert (run / "experiment.yaml").exists() and [p.name for p in (run / "checkpoints").iterdir()] == [
        "step-00000004.safetensors"
    ]
    assert load_experiment(run / "experiment.yaml") == exp  # the resolved config round-trips
    # --resume of a finished run: nothing left to do, same step
    again = run_experiment(exp.with_overrides(["train.steps=5"]), resume=True, progress=False)
    assert again.step == 5 and len(again.losses) == 1
