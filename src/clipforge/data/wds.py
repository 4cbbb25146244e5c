"""WebDataset tar shards: stream pairs from them (the `webdataset` package) and write them.

The format is the one img2dataset writes: members `<key>.jpg|png|webp` plus `<key>.txt` (the caption;
here one caption per line when an image has several) and/or `<key>.json` (`caption` or `captions`).

Reading is deterministic from `seed`: shards are shuffled per epoch (`set_epoch`), split over ranks
(torch.distributed / RANK, WORLD_SIZE) and DataLoader workers, and samples pass a seeded shuffle buffer.
Bad samples and unreadable shards are dropped and counted in `dataset.skips` (shared with workers).

A shard cut mid-write is the common fault, and tarfile hides most cuts: a header cut at any offset but
the first ends the archive silently. So every shard is read on its own (`shard_samples`) and checked
afterwards: a tar error, a missing end-of-archive marker, or fewer samples than `sizes.json` lists. The
samples it did not deliver are counted (`lost_in_shard`; without a sizes.json entry the shard counts
once as `corrupt_shard`), naming the shard and the member where reading stopped. The last sample before
the cut, when it lacks its image or caption member, is the one the cut went through: counted with the
cut, not as a sample without a caption.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from tqdm import tqdm
from webdataset.shardlists import expand_urls
from webdataset.tariterators import tarfile_samples
from webdataset.utils import pytorch_worker_info

from ..transforms import EncodedImage, ImageLoadError, load_image
from .pairs import encode_text
from .skips import SkipCounter, Skipped

SHARD_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


def shard_urls(urls: str | Path | Sequence[str | Path]) -> list[str]:
    """Shard list from a brace pattern ("shards/{000000..000009}.tar"), a folder (its *.tar), a
    `::`-separated string or a list. Local files must exist."""
    if isinstance(urls, str | Path) and Path(urls).is_dir():
        out = sorted(str(p) for p in Path(urls).glob("*.tar"))
        if not out:
            raise FileNotFoundError(f"no .tar shards in {urls}")
        return out
    out = expand_urls(str(urls)) if isinstance(urls, str | Path) else [str(u) for u in urls]
    local = [u for u in out if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(out)} shards not found, e.g. {missing[0]}")
    if not out:
        raise ValueError(f"no shards in {urls!r}")
    return out


def iter_samples(urls: Sequence[str], handler: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """Raw samples {"__key__", "__url__", ext: bytes} of the shards in order. Members are grouped into
    samples by webdataset's own rule (the key is the member path up to the first dot of its file name):
    the one key-splitting rule for training, evaluation, caching and BPE captions."""
    return tarfile_samples(({"url": u} for u in urls), handler=handler)


def listed_sizes(url: str, _cache: dict[Path, dict[str, int]] | None = None) -> int | None:
    """The sample count `sizes.json` next to a shard lists for it, or None."""
    folder = Path(url).parent
    if _cache is not None and folder in _cache:
        sizes = _cache[folder]
    else:
        f = folder / "sizes.json"
        try:
            sizes = json.loads(f.read_text()) if f.is_file() else {}
        except (OSError, ValueError):
            sizes = {}  # an unreadable sizes.json only costs the loss count, never the data
        if _cache is not None:
            _cache[folder] = sizes
    n = sizes.get(Path(url).name) if isinstance(sizes, dict) else None
    return int(n) if isinstance(n, int) else None


def tar_is_complete(url: str) -> bool:
    """Whether a local shard ends with tar's end-of-archive marker (two zero blocks, whole blocks): a file
    cut anywhere but inside that padding fails this (remote shards are not checked)."""
    path = Path(url)
    if "://" in url or url.startswith("pipe:") or not path.is_file():
        return True
    size = path.stat().st_size
    if size < 1024 or size % 512:
        return False
    with path.open("rb") as f:
        f.seek(size - 1024)
        return not any(f.read(1024))


def _error_text(exn: Exception) -> str:
    """A tar error without the file object webdataset appends to it ('... @ <_io.BufferedReader ...>')."""
    first = str(exn.args[0]) if exn.args else str(exn)
    return f"{type(exn).__name__}: {first.split(' @ ')[0][:100]}"


def shard_samples(urls: Sequence[str], skips: SkipCounter) -> Iterator[dict[str, Any]]:
    """`iter_samples`, shard by shard, counting into `skips` what a cut or unreadable shard did not
    deliver (see the module docstring). The samples read before the cut are kept."""
    sizes: dict[Path, dict[str, int]] = {}
    for url in urls:
        yield from _one_shard(url, skips, listed_sizes(url, sizes))


def _one_shard(url: str, skips: SkipCounter, expected: int | None) -> Iterator[dict[str, Any]]:
    errors: list[Exception] = []
    member = [""]  # the last member header read: where a cut shard stopped

    def seen(name: str) -> bool:
        member[0] = name
        return True

    def handler(exn: Exception) -> bool:
        errors.append(exn)
        return True  # go on: the samples before the fault are good, and the next shard may be too

    read, last = 0, None  # the last sample is held back until it is known whether the cut went through it
    for sample in tarfile_samples([{"url": url}], handler=handler, select_files=seen):
        if last is not None:
            yield last
        read, last = read + 1, sample
    why = _error_text(errors[0]) if errors else ("" if tar_is_complete(url) else "no end-of-archive marker")
    cut_short = bool(why) and last is not None and not _has_image_and_caption(last)
    if last is not None and not cut_short:
        yield last
    read -= int(cut_short)  # a partial sample is lost with the rest, not a sample without a caption
    where = f"{url}:{member[0]}" if member[0] else url
    if expected is not None and read < expected:
        lost = f"{where}: read {read} of the {expected} samples sizes.json lists"
        skips.record("lost_in_shard", lost + (f" ({why})" if why else ""), n=expected - read)
    elif why and expected is None:
        partial = f"sample {last['__key__']} cut short, it and " if cut_short else ""
        skips.record("corrupt_shard", f"{where}: {why}; {partial}the samples after it are lost")


def _has_image_and_caption(sample: dict[str, Any]) -> bool:
    return image_member(sample) is not None and ("txt" in sample or "json" in sample)


def sample_captions(sample: dict[str, Any], caption_key: str = "caption") -> list[str] | Skipped:
    """The captions of a raw sample: its txt member (one per line) or its json (`caption_key`, else
    "captions"; a string or a list), whitespace collapsed; or Skipped naming why not."""
    where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    if "txt" in sample:
        try:
            text = sample["txt"].decode("utf-8")
        except UnicodeDecodeError:
            return Skipped("non_text_caption", f"{where}.txt: not UTF-8")
        captions = [" ".join(line.split()) for line in text.splitlines()]
        captions = [c for c in captions if c]
        if not captions:
            return Skipped("empty_caption", f"{where}.txt")
        return captions
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            return Skipped("non_text_caption", f"{where}.json: not JSON")
        if isinstance(meta, list):
            meta = {"captions": meta}
        key = caption_key if isinstance(meta, dict) and caption_key in meta else "captions"
        if not isinstance(meta, dict) or key not in meta:
            return Skipped("no_caption", f"{where}.json has no {caption_key!r}")
        items = meta[key] if isinstance(meta[key], list) else [meta[key]]
        if not any(isinstance(v, str) for v in items):
            return Skipped("non_text_caption", f"{where}.json: {type(meta[key]).__name__} {caption_key!r}")
        captions = [" ".join(v.split()) for v in items if isinstance(v, str)]
        captions = [c for c in captions if c]
        if not captions:
            return Skipped("empty_caption", f"{where}.json")
        return captions
    return Skipped("no_caption", where)


def image_member(sample: dict[str, Any]) -> str | None:
    """The extension of a sample's image member, if it has one."""
    return next((e for e in SHARD_IMAGE_EXTS if e in sample), None)


