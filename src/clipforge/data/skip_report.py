"""Per-epoch reports of the samples a batch stream skipped, with counts that survive --resume.

    stream = SkipReport(BatchStream(dataset, 64, seed=0), dataset.skips, "runs/x/metrics.jsonl")

Each epoch's counts (and, from `finish()`, those of the epoch the run stopped in) are printed and
appended to the metrics file as {"kind": "data", ...} records.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .skips import REASONS, SkipCounter, format_counts
from .streams import BatchStream, IterableBatchStream


def _sub(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    return {k: int(v) - int(b.get(k, 0)) for k, v in a.items() if int(v) - int(b.get(k, 0))}


def _add(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    return {k: int(a.get(k, 0)) + int(b.get(k, 0)) for k in {**a, **b}}


class SkipReport:
    """Wraps a batch stream: skip counts survive --resume (they travel in the data state) and each
    epoch's counts are printed and appended to `metrics` when the epoch ends."""

    def __init__(
        self,
        stream: BatchStream | IterableBatchStream,
        skips: SkipCounter,
        metrics: str | Path | None = None,
        echo: Callable[[str], None] = tqdm.write,
        reduce: Callable[[list[int]], list[int]] | None = None,
    ) -> None:
        self.stream, self.skips, self.echo = stream, skips, echo
        self.metrics = Path(metrics) if metrics is not None else None
        self.batch_size = stream.batch_size
        self.batches = 0  # batches handed out since the run began (= trainer steps)
        self._earlier: dict[str, int] = {}  # counted by the processes before a resume
        self._epoch_start: dict[str, int] = {}
        stream.on_epoch_end = self._epoch_end
        # Several ranks: each loads (and counts) only its own samples. `reduce` sums a list of counts over
        # the ranks (a collective); it runs as each batch is handed out, the same step on every rank, and
        # the reports use its sums. What the source counted while being read (e.g. bad manifest rows) is
        # the same on every rank and counts once.
        self.reduce = reduce
        self._shared = self.skips.counts()
        self._summed: dict[str, int] | None = None  # every rank's counts as of the last batch

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    def skip_counts(self) -> dict[str, int]:
        """Counts by reason since the run began (of every rank, as of the last batch, with `reduce`)."""
        return _add(self._earlier, self.skips.counts() if self._summed is None else self._summed)

    def _sum_over_ranks(self) -> None:
        mine = _sub(self.skips.counts(), self._shared)
        summed = self.reduce([mine.get(r, 0) for r in REASONS])
        self._summed = _add(self._shared, {r: int(n) for r, n in zip(REASONS, summed, strict=True) if n})

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.stream.state_dict(),
            "batches": self.batches,
            "skipped": self.skip_counts(),
            "skipped_at_epoch_start": dict(self._epoch_start),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.stream.load_state_dict(state)
        self.batches = int(state.get("batches", 0))
        # what this process counted so far (caption checks while reading) is in the saved totals already
        self.skips.reset()
        self._shared, self._summed = {}, None
        self._earlier = dict(state.get("skipped", {}))
        self._epoch_start = dict(state.get("skipped_at_epoch_start", {}))

    def __iter__(self) -> Iterator[Any]:
        for batch in self.stream:
            self.batches += 1
            if self.reduce is not None:
                self._sum_over_ranks()
            yield batch

    def _record(self, epoch: int, partial: bool) -> dict[str, Any]:
        total = self.skip_counts()
        this = _sub(total, self._epoch_start)
        record = {
            "kind": "data",
            "step": self.batches,
            "epoch": epoch,
            "partial": partial,
            "skipped": this,
            "skipped_total": total,
        }
        what = f"epoch {epoch} (so far)" if partial else f"epoch {epoch} done"
        self.echo(
            f"{what} at step {self.batches}: skipped {sum(this.values())} samples "
            f"({format_counts(this, self.skips.examples())}); since the start: {format_counts(total)}"
        )
        if self.metrics is not None:
            with self.metrics.open("a") as f:  # O_APPEND: whole lines next to the trainer's logger
                f.write(json.dumps(record) + "\n")
        return record

    def _epoch_end(self, epoch: int) -> None:
        self._record(epoch, partial=False)
        self._epoch_start = self.skip_counts()

    def finish(self) -> dict[str, Any]:
        """Report the (partial) epoch the run stopped in."""
        return self._record(self.stream.epoch, partial=True)
