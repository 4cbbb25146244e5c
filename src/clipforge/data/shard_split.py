"""Training data over several ranks: WebDataset shards split (epoch mode) or resampled, and sizes.json.

Epoch mode (WebDatasetPairs' own split): each epoch the shard list is shuffled from (seed, epoch), rank r
takes shards[r::world] and its DataLoader worker w of K takes [w::K] of those, so within an epoch every
sample is read exactly once by exactly one (rank, worker). A rank with no shard would produce no batch
while the others wait for it in the first collective: `check_shard_split` turns that into an error on
every rank before training starts (all ranks compute the same answer, no communication needed).
Ranks whose shards hold different sample counts end their epochs at different steps; the trainer's
stream simply continues into the next epoch, so steps stay in lockstep (balanced shards, as
`clipforge shards --max-count` writes them, keep the epochs aligned).

Resampled mode: each (rank, worker) draws ceil(shards / (world x workers)) shards *with replacement* per
epoch from (seed, epoch, rank, worker). No rank can run dry, every rank reads the same number of shards
per epoch, and it works with fewer shards than ranks; samples may repeat within an epoch (as in
OpenCLIP's `--dataset-resampled`). sizes.json gives the epoch length in both modes.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from webdataset.utils import pytorch_worker_info

from .wds import WebDatasetPairs

SPLIT_MODES = ("epoch", "resampled")


def check_shard_split(num_shards: int, world_size: int, workers: int = 1) -> None:
    """Raise when some rank would get no shard in epoch mode (the job would hang); say how to fix it."""
    if num_shards < world_size:
        raise ValueError(
            f"{num_shards} WebDataset shard(s) for {world_size} ranks: rank {num_shards} and above would get "
            f"none and the job would hang. Write at least {world_size} shards (clipforge shards --max-count "
            f"<fewer samples per shard>), run fewer processes, or use data.split=resampled"
        )


def shard_sizes(urls: list[str]) -> dict[str, int] | None:
    """{url: samples} from the sizes.json next to each shard; None when any shard is missing there."""
    out: dict[str, int] = {}
    cache: dict[Path, dict[str, int]] = {}
    for url in urls:
        folder = Path(url).parent
        if folder not in cache:
            f = folder / "sizes.json"
            cache[folder] = json.loads(f.read_text()) if f.is_file() else {}
        name = Path(url).name
        if name not in cache[folder]:
            return None
        out[url] = int(cache[folder][name])
    return out


def rank_shards(
    urls: list[str], rank: int, world_size: int, epoch: int, seed: int, shuffle: bool = True
) -> list[str]:
    """Rank `rank`'s shards of an epoch in epoch mode (the order WebDatasetPairs uses)."""
    shards = list(urls)
    if shuffle:
        random.Random(f"{seed}/{epoch}/shards").shuffle(shards)
    return shards[rank::world_size]


def epoch_plan(
    urls: list[str], world_size: int, global_batch: int, epoch: int = 0, seed: int = 0, shuffle: bool = True
) -> dict[str, object]:
    """From sizes.json: total samples, samples per rank this epoch, and the optimizer steps of an epoch
    (the smallest rank's complete local batches: after that a rank starts its next epoch)."""
    sizes = shard_sizes(urls)
    if sizes is None:
        return {"total": None, "per_rank": None, "steps_per_epoch": None}
    local_batch = max(1, global_batch // world_size)
    per_rank = [
        sum(sizes[u] for u in rank_shards(urls, r, world_size, epoch, seed, shuffle))
        for r in range(world_size)
    ]
    return {
        "total": sum(sizes.values()),
        "per_rank": per_rank,
        "steps_per_epoch": min(per_rank) // local_batch,
    }


class DistributedWebDataset(WebDatasetPairs):
    """WebDatasetPairs with `split`: "epoch" (each sample once per epoch, checked so no rank is empty) or
    "resampled" (shards drawn with replacement per rank and worker; see the module docstring)."""

    def __init__(self, urls, *, split: str = "epoch", **kwargs) -> None:
        if split not in SPLIT_MODES:
            raise ValueError(f"unknown data split {split!r}; choose one of {SPLIT_MODES}")
        super().__init__(urls, **kwargs)
        self.split = split

    def _my_shards(self):
        rank, world, worker, workers = pytorch_worker_info()
        if not self.split_by_node:
            rank, world = 0, 1
        if self.split == "epoch":
            check_shard_split(len(self.urls), world)
            return super()._my_shards()
        per = math.ceil(len(self.urls) / (world * workers))
        draw = random.Random(f"{self.seed}/{self.epoch}/{rank}/{worker}/resample")
        shards = [draw.choice(self.urls) for _ in range(per)]
        return shards, random.Random(f"{self.seed}/{self.epoch}/{rank}/{worker}")
