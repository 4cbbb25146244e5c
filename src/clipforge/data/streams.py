"""Resumable batch streams over datasets (per-epoch reports of the samples they skipped: skip_report.py).

    stream = BatchStream(dataset, 64, seed=0)              # map-style: (epoch, samples consumed)
    stream = IterableBatchStream(shard_stream, 64)         # streams: batches consumed

The trainer iterates a stream and saves `state_dict()` with every checkpoint; a stream restored from it
continues with the very next batch, so an interrupted run neither loses nor repeats data. Random
augmentation is seeded from (seed, epoch, position), never from the order workers happen to run in.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from ..transforms import ImageLoadError
from .seeding import forked_rng
from .skips import format_counts


# ------------------------------------------------------------------------------------------ streams
def _seed_for(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch) * 1_000_000_007 + index & 0x7FFF_FFFF_FFFF


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGINT from outside to the main process, but obey their parent.

    A scheduler's preemption signal goes to the whole process group; a worker that died of it would crash
    the main process before it could write its checkpoint at the step boundary, so the main process stops
    its workers itself. Its own SIGTERM (DataLoader shutdown, multiprocessing's exit handler terminating
    daemonic children) must still end them, or the main process waits for them forever at exit: where the
    platform can tell the sender (Linux), SIGTERM is taken by a thread that exits only when it comes from
    the parent. Workers are born with both signals blocked (`start_workers`), so none is lost to the
    start-up window before this runs.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):
        parent = os.getppid()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit it

        def obey_parent_only() -> None:
            while True:
                if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                    os._exit(0)  # nothing to flush: a worker's results go through the parent's queue

        threading.Thread(target=obey_parent_only, name="clipforge-sigterm", daemon=True).start()
        unblock = {signal.SIGINT}
    else:  # e.g. macOS: no sender pid; the parent shuts its workers down through their queues
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        unblock = {signal.SIGINT, signal.SIGTERM}
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, unblock)  # pending ones are now ignored


def start_workers(loader: DataLoader) -> Iterator[Any]:
    """`iter(loader)` with its worker processes forked while SIGTERM/SIGINT are blocked: a signal that
    arrives before a worker has run `ignore_stop_signals` waits for it instead of killing the worker."""
    if loader.num_workers == 0 or not hasattr(signal, "pthread_sigmask"):
        return iter(loader)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)  # a signal that came meanwhile is delivered now


class _SeededItems(Dataset):
    """dataset[(epoch, i)] = dataset[i] with random augmentation seeded by (seed, epoch, i).

    Augmentations then depend only on the sample's position in the schedule, not on which worker draws
    it or on whether the run was resumed in between.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        with forked_rng(_seed_for(self.seed, epoch, i)):
            return self.dataset[i]


