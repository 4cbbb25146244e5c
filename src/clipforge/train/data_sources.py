"""Training data and in-training evaluators from files: manifests, image folders, WebDataset shards.

    source = open_train_source(exp)                  # records read, captions checked (BPE can train now)
    source.attach(transform, tokenizer, ctx)         # then batches of {"image", "text"}
    stream = SkipReport(source.stream(exp, ...), source.skips, run_dir.metrics)

Bad samples are dropped and counted by reason (`clipforge.data.SkipCounter`); `SkipReport` prints the
counts of every epoch when it ends and appends them to metrics.jsonl as a {"kind": "data"} record. A
map-style source (manifest, folder) counts a bad image each epoch it comes up; a shard stream counts each
bad sample once per pass over the shards; bad captions are counted once, when the source is read.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from ..data import PairDataset, SkipCounter, open_pairs, read_folder, read_manifest
from ..data.seeding import forked_rng
from ..data.wds import WebDatasetPairs, shard_urls
from ..transforms import ImageLoadError, load_image
from .distributed_data import DistributedWebDataset, check_shard_split
from .experiment import Experiment
from .trainer import BatchStream, IterableBatchStream, _seed_for


# ------------------------------------------------------------------------------------------ training
class SeededTransformStream(IterableDataset):
    """A shard stream whose random augmentation is a function of (seed, epoch, worker, position).

    WebDatasetPairs would otherwise draw crops from the global RNG, which a resumed run replays
    differently (it re-reads the skipped batches after the RNG state was restored)."""

    def __init__(self, pairs: WebDatasetPairs, transform: Callable, seed: int) -> None:
        self.pairs, self.transform, self.seed, self.epoch = pairs, transform, seed, 0
        self.skips = pairs.skips

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.pairs.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        for n, item in enumerate(self.pairs):
            with forked_rng(_seed_for(self.seed, self.epoch, (worker << 40) + n)):
                image = self.transform(item["image"])
            yield {"image": image, "text": item["text"]}


class TrainSource:
    """The training pairs of an experiment; `captions()` before `attach()` (e.g. to train a BPE)."""

    def __init__(self, exp: Experiment) -> None:
        d = exp.data
        self.kind, self.path, self.exp = d.kind, d.train, exp
        if d.kind == "webdataset":
            self.pairs: PairDataset | WebDatasetPairs = DistributedWebDataset(
                d.train,
                split=d.split,
                shuffle_buffer=d.shuffle_buffer if d.shuffle else 0,
                shuffle_shards=d.shuffle,
                seed=exp.run.seed,
                caption_key=d.caption_key,
            )
        elif d.kind in ("manifest", "folder"):
            p = Path(d.train)
            if d.kind == "folder" and not p.is_dir():
                raise FileNotFoundError(f"data.train: image folder not found: {p}")
            if d.kind == "manifest" and p.is_dir():
                raise ValueError(
                    f"data.train: {p} is a folder; use data.kind=folder, or give a manifest file"
                )
            kwargs: dict[str, Any] = (
                {"image_key": d.image_key, "caption_key": d.caption_key, "sep": d.caption_sep, "root": d.root}
                if d.kind == "manifest"
                else {}
            )
            # seed=None: caption choice from the global RNG, which BatchStream seeds per (epoch, sample)
            self.pairs = open_pairs(p, retry=True, **kwargs)
        else:
            raise ValueError(f"data.kind={d.kind!r} is not a file source")
        self.skips: SkipCounter = self.pairs.skips

    def captions(self) -> list[str]:
        if isinstance(self.pairs, PairDataset):
            return self.pairs.captions()
        return shard_captions(self.pairs.urls, self.exp.data.caption_key)

    def attach(self, transform: Callable, tokenizer: Callable, context_length: int) -> None:
        self.pairs.tokenizer, self.pairs.context_length = tokenizer, context_length
        self.transform = transform
        if isinstance(self.pairs, PairDataset):
            self.pairs.transform = transform

    def stream(
        self, batch_size: int, seed: int, pin_memory: bool = False, rank: int = 0, world_size: int = 1
    ) -> BatchStream | IterableBatchStream:
        """batch_size is the global batch; with several processes each loads its share: rows of the global
        batches (files), or batch_size / world_size pairs from its own shards (WebDataset)."""
        d = self.exp.data
        if isinstance(self.pairs, PairDataset):
            return BatchStream(
                self.pairs,
                batch_size,
                seed=seed,
                shuffle=d.shuffle,
                workers=d.workers,
                pin_memory=pin_memory,
                rank=rank,
                world_size=world_size,
            )
        if d.split == "epoch":  # a rank without shards would hang the job: stop every rank now instead
            check_shard_split(len(self.pairs.urls), world_size)
        return IterableBatchStream(
            SeededTransformStream(self.pairs, self.transform, seed),
            batch_size // world_size,
            workers=d.workers,
        )


def shard_captions(urls: list[str], caption_key: str = "caption") -> list[str]:
    """Every caption in the shards (a sample's txt member, one per line, else its json), without
    decoding any image: the corpus for a BPE vocabulary."""
    out: list[str] = []
    for url in tqdm(urls, desc="reading shard captions", leave=False, disable=len(urls) < 8):
        members: dict[str, dict[str, bytes]] = {}
        try:
            with tarfile.open(url) as tar:
                for m in tar:
                    key, _, ext = m.name.rpartition(".")
                    if m.isfile() and ext in ("txt", "json"):
                        members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        except (tarfile.TarError, OSError):
            continue  # the training stream counts unreadable shards
        for parts in members.values():
            try:
                if "txt" in parts:
                    caps: list[Any] = parts["txt"].decode("utf-8").splitlines()
                else:
                    meta = json.loads(parts["json"])
                    caps = meta.get("captions", meta.get(caption_key)) if isinstance(meta, dict) else None
                    caps = caps if isinstance(caps, list) else [caps]
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            out.extend(" ".join(c.split()) for c in caps if isinstance(c, str))
    return [c for c in out if c]


# ------------------------------------------------------------------------------------------ reporting
def _sub(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    return {k: int(v) - int(b.get(k, 0)) for k, v in a.items() if int(v) - int(b.get(k, 0))}


def _add(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    return {k: int(a.get(k, 0)) + int(b.get(k, 0)) for k in {**a, **b}}


def _fmt(counts: Mapping[str, int], examples: Mapping[str, list[str]] | None = None) -> str:
    if not counts:
        return "none"
    examples = examples or {}
    return ", ".join(
        f"{k} {v}" + (f" (e.g. {examples[k][0]})" if examples.get(k) else "") for k, v in counts.items()
    )


class SkipReport:
    """Wraps a batch stream: skip counts survive --resume (they travel in the data state) and each
    epoch's counts are printed and appended to `metrics` when the epoch ends."""

    def __init__(
        self,
        stream: BatchStream | IterableBatchStream,
        skips: SkipCounter,
        metrics: str | Path | None = None,
        echo: Callable[[str], None] = tqdm.write,
    ) -> None:
        self.stream, self.skips, self.echo = stream, skips, echo
        self.metrics = Path(metrics) if metrics is not None else None
        self.batch_size = stream.batch_size
        self.batches = 0  # batches handed out since the run began (= trainer steps)
        self._earlier: dict[str, int] = {}  # counted by the processes before a resume
        self._epoch_start: dict[str, int] = {}
        stream.on_epoch_end = self._epoch_end

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    def skip_counts(self) -> dict[str, int]:
        """Counts by reason since the run began."""
        return _add(self._earlier, self.skips.counts())

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
        self._earlier = dict(state.get("skipped", {}))
        self._epoch_start = dict(state.get("skipped_at_epoch_start", {}))

    def __iter__(self) -> Iterator[Any]:
        for batch in self.stream:
            self.batches += 1
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
            f"({_fmt(this, self.skips.examples())}); since the start: {_fmt(total)}"
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


# ------------------------------------------------------------------------------------------ evaluation
class ImageFiles(Dataset):
    """Images from paths with a (deterministic) eval transform, in the given order."""

    def __init__(self, paths: list[Path], transform: Callable) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.transform(load_image(self.paths[i]))}