def decode_sample(
    sample: dict[str, Any], caption_key: str = "caption", lazy: bool = False
) -> tuple[Image.Image | EncodedImage, list[str]] | Skipped:
    """(RGB image, captions) of a raw WebDataset sample, or Skipped naming why not. With `lazy` the image
    stays encoded (an EncodedImage for a transform that decodes it itself, e.g. at reduced scale)."""
    where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    ext = image_member(sample)
    if ext is None:
        return Skipped("no_image", where)
    captions = sample_captions(sample, caption_key)
    if isinstance(captions, Skipped):
        return captions
    if lazy:
        return EncodedImage(sample[ext], f"{where}.{ext}"), captions
    try:
        image = load_image(io.BytesIO(sample[ext]), name=f"{where}.{ext}")
    except (ImageLoadError, OSError, ValueError) as e:
        return Skipped("corrupt_image", str(e)[:160])
    return image, captions


def shard_captions(urls: list[str], caption_key: str = "caption", *, progress: bool = True) -> list[str]:
    """Every caption in the shards, without decoding any image: the corpus for a BPE vocabulary.
    Unreadable shards and samples are passed over here (the training stream counts them). A progress
    bar from 8 shards on, unless `progress` is False."""
    out: list[str] = []
    for sample in tqdm(
        iter_samples(urls, handler=lambda exn: True), desc="reading shard captions", leave=False,
        disable=not progress or len(urls) < 8,
    ):  # fmt: skip
        captions = sample_captions(sample, caption_key)
        if not isinstance(captions, Skipped):
            out.extend(captions)
    return out


