"""Prometheus text-format metrics without a dependency: counters, gauges and histograms with labels.

Only the server's own few series exist, so a plain dict per metric keyed by the label values is enough.
Label values come from route templates and tower names, never from raw request paths (bounded series).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, *labels: str, by: float = 1.0) -> None:
        with self._lock:
            self.values[labels] = self.values.get(labels, 0.0) + by

    def get(self, *labels: str) -> float:
        return self.values.get(labels, 0.0)

    def render(self) -> list[str]:
        return self.header() + [
            f"{self.name}{_labels(self.label_names, k)} {v:g}" for k, v in sorted(self.values.items())
        ]


class Gauge(Counter):
    kind = "gauge"

    def set(self, *labels: str, value: float) -> None:
        with self._lock:
            self.values[labels] = value


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self, name: str, help: str, labels: Sequence[str] = (), buckets: Sequence[float] = ()
    ) -> None:
        super().__init__(name, help, labels)
        self.buckets = tuple(buckets)
        self.counts: dict[tuple[str, ...], list[int]] = {}  # per bucket (not cumulative) + overflow
        self.sums: dict[tuple[str, ...], float] = {}

    def observe(self, value: float, *labels: str) -> None:
        with self._lock:
            counts = self.counts.setdefault(labels, [0] * (len(self.buckets) + 1))
            counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sums[labels] = self.sums.get(labels, 0.0) + value

    def count(self, *labels: str) -> int:
        return sum(self.counts.get(labels, []))

    def total(self, *labels: str) -> float:
        return self.sums.get(labels, 0.0)

    def render(self) -> list[str]:
        lines = self.header()
        for key, counts in sorted(self.counts.items()):
            running = 0
            for bound, c in zip((*self.buckets, float("inf")), counts):
                running += c
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                bucket = _labels(self.label_names, key, 'le="' + le + '"')
                lines.append(f"{self.name}_bucket{bucket} {running}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {self.sums[key]:g}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {running}")
        return lines


class ServerMetrics:
    """The series /metrics exposes."""

    def __init__(self) -> None:
        self.requests = Counter(
            "clipforge_requests_total", "HTTP requests by route and status", ("route", "status")
        )
        self.latency = Histogram(
            "clipforge_request_seconds", "request latency by route", ("route",), LATENCY_BUCKETS
        )
        self.batch_size = Histogram(
            "clipforge_batch_size", "items per model forward by tower", ("tower",), BATCH_BUCKETS
        )
        self.forwards = Counter("clipforge_forwards_total", "model forwards by tower", ("tower",))
        self.items = Counter("clipforge_items_total", "items embedded by tower", ("tower",))
        self.queue_depth = Gauge("clipforge_queue_depth", "items waiting for a forward by tower", ("tower",))
        self.index_vectors = Gauge("clipforge_index_vectors", "vectors in the served index")

    def render(self) -> str:
        metrics = (
            self.requests,
            self.latency,
            self.batch_size,
            self.forwards,
            self.items,
            self.queue_depth,
            self.index_vectors,
        )
        return "\n".join(line for m in metrics for line in m.render()) + "\n"