class BatchStream:
    """Endless batches from a map-style dataset with a resumable position (epoch, samples consumed).

    Each epoch is a permutation drawn from (seed, epoch); incomplete last batches are dropped (a contrastive
    batch should have a fixed size). `state_dict()` taken after a batch was handed out resumes with the
    very next one: nothing is lost or repeated.

    Data-parallel: batch_size is the global batch; rank r of world_size loads rows [r*b, (r+1)*b) of each
    (b = batch_size / world_size). The order and the position are those of the global batches, so a run
    yields the same batches at any world size and resumes at another one.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        workers: int = 0,
        collate_fn: Callable | None = None,
        pin_memory: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size % world_size:
            raise ValueError(f"the global batch {batch_size} does not split over {world_size} ranks")
        self.rank, self.local_batch = rank, batch_size // world_size
        if isinstance(dataset, IterableDataset):
            raise TypeError("BatchStream needs a map-style dataset; use IterableBatchStream for streams")
        n = len(dataset)
        if n < batch_size:
            raise ValueError(f"the training set has {n} samples, fewer than one batch of {batch_size}")
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        self.workers, self.collate_fn, self.pin_memory = workers, collate_fn, pin_memory
        self.epoch, self.index = 0, 0
        self.on_epoch_end: Callable[[int], None] | None = None  # called after an epoch's last batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    @property
    def _mine(self) -> slice:
        return slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)

    def _order(self, epoch: int) -> list[int]:
        n = len(self.dataset)
        if not self.shuffle:
            return list(range(n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(n, generator=g).tolist()

    def __iter__(self) -> Iterator[Any]:
        items = _SeededItems(self.dataset, self.seed)
        while True:
            epoch, order = self.epoch, self._order(self.epoch)
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            full = len(order) - len(order) % self.batch_size
            batches = [
                [(epoch, i) for i in order[s : s + self.batch_size]][self._mine]
                for s in range(self.index, full, self.batch_size)
            ]
            # A private generator: creating the loader must not consume the global RNG (resume exactness).
            loader = DataLoader(
                items,
                worker_init_fn=ignore_stop_signals,
                batch_sampler=batches,
                num_workers=self.workers,
                collate_fn=self.collate_fn,
                pin_memory=self.pin_memory,
                generator=torch.Generator().manual_seed(self.seed),
                persistent_workers=False,
            )
            for batch in start_workers(loader):
                self.index += self.batch_size
                yield batch
            if self.on_epoch_end is not None:  # every sample of the epoch has been loaded by now
                self.on_epoch_end(epoch)
            self.epoch, self.index = epoch + 1, 0

    def skip_counts(self) -> dict[str, int]:
        return _skip_counts(self.dataset)


class IterableBatchStream:
    """Batches from a streaming dataset (e.g. WebDataset shards); the position is the number of batches
    consumed, and a resume skips that many (the stream's own order must be deterministic from its seed)."""

    def __init__(
        self,
        dataset: IterableDataset,
        batch_size: int,
        *,
        workers: int = 0,
        collate_fn=None,
        pin_memory: bool = False,
    ) -> None:
        self.dataset, self.batch_size, self.workers, self.collate_fn = (
            dataset,
            batch_size,
            workers,
            collate_fn,
        )
        self.pin_memory = pin_memory  # page-locked batches: asynchronous copies to the GPU
        self.epoch, self.index = 0, 0
        self.on_epoch_end: Callable[[int], None] | None = None  # called after an epoch's last batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def __iter__(self) -> Iterator[Any]:
        while True:
            if hasattr(self.dataset, "set_epoch"):  # shard order and shuffle buffer depend on the epoch
                self.dataset.set_epoch(self.epoch)
            loader = DataLoader(
                self.dataset,
                worker_init_fn=ignore_stop_signals,
                batch_size=self.batch_size,
                num_workers=self.workers,
                collate_fn=self.collate_fn,
                pin_memory=self.pin_memory,
                drop_last=True,
                # a private generator: creating the loader must not consume the global RNG (resume)
                generator=torch.Generator().manual_seed(self.epoch),
            )
            skip, seen = self.index // self.batch_size, 0
            for k, batch in enumerate(start_workers(loader)):
                seen += 1
                if k < skip:
                    continue
                self.index += self.batch_size
                yield batch
            if seen == 0:  # e.g. every shard unreadable: say what was skipped (workers count into it too)
                counts = _skip_counts(self.dataset)
                raise ValueError(
                    f"the training stream yielded no complete batch of {self.batch_size}; "
                    f"skipped: {format_counts(counts)}"
                )
            if self.on_epoch_end is not None:
                self.on_epoch_end(self.epoch)
            self.epoch, self.index = self.epoch + 1, 0

    def skip_counts(self) -> dict[str, int]:
        return _skip_counts(self.dataset)


def _skip_counts(dataset: Any) -> dict[str, int]:
    """Skipped-sample counts from the dataset's SkipCounter-like attribute, if it has one."""
    for name in ("skips", "skip_counter", "skipped"):
        counter = getattr(dataset, name, None)
        if counter is None:
            continue
        for method in ("as_dict", "to_dict", "counts"):
            fn = getattr(counter, method, None)
            if callable(fn):
                return dict(fn())
        if isinstance(counter, Mapping):
            return dict(counter)
    inner = getattr(dataset, "dataset", None)
    return _skip_counts(inner) if inner is not None and inner is not dataset else {}


class SeededTransformStream(IterableDataset):
    """A shard stream whose random augmentation is a function of (seed, epoch, worker, position).

    WebDatasetPairs would otherwise draw crops from the global RNG, which a resumed run replays
    differently (it re-reads the skipped batches after the RNG state was restored)."""

    def __init__(self, pairs: IterableDataset, transform: Callable, seed: int) -> None:
        self.pairs, self.transform, self.seed, self.epoch = pairs, transform, seed, 0
        self.skips = pairs.skips
        # a transform that decodes (FastTrainTransform) gets the image bytes; a corrupt image then fails
        # in the transform and is counted here instead of in the reader
        self.decodes = bool(getattr(transform, "accepts_encoded", False)) and hasattr(pairs, "lazy_images")
        if self.decodes:
            pairs.lazy_images = True

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.pairs.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        n = 0  # position among delivered items: a corrupt image moves no later sample's crop
        for item in self.pairs:
            with forked_rng(_seed_for(self.seed, self.epoch, (worker << 40) + n)):
                try:
                    image = self.transform(item["image"])
                except ImageLoadError as e:
                    if not self.decodes:
                        raise
                    self.skips.record("corrupt_image", str(e)[:160])
                    continue
            n += 1
            yield {"image": image, "text": item["text"]}
