"""Writing WebDataset tar shards (`clipforge shards`): from a manifest or a folder, balanced by count or size,
with `sizes.json` beside them; into a fresh folder, or replacing one with --overwrite (see wds.py for
the reading side).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from ..transforms import ImageLoadError, load_image
from .pairs import PairRecord
from .skips import SkipCounter, Skipped

# image formats stored as they are; others are re-encoded as PNG, which every WebDataset reader decodes
WRITTEN_AS_IS = ("jpg", "jpeg", "png", "webp")


def parse_size(text: str | int | float) -> int:
    """'100MB' -> 100_000_000, '1GiB' -> 2**30, 5000 -> 5000 (bytes)."""
    if isinstance(text, int | float):
        return int(text)
    units = {
        "": 1,
        "b": 1,
        "k": 10**3,
        "kb": 10**3,
        "m": 10**6,
        "mb": 10**6,
        "g": 10**9,
        "gb": 10**9,
        "kib": 2**10,
        "mib": 2**20,
        "gib": 2**30,
    }
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num) :]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in units or value <= 0:
        raise ValueError(f"cannot read size {text!r}: use e.g. 100MB, 1.5GB, 512MiB or a byte count")
    return int(value * units[unit])


@dataclass
class ShardWriteReport:
    shards: dict[str, int]  # shard file name -> samples
    skips: SkipCounter
    out_dir: Path
    pattern: str = ""
    total: int = field(init=False)

    def __post_init__(self) -> None:
        self.total = sum(self.shards.values())

    def summary(self) -> str:
        return (
            f"wrote {self.total} samples in {len(self.shards)} shards to {self.out_dir} ({self.pattern}); "
            f"{self.skips.summary()}"
        )


def _tar_bytes(n: int) -> int:
    return 512 + (n + 511) // 512 * 512  # header + data padded to blocks


def _encode_record(
    item: PairRecord | tuple[Any, Any], verify: bool
) -> tuple[bytes, str, list[str], str] | Skipped:
    """(image bytes, extension, captions, source) of a PairRecord (a file) or an (image, caption(s)) pair."""
    if isinstance(item, PairRecord):
        image, captions, source = item.image, list(item.captions), str(item.image)
    else:
        image, cap = item
        captions, source = ([cap] if isinstance(cap, str) else list(cap)), ""
    captions = [" ".join(c.split()) for c in captions if isinstance(c, str) and c.strip()]
    if not captions:
        return Skipped("empty_caption", source)
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="PNG")
        return buf.getvalue(), "png", captions, source
    path = Path(image)
    if not path.is_file():
        return Skipped("missing_image", source)
    data = path.read_bytes()
    ext = {"jpeg": "jpg"}.get(path.suffix.lower().lstrip("."), path.suffix.lower().lstrip("."))
    if verify or ext not in WRITTEN_AS_IS:
        try:
            decoded = load_image(io.BytesIO(data), name=source or None)
        except (ImageLoadError, OSError, ValueError) as e:
            return Skipped("corrupt_image", str(e)[:160])
        if ext not in WRITTEN_AS_IS:  # bmp, gif, tiff ...: store as PNG, which every reader decodes
            buf = io.BytesIO()
            decoded.save(buf, format="PNG")
            data, ext = buf.getvalue(), "png"
    return data, ext, captions, source


def write_shards(
    records: Any | Iterable[PairRecord | tuple[Any, Any]],
    out_dir: str | Path,
    *,
    max_size: int | str = "100MB",
    max_count: int = 10_000,
    name_format: str = "{:06d}.tar",
    verify: bool = True,
    skips: SkipCounter | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> ShardWriteReport:
    """Write records (PairRecords of files, or (PIL image, caption or captions) pairs) as WebDataset shards
    of at most `max_count` samples and `max_size` bytes each (a single larger sample gets its own shard),
    plus `sizes.json` ({shard name: count}). Each shard is written to a temp file and renamed when complete.
    Unreadable images are skipped and counted (with `verify`, every image is decoded first).

    A non-empty `out_dir` is refused: stale shards left next to new ones would be read by training (and
    sizes.json would not list them). With `overwrite`, a folder holding only shards is replaced: the new
    shards are written into a temp folder beside it, which then takes its place."""
    records = getattr(records, "records", records)  # a PairDataset: its records, read as raw files
    if max_count < 1:
        raise ValueError(f"max_count must be >= 1, got {max_count}")
    parse_size(max_size)  # a bad size fails before any folder is touched
    final_dir = Path(out_dir)
    existing = sorted(p.name for p in final_dir.iterdir()) if final_dir.is_dir() else []
    if existing and not overwrite:
        raise ValueError(
            f"{final_dir} is not empty ({len(existing)} entries, e.g. {', '.join(existing[:3])}): pass "
            "--overwrite (overwrite=True) to replace its shards, or choose an empty folder"
        )
    others = [n for n in existing if not (n.endswith((".tar", ".tmp")) or n == "sizes.json")]
    if others:
        raise ValueError(
            f"{final_dir} holds files that are not shards (e.g. {', '.join(others[:3])}); --overwrite only "
            "replaces a folder of shards: choose another output folder"
        )
    if final_dir.exists() and not final_dir.is_dir():
        raise ValueError(f"{final_dir} is a file, not a folder: choose an output folder")
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    # existing shards: build the new set beside them and swap it in at the end, so an interrupted write
    # leaves the old shards intact (and never a mix of old and new)
    out = final_dir.with_name(f".{final_dir.name}.new-{os.getpid()}") if existing else final_dir
    if existing and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        report = _write_shards_into(
            records, out, final_dir, max_size, max_count, name_format, verify, skips, progress
        )
    except BaseException:
        if existing:
            shutil.rmtree(out, ignore_errors=True)
        raise
    if existing:
        old = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
        final_dir.rename(old)
        out.rename(final_dir)
        shutil.rmtree(old, ignore_errors=True)
    return report


def _write_shards_into(
    records: Any,
    out: Path,
    final_dir: Path,
    max_size: int | str,
    max_count: int,
    name_format: str,
    verify: bool,
    skips: SkipCounter | None,
    progress: bool,
) -> ShardWriteReport:
    """write_shards' body: shards and sizes.json into `out`; the report names `final_dir`."""
    limit, skips = parse_size(max_size), skips if skips is not None else SkipCounter(str(final_dir))
    shards: dict[str, int] = {}
    tar: tarfile.TarFile | None = None
    tmp = final = None
    count = size = key = 0

    def close() -> None:
        nonlocal tar
        if tar is not None:
            tar.close()
            tmp.replace(final)
            shards[final.name] = count
            tar = None

    total = len(records) if hasattr(records, "__len__") else None
    for item in tqdm(records, total=total, desc="writing shards", unit="sample", disable=not progress):
        got = _encode_record(item, verify)
        if isinstance(got, Skipped):
            skips.record(got.reason, got.detail)
            continue
        data, ext, captions, source = got
        name = f"{key:09d}"
        meta = json.dumps(
            {"key": name, "caption": captions[0], "captions": captions, "source": source}
        ).encode()
        members = [
            (f"{name}.{ext}", data),
            (f"{name}.txt", "\n".join(captions).encode()),
            (f"{name}.json", meta),
        ]
        need = sum(_tar_bytes(len(d)) for _, d in members)
        # tarfile ends an archive with 2 zero blocks and pads it to a 10240-byte record
        if tar is not None and (count >= max_count or size + need + 1024 + tarfile.RECORDSIZE > limit):
            close()
        if tar is None:
            final = out / name_format.format(len(shards))
            tmp = final.with_name(final.name + ".tmp")
            tar = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (closed in close())
            count, size = 0, 0
        for member, payload in members:
            info = tarfile.TarInfo(member)
            info.size, info.mode, info.mtime = len(payload), 0o644, 0
            tar.addfile(info, io.BytesIO(payload))
        count, size, key = count + 1, size + need, key + 1
    close()
    if not shards:
        raise ValueError(f"no samples written to {final_dir}: the source yielded none ({skips.summary()})")
    (out / "sizes.json").write_text(json.dumps(shards, indent=1) + "\n")
    names = sorted(shards)
    pattern = (
        str(final_dir / names[0])
        if len(names) == 1
        else str(final_dir / f"{{{names[0][:-4]}..{names[-1][:-4]}}}.tar")
    )
    return ShardWriteReport(shards, skips, final_dir, pattern)
