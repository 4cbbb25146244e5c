"""Dynamic batching: concurrent requests for one tower share a forward.

Each tower has a queue and one worker task. A request puts its items (texts or preprocessed images) on
the queue and awaits a future. The worker takes the oldest request, waits up to `window_s` for more
(or until `max_batch` items are queued), runs one forward over all of them in a thread (the event loop
keeps accepting requests meanwhile) and hands every request its rows. A request is never split across
forwards; with batching off every request gets a forward of its own.

The worker belongs to the event loop that first used the batcher; a later loop (a test client's new
portal) gets a fresh queue and worker, so nothing waits on a loop that no longer runs.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .errors import ApiError
from .metrics import ServerMetrics


@dataclass
class _Entry:
    items: Sequence[Any]
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    """`await batcher.submit(items) -> list of results` (one per item, in order).

    `forward(items) -> sequence of results` runs in this batcher's single thread, so one tower never runs
    two forwards at once (the model's own intra-op threads use the cores)."""

    def __init__(
        self,
        tower: str,
        forward: Callable[[list[Any]], Sequence[Any]],
        metrics: ServerMetrics,
        *,
        enabled: bool = True,
        max_batch: int = 32,
        window_s: float = 0.005,
        max_queue: int = 1024,
    ) -> None:
        self.tower, self.forward, self.metrics = tower, forward, metrics
        self.enabled, self.max_batch, self.window_s, self.max_queue = enabled, max_batch, window_s, max_queue
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"clipforge-{tower}")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: deque[_Entry] = deque()
        self._queued = 0  # items in the queue
        self._wake: asyncio.Event | None = None  # something was queued
        self._full: asyncio.Event | None = None  # a full batch is queued
        self._worker: asyncio.Task | None = None

    def _ensure_worker(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop and self._worker is not None and not self._worker.done():
            return
        self._loop = loop
        self._queue.clear()
        self._queued = 0
        self._wake, self._full = asyncio.Event(), asyncio.Event()
        self._worker = loop.create_task(self._run(), name=f"clipforge-batcher-{self.tower}")

    async def submit(self, items: Sequence[Any]) -> list[Any]:
        if not items:
            return []
        self._ensure_worker()
        if self._queued + len(items) > self.max_queue:
            raise ApiError(
                503, "busy", f"the {self.tower} queue holds {self._queued} items already: retry later"
            )
        entry = _Entry(list(items), asyncio.get_running_loop().create_future())
        self._queue.append(entry)
        self._queued += len(items)
        self.metrics.queue_depth.set(self.tower, value=self._queued)
        self._wake.set()
        if self._queued >= self.max_batch:
            self._full.set()
        return await entry.future

    def _take(self) -> list[_Entry]:
        """The oldest requests whose items fit one forward (at least one request)."""
        batch, n = [], 0
        while self._queue:
            size = len(self._queue[0].items)
            if batch and (not self.enabled or n + size > self.max_batch):
                break
            entry = self._queue.popleft()
            self._queued -= size
            if entry.future.done():  # its request was cancelled (timeout, client gone)
                continue
            batch.append(entry)
            n += size
        if self._queued < self.max_batch:
            self._full.clear()
        self.metrics.queue_depth.set(self.tower, value=self._queued)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            if self.enabled and self._queued < self.max_batch and self.window_s > 0:
                try:  # wait for company, at most window_s after the first request arrived
                    left = self.window_s - (time.perf_counter() - self._queue[0].queued_at)
                    if left > 0:
                        await asyncio.wait_for(self._full.wait(), left)
                except asyncio.TimeoutError:
                    pass
            batch = self._take()
            if not batch:
                continue
            items = [x for e in batch for x in e.items]
            try:
                results = await loop.run_in_executor(self.executor, self.forward, items)
            except Exception as exc:  # the model failed: every request of the batch learns why
                for e in batch:
                    if not e.future.done():
                        e.future.set_exception(exc)
                continue
            self.metrics.forwards.inc(self.tower)
            self.metrics.items.inc(self.tower, by=len(items))
            self.metrics.batch_size.observe(len(items), self.tower)
            start = 0
            for e in batch:
                n = len(e.items)
                if not e.future.done():
                    e.future.set_result(list(results[start : start + n]))
                start += n

    def close(self) -> None:
        if self._worker is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._worker.cancel)
        self.executor.shutdown(wait=False, cancel_futures=True)