class WebDatasetPairs(IterableDataset):
    """Streams {"image", "text"} items from WebDataset shards; see the module docstring."""

    def __init__(
        self,
        urls: str | Path | Sequence[str | Path],
        *,
        transform: Callable | None = None,
        tokenizer: Callable | None = None,
        context_length: int | None = None,
        shuffle_buffer: int = 1000,
        shuffle_shards: bool = True,
        seed: int = 0,
        caption_key: str = "caption",
        split_by_node: bool = True,
    ) -> None:
        self.urls = shard_urls(urls)
        self.source = str(urls) if isinstance(urls, str | Path) else f"{len(self.urls)} shards"
        self.transform, self.tokenizer, self.context_length = transform, tokenizer, context_length
        self.shuffle_buffer, self.shuffle_shards, self.seed = shuffle_buffer, shuffle_shards, seed
        self.caption_key, self.split_by_node, self.epoch = caption_key, split_by_node, 0
        self.skips = SkipCounter(self.source)
        # items carry EncodedImage bytes for a transform that decodes them (FastTrainTransform; set by
        # SeededTransformStream), so a JPEG can be decoded at the scale its crop needs
        self.lazy_images = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def num_samples(self) -> int | None:
        """Total samples from the `sizes.json` next to the shards, when every shard is listed there."""
        total = 0
        for url in self.urls:
            sizes_file = Path(url).parent / "sizes.json"
            sizes = json.loads(sizes_file.read_text()) if sizes_file.is_file() else {}
            if Path(url).name not in sizes:
                return None
            total += int(sizes[Path(url).name])
        return total

    def _my_shards(self) -> tuple[list[str], random.Random]:
        shards = list(self.urls)
        if self.shuffle_shards:
            random.Random(f"{self.seed}/{self.epoch}/shards").shuffle(shards)
        rank, world, worker, workers = pytorch_worker_info()
        if self.split_by_node:
            shards = shards[rank::world]
        shards = shards[worker::workers]
        return shards, random.Random(f"{self.seed}/{self.epoch}/{rank}/{worker}")

    def _raw(self, shards: list[str], rng: random.Random) -> Iterator[dict[str, Any]]:
        samples = shard_samples(shards, self.skips)
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        buf: list[dict[str, Any]] = []
        for s in samples:  # shuffle raw bytes (cheap to hold), decode only what leaves the buffer
            buf.append(s)
            if len(buf) >= self.shuffle_buffer:
                k = rng.randrange(len(buf))
                buf[k], buf[-1] = buf[-1], buf[k]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def __iter__(self) -> Iterator[dict[str, Any]]:
        shards, rng = self._my_shards()
        produced = 0
        for sample in self._raw(shards, rng):
            got = decode_sample(sample, self.caption_key, lazy=self.lazy_images)
            if isinstance(got, Skipped):
                self.skips.record(got.reason, got.detail)
                continue
            image, captions = got
            caption = captions[rng.randrange(len(captions))] if len(captions) > 1 else captions[0]
            image = self.transform(image) if self.transform is not None else image
            produced += 1
            yield {"image": image, "text": encode_text(self.tokenizer, caption, self.context_length)}
        # Inside a DataLoader worker an empty share is not fatal: another worker may hold the good shards,
        # and an exception here would stop the whole run for one corrupt shard. The main process's
        # stream says so (with these counts) when no worker delivered a batch.
        if shards and not produced and get_worker_info() is None:
            raise ValueError(
                f"no usable samples in {len(shards)} shard(s) of {self.source}, e.g. {shards[0]} "
                f"({self.skips.summary()})"
            )
