"""Trainer, run directories, experiment configs: resume exactness, signals, non-finite guards, checkpoints."""

from __future__ import annotations

import json
import signal
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from clipforge import create_model
from clipforge.checkpoints.state import save_state
from clipforge.data.streams import BatchStream
from clipforge.train.experiment import Experiment, load_experiment
from clipforge.train.metrics import read_metrics
from clipforge.train.optim import build_optimizer, cosine_schedule
from clipforge.train.runs import RunDir, load_checkpoint
from clipforge.train.trainer import NonFiniteLossError, Trainer, TrainingInterrupted


class Pairs(Dataset):
    """Random 32 px images and captions; a random crop-and-flip augmentation drawn from torch's global RNG."""

    def __init__(self, n: int = 40) -> None:
        g = torch.Generator().manual_seed(123)
        self.images = torch.randn(n, 3, 36, 36, generator=g)
        lengths = torch.randint(3, 12, (n,), generator=g)
        self.tokens = torch.zeros(n, 16, dtype=torch.long)
        for i, L in enumerate(lengths.tolist()):
            self.tokens[i, :L] = torch.randint(1, 500, (L,), generator=g)
            self.tokens[i, L] = 49407  # EOT, the largest id

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        y, x = torch.randint(0, 5, (2,)).tolist()
        img = self.images[i, :, y : y + 32, x : x + 32]
        if torch.rand(()) < 0.5:
            img = img.flip(-1)
        return {"image": img, "text": self.tokens[i]}


def clip_step(model, batch, *, step, backward):
    # FLIP masking draws from the global RNG too, so resume must restore it
    img = F.normalize(model.encode_image(batch["image"], mask_ratio=0.25), dim=-1)
    txt = F.normalize(model.encode_text(batch["text"]), dim=-1)
    logits = model.logit_scale.exp() * img @ txt.T
    labels = torch.arange(len(img))
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    backward(loss)
    return loss.detach()


def make_trainer(tmp_path, steps=12, step_fn=clip_step, model_seed=0, **kw):
    torch.manual_seed(model_seed)
    model = create_model("tiny-vit")
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    sched = cosine_schedule(opt, 3, steps)
    data = BatchStream(Pairs(), 8, seed=7, shuffle=True, workers=0)  # 5 batches per epoch: crosses epochs
    kw = {"checkpoint_every": 0, "keep_last": 2, "log_every": 1, "progress": False, **kw}
    return Trainer(
        model,
        step_fn,
        opt,
        sched,
        data,
        steps=steps,
        batch_size=8,
        run_dir=RunDir(tmp_path),
        grad_clip=1.0,
        after_step=lambda m: m.clamp_logit_scale(),
        scalars=lambda m: {"logit_scale": m.logit_scale.exp().item()},
        config={"test": True},
        **kw,
    )


