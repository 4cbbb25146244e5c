"""Metrics: a JSONL log (plus TensorBoard when installed) and PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..files import write_text_atomic


class MetricsLogger:
    """Appends one JSON object per call to `path`; mirrors scalars to TensorBoard when available.

    Opened in append mode so a resumed run continues the same file; `truncate_after(step)` drops
    records a crashed run wrote after its last checkpoint, so the log never repeats steps.
    """

    def __init__(self, path: str | Path, tensorboard_dir: str | Path | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("a")
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(tensorboard_dir))
            except ImportError:  # tensorboard is optional
                self._tb = None

    def log(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, default=_jsonable) + "\n")
        self._f.flush()
        if self._tb is not None and "step" in record:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()

    @staticmethod
    def truncate_after(path: str | Path, step: int) -> None:
        """Keep only the records with step <= `step` (used on resume)."""
        path = Path(path)
        if not path.exists():
            return
        kept = [json.dumps(r) for r in read_metrics(path) if r.get("step", 0) <= step]
        write_text_atomic(path, "".join(line + "\n" for line in kept))  # a crash leaves the old file


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    records = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines):  # only the last line may be cut (a crash or a full disk mid-write)
                raise ValueError(f"{path}:{n}: not a JSON record; the metrics file is damaged") from None
            print(f"note: {path}:{n}: dropped a cut last line (the run was stopped mid-write)")
    return records


def plot_metrics(records: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """PNG plots of loss, temperature (logit scale), learning rate and every eval metric against step."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; safe in threads and on servers
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    written = []

    def series(rows, key):
        pts = [
            (r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float) and math.isfinite(r[key])
        ]
        return [p[0] for p in pts], [p[1] for p in pts]

    for key, title, fname in [
        ("loss", "training loss", "loss.png"),
        ("logit_scale", "logit scale (1 / temperature)", "temperature.png"),
        ("lr", "learning rate", "lr.png"),
    ]:
        xs, ys = series(train, key)
        if not xs:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(xs, ys)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=100)
        plt.close(fig)
        written.append(out_dir / fname)

    keys = sorted(
        {
            k
            for r in evals
            for k, v in r.items()
            if k not in ("step", "kind", "time") and isinstance(v, int | float)
        }
    )
    if keys:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for k in keys:
            xs, ys = series(evals, k)
            ax.plot(xs, ys, marker="o", label=k)
        ax.set_xlabel("step")
        ax.set_title("evaluation")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "eval.png", dpi=100)
        plt.close(fig)
        written.append(out_dir / "eval.png")
    return written