def _is_shards(path: str) -> bool:
    p = Path(path)
    return path.endswith(".tar") or "{" in path or (p.is_dir() and any(p.glob("*.tar")))


def retrieval_evaluator(exp: Experiment, transform: Callable):
    """RetrievalEvaluator over `data.val`: held-out pairs (manifest, caption folder or shards); images that
    cannot be read are dropped (counted, printed) once, here."""
    from ..eval import RetrievalEvaluator
    from ..eval.datasets import RetrievalSet

    d = exp.data
    if _is_shards(d.val):
        rs = RetrievalSet.from_tars(shard_urls(d.val), transform)
        return RetrievalEvaluator(rs.images, rs.captions, rs.text_to_image)
    skips = SkipCounter(d.val)
    if Path(d.val).is_dir():
        records = read_folder(d.val, skips=skips)
    else:
        records = read_manifest(
            d.val, d.image_key, d.caption_key, sep=d.caption_sep, root=d.root, skips=skips
        )
    good = []
    for r in records:
        try:
            load_image(r.image)
            good.append(r)
        except FileNotFoundError:
            skips.record("missing_image", str(r.image))
        except (ImageLoadError, OSError, ValueError) as e:
            skips.record("corrupt_image", f"{r.image}: {str(e)[:80]}")
    if skips.total:
        tqdm.write(f"data.val: {skips.summary()}")
    if not good:
        raise ValueError(f"data.val: no usable image-caption pairs in {d.val} ({skips.summary()})")
    return RetrievalEvaluator(
        ImageFiles([r.image for r in good], transform), [list(r.captions) for r in good]
    )


def zeroshot_evaluator(exp: Experiment, transform: Callable):
    """ZeroShotEvaluator over `data.val_labelled` (class folders or a manifest with labels), prompts from
    `data.templates` filled with the class names."""
    from ..eval import ZeroShotEvaluator, load_templates
    from ..eval.datasets import ImageFolderDataset, ManifestClassificationDataset

    d = exp.data
    p = Path(d.val_labelled)
    if p.is_dir():
        ds = ImageFolderDataset(p, transform, d.classnames)
    else:
        ds = ManifestClassificationDataset(p, transform, d.classnames, d.image_key, d.label_key)
    return ZeroShotEvaluator(ds.classnames, load_templates(d.templates), ds)


def file_evaluators(exp: Experiment, transform: Callable, tokenizer) -> dict[str, Callable]:
    """{"zeroshot": ..., "retrieval": ...} for the validation sets the experiment names."""
    evs: dict[str, Any] = {}
    if exp.data.val_labelled:
        evs["zeroshot"] = zeroshot_evaluator(exp, transform)
    if exp.data.val:
        evs["retrieval"] = retrieval_evaluator(exp, transform)
    return {k: (lambda m, ev=ev: ev.run(m, tokenizer)) for k, ev in evs.items()}
