"""Counting skipped samples: bad data is dropped, never silently and never with a crash.

A SkipCounter keeps its counts in a small shared-memory tensor, one row per process (the main process
and each DataLoader worker write only their own row), so counts recorded inside workers are visible
in the main process without locks. Detail strings (e.g. the offending file) are kept in the process
that recorded them, a few per reason; the first one of each reason and process also goes into a shared
byte table, so the main process's summary names the files a worker skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch.utils.data import get_worker_info

log = logging.getLogger("clipforge.data")

# Why a sample was dropped. Image reasons count images, caption reasons count captions (rows, list items).
REASONS = (
    "missing_image",  # the path does not exist
    "corrupt_image",  # not decodable: truncated, wrong format, decompression bomb
    "no_image",  # a row without an image path / a shard sample without an image member
    "empty_caption",  # an empty or whitespace-only caption (or caption file)
    "non_text_caption",  # a number, null, dict ... where a caption should be, or undecodable bytes
    "no_caption",  # an image without any caption (no sidecar, no txt/json member)
    "bad_row",  # a manifest line that cannot be parsed
    "corrupt_shard",  # a tar shard that cannot be read fully (cut, not a tar) and has no sizes.json count
    "lost_in_shard",  # samples a cut or corrupt shard did not deliver (its sizes.json count minus those read)
)
_MAX_WORKERS = 256  # rows 1..256 belong to DataLoader workers 0..255; beyond that rows are shared
_EXAMPLES_PER_REASON = 3
_SHARED_DETAIL_BYTES = 160  # the first detail per (process, reason), UTF-8, zero-padded


@dataclass(frozen=True)
class Skipped:
    """Returned in place of a sample by a map-style dataset with `retry=False`; `collate_pairs` drops
    and counts it."""

    reason: str
    detail: str = ""


class SkipCounter:
    """Counts of skipped samples by reason; safe to record into from DataLoader worker processes.

    >>> skips = SkipCounter("train.csv")
    >>> skips.record("missing_image", "img/1.jpg")
    >>> skips.counts()
    {'missing_image': 1}
    """

    def __init__(self, source: str = "") -> None:
        self.source = source
        # (process slot, reason); moved to shared memory so forked/spawned workers write into it
        self._table = torch.zeros(_MAX_WORKERS + 1, len(REASONS), dtype=torch.int64)
        self._details = torch.zeros(_MAX_WORKERS + 1, len(REASONS), _SHARED_DETAIL_BYTES, dtype=torch.uint8)
        try:
            self._table.share_memory_()
            self._details.share_memory_()
        except RuntimeError:  # no shared memory here (e.g. a tiny /dev/shm): worker counts stay in workers
            log.warning(
                "SkipCounter: shared memory unavailable; skips inside DataLoader workers are not counted"
            )
        self._examples: dict[str, list[str]] = {}

    def record(self, reason: str, detail: str = "", n: int = 1) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; known: {', '.join(REASONS)}")
        info = get_worker_info()
        slot, col = (0 if info is None else 1 + info.id % _MAX_WORKERS), REASONS.index(reason)
        self._table[slot, col] += n
        if detail and not int(self._details[slot, col, 0]):
            raw = detail.encode("utf-8", "replace")[:_SHARED_DETAIL_BYTES]
            self._details[slot, col, : len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        examples = self._examples.setdefault(reason, [])
        if not examples:
            where = f" in {self.source}" if self.source else ""
            log.warning("skipping a sample%s: %s%s", where, reason, f" ({detail})" if detail else "")
        if detail and len(examples) < _EXAMPLES_PER_REASON:
            examples.append(detail)

    def counts(self) -> dict[str, int]:
        """{reason: count} for every reason seen at least once, in REASONS order."""
        totals = self._table.sum(0).tolist()
        return {r: int(c) for r, c in zip(REASONS, totals, strict=True) if c}

    as_dict = counts  # the name the trainer looks for

    @property
    def total(self) -> int:
        return int(self._table.sum())

    def examples(self) -> dict[str, list[str]]:
        """A few recorded details per reason: this process's, then the first one of each worker."""
        out = {r: list(v) for r, v in self._examples.items() if v}
        info = get_worker_info()
        mine = 0 if info is None else 1 + info.id % _MAX_WORKERS
        filled = self._details[:, :, 0].nonzero().tolist()
        for slot, col in filled:
            have = out.setdefault(REASONS[col], [])
            if slot == mine or len(have) >= _EXAMPLES_PER_REASON:
                continue
            raw = bytes(self._details[slot, col].tolist()).rstrip(b"\0")
            detail = raw.decode("utf-8", "replace")
            if detail not in have:
                have.append(detail)
        return {r: v for r, v in out.items() if v}

    def update(self, other: SkipCounter | Mapping[str, int]) -> None:
        """Add another counter's (or a {reason: count} dict's) counts into this one."""
        counts = other.counts() if isinstance(other, SkipCounter) else other
        for reason, n in counts.items():
            if n:
                self.record(reason, n=int(n))
        if isinstance(other, SkipCounter):
            for reason, details in other.examples().items():
                mine = self._examples.setdefault(reason, [])
                mine.extend(details[: _EXAMPLES_PER_REASON - len(mine)])

    def reset(self) -> None:
        self._table.zero_()
        self._details.zero_()
        self._examples.clear()

    def summary(self) -> str:
        """One line for logs, e.g. 'skipped 3 in x.csv: missing_image 1 (e.g. a.jpg), ...'."""
        counts = self.counts()
        where = f" in {self.source}" if self.source else ""
        if not counts:
            return f"no samples skipped{where}"
        parts = []
        examples = self.examples()
        for reason, n in counts.items():
            ex = examples.get(reason)
            parts.append(f"{reason} {n}" + (f" (e.g. {', '.join(ex)})" if ex else ""))
        return f"skipped {sum(counts.values())}{where}: " + ", ".join(parts)

    def __repr__(self) -> str:
        return f"SkipCounter({self.source!r}, {self.counts()})"


def format_counts(counts: Mapping[str, int], examples: Mapping[str, list[str]] | None = None) -> str:
    """'missing_image 2 (e.g. a.jpg), bad_row 1' (the first example of each reason), or 'none'."""
    if not counts:
        return "none"
    examples = examples or {}
    return ", ".join(
        f"{k} {v}" + (f" (e.g. {examples[k][0]})" if examples.get(k) else "") for k, v in counts.items()
    )