def test_resume_reproduces_uninterrupted_loss_curve(tmp_path):
    torch.manual_seed(99)
    straight = make_trainer(tmp_path / "a").fit()
    assert len(straight.losses) == 12

    def interrupting_step(model, batch, *, step, backward):
        if step == 5:  # a real SIGTERM through the installed handler, during step 6
            signal.raise_signal(signal.SIGTERM)
        return clip_step(model, batch, step=step, backward=backward)

    torch.manual_seed(99)
    first = make_trainer(tmp_path / "b", step_fn=interrupting_step)
    with pytest.raises(TrainingInterrupted, match="SIGTERM at step 6"):
        first.fit()
    assert [s for s, _ in RunDir(tmp_path / "b").list_checkpoints()] == [6]
    # a fresh process: other initial weights and RNG state, everything must come from the checkpoint
    torch.manual_seed(12345)
    second = make_trainer(tmp_path / "b", model_seed=1)
    resumed = second.fit(resume=True)
    assert len(resumed.losses) == 6
    curve = [r["loss"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if r["kind"] == "train"]
    assert curve == pytest.approx(straight.losses, abs=1e-6)
    for a, b in zip(straight.losses[6:], resumed.losses, strict=True):
        assert abs(a - b) <= 1e-6
    pa, pb = make_trainer(tmp_path / "a").model, second.model
    pa.load_state_dict(load_checkpoint(RunDir(tmp_path / "a").latest_checkpoint())["model"])
    for (n, x), y in zip(pa.state_dict().items(), pb.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0, msg=n)


def test_batch_stream_resumes_without_loss_or_repeat():
    class Index(Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return torch.tensor(i)

    a = BatchStream(Index(), 3, seed=1)
    it = iter(a)
    seen = [next(it).tolist() for _ in range(4)]  # 3 batches per epoch (one sample dropped), into epoch 1
    state = a.state_dict()
    assert state == {"epoch": 1, "index": 3}
    rest = [next(it).tolist() for _ in range(4)]
    b = BatchStream(Index(), 3, seed=1)
    b.load_state_dict(state)
    it_b = iter(b)
    assert [next(it_b).tolist() for _ in range(4)] == rest
    epoch0 = [i for b in seen[:3] for i in b]
    assert len(set(epoch0)) == 9  # a permutation, no repeats within an epoch
    assert epoch0 != [i for b in [seen[3], *rest[:2]] for i in b]  # reshuffled per epoch


def test_nonfinite_steps_are_skipped_then_stop(tmp_path):
    def nan_on_odd(model, batch, *, step, backward):
        loss = clip_step(model, batch, step=step, backward=backward)
        return loss * float("nan") if step % 2 else loss

    tr = make_trainer(tmp_path / "s", steps=6, step_fn=nan_on_odd)
    before = {}

    def snapshot(model, batch, *, step, backward):
        before[step] = [p.detach().clone() for p in model.parameters()]
        return nan_on_odd(model, batch, step=step, backward=backward)

    tr.step_fn = snapshot
    res = tr.fit()
    assert res.nonfinite_steps == 3
    recs = [r for r in read_metrics(tmp_path / "s" / "metrics.jsonl") if r["kind"] == "train"]
    assert recs[-1]["nonfinite_steps"] == 3
    # step index 1 was skipped: the parameters entering step 2 equal those entering step 1
    for x, y in zip(before[1], before[2], strict=True):
        assert torch.equal(x, y)
    assert any(not torch.equal(x, y) for x, y in zip(before[0], before[1], strict=True))

    def always_nan(model, batch, *, step, backward):
        return torch.tensor(float("inf"))

    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite"):
        make_trainer(tmp_path / "t", steps=6, step_fn=always_nan, max_nonfinite=3).fit()


def test_cli_reports_a_diverged_run_as_one_error_line(tmp_path, monkeypatch, capsys):
    import clipforge.train.build as build
    from clipforge.cli import main

    def diverged(exp, **kw):
        raise NonFiniteLossError("5 consecutive non-finite losses at step 12 (lr too high?)")

    monkeypatch.setattr(build, "run_experiment", diverged)
    config = Path(__file__).resolve().parents[1] / "examples" / "run_synthetic.yaml"
    code = main(["train", "--config", str(config), f"run.output_dir={tmp_path / 'r'}"])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err == "clipforge train: error: 5 consecutive non-finite losses at step 12 (lr too high?)\n"


def test_cli_takes_overrides_after_resume(tmp_path, monkeypatch, capsys):
    """`train --config c.yaml --resume key=value` (argparse alone stops the positionals at the option)."""
    import clipforge.train.build as build
    from clipforge.cli import main

    seen = {}

    def record(exp, **kw):
        seen.update(out=exp.run.output_dir, lr=exp.optim.lr, resume=kw["resume"])
        raise NonFiniteLossError("stop here")

    monkeypatch.setattr(build, "run_experiment", record)
    config = Path(__file__).resolve().parents[1] / "examples" / "run_synthetic.yaml"
    out = str(tmp_path / "r")
    assert main(["train", "--config", str(config), "optim.lr=0.01", "--resume", f"run.output_dir={out}"]) == 1
    assert seen == {"out": out, "lr": 0.01, "resume": True}
    with pytest.raises(SystemExit):
        main(["train", "--config", str(config), "--resume", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_checkpoints_keep_last_and_are_atomic(tmp_path, monkeypatch):
    tr = make_trainer(tmp_path / "k", steps=7, checkpoint_every=2, keep_last=2)
    tr.fit()
    run = RunDir(tmp_path / "k")
    assert [s for s, _ in run.list_checkpoints()] == [6, 7]
    ck = load_checkpoint(run.latest_checkpoint())
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "data", "step", "config"} <= set(ck)
    assert (
        ck["step"] == 7 and ck["config"] == {"test": True} and set(ck["rng"]) >= {"python", "numpy", "torch"}
    )
    assert (tmp_path / "k" / "experiment.yaml").exists()
    for name in ("loss.png", "temperature.png", "lr.png"):
        assert (tmp_path / "k" / "plots" / name).stat().st_size > 0

    class Unstorable:
        pass

    good = run.latest_checkpoint().read_bytes()
    with pytest.raises(TypeError, match="Unstorable"):
        save_state({"x": Unstorable()}, run.latest_checkpoint())
    assert run.latest_checkpoint().read_bytes() == good  # the old file is intact

    def dies_mid_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr("safetensors.torch.save_file", dies_mid_write)
        with pytest.raises(OSError, match="disk full"):
            save_state({"x": torch.ones(2)}, run.latest_checkpoint())
    assert run.latest_checkpoint().read_bytes() == good
    assert sorted(p.name for p in run.checkpoints.iterdir()) == [
        "step-00000006.safetensors",
        "step-00000007.safetensors",
    ]


def test_evaluators_and_metrics_log(tmp_path):
    calls = []

    def ev(model):
        calls.append(model.training)
        return {"acc": 0.5}

    tr = make_trainer(tmp_path / "e", steps=4, evaluators={"val": ev}, eval_every=2)
    res = tr.fit()
    assert calls == [False, False] or len(calls) == 2
    assert res.eval == {"val/acc": 0.5}
    recs = read_metrics(tmp_path / "e" / "metrics.jsonl")
    assert [r["step"] for r in recs if r["kind"] == "eval"] == [2, 4]
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all({"loss", "lr", "logit_scale", "samples_per_s", "nonfinite_steps"} <= set(r) for r in train)
    # the lr logged is the rate the step used: linear warm-up (step + 1) / 3 of 1e-3
    assert train[0]["lr"] == pytest.approx(1e-3 / 3)
    assert (tmp_path / "e" / "plots" / "eval.png").exists()


def test_experiment_config_overrides_and_errors(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model:\n  preset: tiny-vit\ntrain:\n  steps: 20\n  batch_size: 16\n")
    exp = load_experiment(
        cfg, ["optim.lr=1e-3", "train.precision=bf16", "optim.grad_clip=null", "run.seed=3"]
    )
    assert exp.train.steps == 20 and exp.optim.lr == 1e-3 and exp.optim.grad_clip is None
    assert exp.train.precision == "bf16" and exp.run.seed == 3 and isinstance(exp.optim.lr, float)
    assert Experiment.from_dict(json.loads(json.dumps(exp.to_dict()))) == exp  # round trip
    with pytest.raises(ValueError, match=r"unknown config key\(s\): optim.learning_rate"):
        load_experiment(cfg, ["optim.learning_rate=1"])
    with pytest.raises(ValueError, match="unknown config key"):
        load_experiment(cfg, ["trian.steps=1"])
    with pytest.raises(ValueError, match=r"train\.steps must be an integer"):
        load_experiment(cfg, ["train.steps=abc"])
    with pytest.raises(ValueError, match=r"train\.precision must be one of"):
        load_experiment(cfg, ["train.precision=fp8"])
    with pytest.raises(ValueError, match=r"multiple of train\.accum_steps"):
        load_experiment(cfg, ["train.accum_steps=3"])
    with pytest.raises(ValueError, match="key=value"):
        load_experiment(cfg, ["train.steps"])
    with pytest.raises(FileNotFoundError, match="experiment config not found"):
        load_experiment(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("override", "message"),
    [("optim.lr=-1", "optim.lr must be > 0, got -1.0"),  # torch said "Invalid learning rate", after the data
     ("optim.lr=.inf", "optim.lr must be > 0, got inf"),  # YAML infinity
     ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0"),  # was trained with, silently
     ("optim.grad_clip=0", "optim.grad_clip must be > 0 (or null: no clipping)"),  # was: every update zeroed
     ("optim.beta2=1.5", "optim.beta2 must be in [0, 1)"),
     ("optim.eps=0", "optim.eps must be > 0"),
     ("optim.warmup_steps=-5", "optim.warmup_steps must be >= 0"),
     ("optim.min_lr=1", "optim.min_lr must be in [0, optim.lr]"),
     ("run.checkpoint_every=-1", "run.checkpoint_every must be >= 0"),  # was: a checkpoint every step
     ("run.eval_every=-2", "run.eval_every must be >= 0"),
     ("model.context_length=0", "model.context_length must be >= 2"),  # was: the preset's, recorded as 0
     ("model.image_unlocked_blocks=-1", "model.image_unlocked_blocks must be >= 0"),
     ("model.vocab_size=300", "model.vocab_size must be at least 514 with model.tokenizer=bpe")],
)  # fmt: skip
def test_out_of_range_settings_are_refused_naming_the_key(override, message):
    with pytest.raises(ValueError) as e:
        load_experiment(None, ["model.tokenizer=bpe", override])
    assert message in str(e.value)


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_bf16_instructions_warns(tmp_path, monkeypatch, native):
    """bf16 autocast on an AVX2-only CPU runs 5x-400x slower than fp32 (models/hardware.py): the trainer
    says so when it is built; where bf16 is native, it says nothing."""
    from clipforge.models import hardware

    monkeypatch.setattr(hardware, "native_bf16_cpu", lambda: native)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        make_trainer(tmp_path, precision="bf16")
    slow = [w for w in seen if "no bf16 matrix instructions" in str(w.message)]
    assert len(slow) == (0 if native else 1)
    if not native:
        assert str(slow[0].message).endswith("; train in fp32")


def test_siglip_trains_from_a_preset_with_siglips_initialisation(tmp_path, capsys):
    """train.loss=siglip on a preset without a logit bias (every paper preset) starts from SigLIP's
    t' = ln 10, b = -10 (it failed: 'siglip loss needs a model with a logit_bias'); clip is unchanged."""
    import math

    from clipforge.checkpoints import load
    from clipforge.cli import main

    def args(out, loss):
        return ["train", "--no-progress", "model.preset=tiny-vit", "model.tokenizer=openai",
                "model.context_length=16", "data.synthetic_train=16", "data.synthetic_val=8",
                "train.batch_size=8", "train.steps=2", f"train.loss={loss}", "run.tensorboard=false",
                f"run.output_dir={out}"]  # fmt: skip

    assert main(args(tmp_path / "s", "siglip")) == 0, capsys.readouterr().err
    model = load(tmp_path / "s" / "model")[0]
    assert model.logit_bias is not None and abs(model.logit_bias.item() + 10) < 0.1
    assert abs(model.logit_scale.item() - math.log(10)) < 0.1
    from clipforge.train.model_setup import preset_config

    exp = load_experiment(None, ["model.preset=tiny-vit", "train.loss=clip"])
    assert preset_config(exp).init_logit_bias is None
    assert preset_config(exp).init_logit_scale == pytest.approx(math.log(1 / 0.07))
