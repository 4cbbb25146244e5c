"""Run directories: resolved config, atomic checkpoints (temp file + os.replace), keep-last-K, resume.

out/
  experiment.yaml        the resolved experiment config
  metrics.jsonl          one JSON object per logged step / evaluation
  checkpoints/step-00000500.safetensors ...   the training state (checkpoints.state: no pickle)
  plots/*.png            written at the end
  model/                 the final model (clipforge.load-able)
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ..checkpoints.state import load_state, save_state
from ..files import is_leftover, write_bytes_atomic

CHECKPOINT_SUFFIX = ".safetensors"
_CKPT = re.compile(r"^step-(\d+)\.safetensors$")
# Run checkpoints before the safetensors format: pickles, never read again (a pickle can run code).
_LEGACY_CKPT = re.compile(r"^step-(\d+)\.pt$")


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.plots = self.path / "plots"
        self.metrics = self.path / "metrics.jsonl"
        self.config = self.path / "experiment.yaml"

    def create(self) -> RunDir:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.plots.mkdir(parents=True, exist_ok=True)
        return self

    def remove_temp_files(self) -> list[Path]:
        """Delete what interrupted atomic writes left behind (`.NAME.tmp-*` files and folders; also the
        `.NAME.*.tmp` files of earlier versions).
        Only safe while this process holds the run lock (no other writer)."""
        import shutil

        removed = []
        for folder in (self.path, self.checkpoints):
            if not folder.is_dir():
                continue
            for p in folder.iterdir():
                if is_leftover(p) or (p.name.startswith(".") and p.name.endswith(".tmp")):
                    if p.is_dir():
                        shutil.rmtree(p)
                    else:
                        p.unlink(missing_ok=True)
                    removed.append(p)
        return removed

    def save_config(self, config: dict[str, Any]) -> None:
        write_bytes_atomic(self.config, yaml.safe_dump(config, sort_keys=False).encode())

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:08d}{CHECKPOINT_SUFFIX}"

    def _find(self, pattern: re.Pattern[str]) -> list[tuple[int, Path]]:
        if not self.checkpoints.is_dir():
            return []
        found = []
        for p in self.checkpoints.iterdir():
            m = pattern.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
        return sorted(found)

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of complete checkpoints, oldest first (temp files never match the pattern)."""
        return self._find(_CKPT)

    def latest_checkpoint(self) -> Path | None:
        """The newest checkpoint, including one in the old pickle format (`step-N.pt`) when that is the
        newest: resuming then stops with load_checkpoint's message instead of silently using older state."""
        ckpts = self._find(_LEGACY_CKPT) + self.list_checkpoints()  # same step: the current format wins
        return max(ckpts, key=lambda c: c[0])[1] if ckpts else None

    def save_checkpoint(self, state: dict[str, Any], step: int, keep_last: int) -> Path:
        """Write atomically, then delete all but the newest `keep_last` checkpoints."""
        path = self.checkpoint_path(step)
        save_state(state, path)
        for _, old in self.list_checkpoints()[:-keep_last]:
            old.unlink(missing_ok=True)
        return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A run checkpoint's training state (tensors on CPU). Reads JSON and tensor bytes only: a file
    from another machine cannot run code here. Errors are one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if _LEGACY_CKPT.match(path.name) or path.suffix in (".pt", ".pth", ".bin", ".pkl"):
        raise ValueError(
            f"{path}: a run checkpoint in the old pickle format, which clipforge no longer reads because "
            "unpickling a file can run code; resume it with the clipforge version that wrote it (trusted "
            f"files only), or start a new run (another output_dir, or move {path.parent} away)"
        )
    state = load_state(path)
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"{path}: a state file without training state (no 'step'); not a run checkpoint")
    return state


# ------------------------------------------------------------------------------------------ RNG state
def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
