"""Fault injection: concurrent runs, preemption of the whole process group, cut files, bad configs,
failing evaluations, hostile image sizes. Each case must end in a clear one-line error or a resumable run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipforge.cli import main
from clipforge.train.metrics import MetricsLogger, read_metrics
from clipforge.train.runlock import RunLock, RunLockedError
from clipforge.transforms import ImageLoadError, load_image

CLIPFORGE = [sys.executable, "-m", "clipforge"]


def _train_args(out: Path, steps: int = 2, *extra: str) -> list[str]:
    return [
        "model.preset=tiny-vit",
        "model.tokenizer=openai",
        "model.context_length=16",
        "data.synthetic_train=32",
        "data.synthetic_val=16",
        "train.batch_size=8",
        f"train.steps={steps}",
        "train.device=cpu",
        "run.log_every=1",
        "run.tensorboard=false",
        f"run.output_dir={out}",
        *extra,
    ]


# ------------------------------------------------------------------------------------------ one run per dir
def test_second_run_on_a_locked_dir_is_refused_naming_the_holder(tmp_path, capsys):
    with RunLock(tmp_path / "run"):
        with pytest.raises(RunLockedError, match=rf"pid {os.getpid()} on "):
            RunLock(tmp_path / "run").acquire()
        assert main(["train", "--no-progress", *_train_args(tmp_path / "run")]) == 1
        err = capsys.readouterr().err
        assert "in use by another clipforge run" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # the refused run wrote nothing
    RunLock(tmp_path / "run").acquire().release()  # released on exit: free again


def test_a_fresh_run_in_a_directory_with_checkpoints_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    every = ("run.checkpoint_every=1", "run.keep_last=2")
    assert main(["train", "--no-progress", *_train_args(out, 3, *every)]) == 0
    before = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    capsys.readouterr()
    # without --resume it used to start from step 0 and keep_last deleted its own checkpoints (older than the
    # old run's), so the directory mixed two runs and a later --resume picked the old run's step 3
    assert main(["train", "--no-progress", *_train_args(out, 2, *every)]) == 1
    err = capsys.readouterr().err
    assert "already holds a run (newest checkpoint step-00000003.safetensors)" in err and "--resume" in err
    assert "Traceback" not in err
    assert {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()} == before  # nothing touched
    assert main(["train", "--no-progress", "--resume", *_train_args(out, 4)]) == 0  # --resume continues it
    assert "trained to step 4 (1 step this run)" in capsys.readouterr().out


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "taken").write_text("not a run\n")
    assert main(["train", "--no-progress", *_train_args(tmp_path / "taken")]) == 1
    err = capsys.readouterr().err
    assert f"run.output_dir {tmp_path / 'taken'} exists and is not a directory" in err


def test_stale_lock_after_kill9_is_taken_over(tmp_path):
    code = (
        "import os, sys; from clipforge.train.runlock import RunLock; "
        f"RunLock({str(tmp_path)!r}).acquire(); os.kill(os.getpid(), 9)"
    )
    proc = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] != os.getpid()  # the dead holder's record
    lock = RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()


# ------------------------------------------------------------------------------------------ preemption
def test_sigterm_to_the_process_group_with_workers_writes_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = _train_args(out, 2000, "data.workers=2", "run.checkpoint_every=0")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [*CLIPFORGE, "train", "--no-progress", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group, as a SLURM job step
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if len(read_metrics(out / "metrics.jsonl")) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        os.killpg(proc.pid, signal.SIGTERM)  # main process and DataLoader workers alike
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr
    assert "SIGTERM at step" in stdout and "checkpoint saved" in stdout
    assert "Traceback" not in stderr
    assert list((out / "checkpoints").iterdir()), "no checkpoint written"


_PREEMPTED_STREAMS = """
import os, signal, subprocess, sys, time, torch
from clipforge.data.streams import BatchStream
got = []
signal.signal(signal.SIGTERM, lambda *a: got.append(a[0]))  # the main process owns preemption
# another process SIGTERMs the whole group on request, as a scheduler does (and ignores it itself)
scheduler = subprocess.Popen([sys.executable, "-c", "import os, signal, sys, time\\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN); print(flush=True)\\n"
    "for line in sys.stdin: time.sleep(float(line)); os.killpg(0, signal.SIGTERM)"],
    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
scheduler.stdout.readline()
data = torch.utils.data.TensorDataset(torch.arange(400.0))
for delay in (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2):  # some land while workers are starting
    scheduler.stdin.write(f"{delay}\\n")
    scheduler.stdin.flush()
    it = iter(BatchStream(data, 4, seed=0, workers=2))
    for _ in range(20):
        next(it)  # both workers keep serving batches: they ignored the group's SIGTERM
    time.sleep(0.3)
scheduler.kill()
# `it` is never closed: only the exit handlers can stop its workers
print(len(got), *[p.pid for p in __import__("multiprocessing").active_children() if p.pid != scheduler.pid])
"""


def test_workers_ignore_outside_sigterm_but_never_block_the_exit(tmp_path):
    """Workers ignore a SIGTERM sent to the process group, even one that lands while they start (the main
    process owns preemption), but obey the parent's own: multiprocessing's exit handler terminates, then
    joins them (this used to wait forever)."""
    script = tmp_path / "preempted.py"
    script.write_text(_PREEMPTED_STREAMS)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr
    signals, *pids = (int(x) for x in stdout.split())
    assert signals == 7 and len(pids) == 2, stdout
    time.sleep(0.5)
    for pid in pids:  # gone (or a zombie of the gone parent, not yet reaped)
        status = Path(f"/proc/{pid}/status")
        assert not status.exists() or "zombie" in status.read_text(), pid


# ------------------------------------------------------------------------------------------ cut files
def test_a_cut_last_metrics_line_is_dropped_and_resume_continues(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"kind": "train", "step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "train", "st')
    assert read_metrics(path) == records
    MetricsLogger.truncate_after(path, 2)
    assert read_metrics(path) == records[:2]
    path.write_text(json.dumps(records[0]) + "\n{broken\n" + json.dumps(records[1]) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a JSON record"):
        read_metrics(path)


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        ("bad.yaml", "train:\n  steps: [1,\n", "bad.yaml:"),
        ("bad.json", '{"train": {"steps": }', "bad.json:1"),
    ],
)
def test_malformed_config_is_one_line_naming_file_and_line(tmp_path, capsys, name, text, where):
    (tmp_path / name).write_text(text)
    assert main(["train", "--config", str(tmp_path / name)]) == 1
    err = capsys.readouterr().err.strip()
    assert where in err and "not valid" in err and "\n" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_device_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--no-progress", *_train_args(tmp_path / "r"), "train.device=cuda"]) == 1
    assert "no CUDA GPU is visible" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ evaluation
def test_a_failing_evaluation_never_costs_the_checkpoint(tmp_path):
    from clipforge.data.streams import BatchStream
    from clipforge.train.runs import RunDir
    from clipforge.train.trainer import Trainer

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return {"x": torch.randn(4)}

    model = torch.nn.Linear(4, 1)

    def step_fn(m, batch, step, backward):
        loss = m(batch["x"]).pow(2).mean()
        backward(loss)
        return loss.detach()

    def broken(m):
        raise ValueError("val/bad.png: cannot identify image file")

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = Trainer(model, step_fn, opt, None, BatchStream(Pairs(), 4), steps=3, batch_size=4,
                      run_dir=RunDir(tmp_path), evaluators={"zeroshot": broken, "ok": lambda m: {"a": 1.0}},
                      progress=False, tensorboard=False)  # fmt: skip
    result = trainer.fit()
    assert result.step == 3 and result.eval == {"ok/a": 1.0}
    assert RunDir(tmp_path).latest_checkpoint() is not None


# ------------------------------------------------------------------------------------------ hostile images
def test_extreme_aspect_ratio_is_refused_before_decoding(tmp_path):
    path = tmp_path / "strip.png"
    Image.new("L", (1, 100_000)).save(path)  # ~100 bytes; resized to 224 short side: 22M pixels
    assert path.stat().st_size < 2000
    with pytest.raises(ImageLoadError, match=r"strip\.png is 1x100000, more than 50:1"):
        load_image(path)
    assert load_image(path, max_aspect=None).size == (1, 100_000)  # opt-out still works
    Image.new("RGB", (400, 100)).save(tmp_path / "wide.png")
    assert load_image(tmp_path / "wide.png").size == (400, 100)  # ordinary panoramas load


# ------------------------------------------------------------------------------------------ cut checkpoints
def test_resume_falls_back_past_a_truncated_newest_checkpoint(tmp_path, capsys):
    from clipforge.train.runs import RunDir

    out = tmp_path / "run"
    args = _train_args(out, 3, "run.checkpoint_every=1", "run.keep_last=3")
    assert main(["train", "--no-progress", *args]) == 0
    run = RunDir(out)
    newest = run.latest_checkpoint()
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a full disk mid-write
    (run.checkpoints / ".step-00000004.safetensors.abc.tmp").write_bytes(b"half")  # an interrupted write
    capsys.readouterr()
    assert main(["train", "--no-progress", "--resume", *_train_args(out, 4, "run.keep_last=3")]) == 0
    printed = capsys.readouterr().out
    assert "step-00000003.safetensors: not a readable clipforge state file" in printed
    assert "resuming from the checkpoint before it" in printed and "removed" in printed
    assert not list(run.checkpoints.glob(".*.tmp"))
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r.get("kind") == "train"]
    assert steps == [1, 2, 3, 4]  # step 3 ran again from step 2's state; no record lost or doubled


# ------------------------------------------------------------------------------------------ kill -9
def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if r.get("kind") == "train"}


@pytest.mark.parametrize("seed", [0, 1])
def test_kill9_at_a_random_moment_then_resume_gives_the_same_loss_curve(tmp_path, seed):
    """SIGKILL at a random point (mid-step, mid-checkpoint, mid-metrics line), then --resume until done:
    the loss of every step equals an uninterrupted run's, and no record is lost or doubled."""
    import random

    rng = random.Random(seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--no-progress", "run.checkpoint_every=1", "run.keep_last=2", "optim.warmup_steps=2"]
    ref = tmp_path / "ref"
    subprocess.run([*CLIPFORGE, "train", *args, *_train_args(ref, 8)], env=env, check=True, timeout=300,
                   capture_output=True)  # fmt: skip
    out = tmp_path / "run"
    proc = subprocess.Popen([*CLIPFORGE, "train", *args, *_train_args(out, 8)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    target = rng.randint(1, 6)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and len(_losses(out)) < target:
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.3))
    proc.kill()
    proc.wait(timeout=60)
    done = subprocess.run([*CLIPFORGE, "train", "--resume", *args, *_train_args(out, 8)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    want, got = _losses(ref), _losses(out)
    assert sorted(got) == list(range(1, 9))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step


# ------------------------------------------------------------------------------------------ disk full
def test_disk_full_is_one_line_and_leaves_no_partial_files(tmp_path, capsys):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()[:200]}")
    try:
        out = disk / "run"
        code = main(["train", "--no-progress", *_train_args(out, 2, "run.checkpoint_every=1")])
        err = capsys.readouterr().err
        assert code == 1 and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1 and "No space left on device" in err, err
        leftovers = [p.name for p in out.rglob("*") if p.name.startswith(".")]
        assert leftovers == [], leftovers  # interrupted atomic writes cleaned up
    finally:
        subprocess.run(["umount", str(disk)], check=False)
