"""Embed a collection: images and/or captions -> sharded, normalised embeddings + parquet metadata.

    manifest = embed("photos/", "emb/", model="ckpt_dir")                      # an image folder
    manifest = embed("shards/{000..009}.tar", "emb/", model=m, options=EmbedOptions(modality="both"))

Resumable and appendable (clip-retrieval can do neither): inputs are written in parts, each part
atomically, and the manifest lists only finished parts. A rerun into the same directory (after a crash
or `kill -9`) passes over every input a finished part holds or skipped and embeds the rest, so it ends
with the same rows as one uninterrupted run; `append=True` does the same on a finished directory (new
files only). The model's fingerprint must match the directory's. Unreadable inputs are skipped, counted
by reason in the manifest and named in `skipped/` and `skipped.log`. DataLoader workers decode and
preprocess while the main process runs the model.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.skips import SkipCounter
from ..files import atomic_file, write_json_atomic, write_npy_atomic
from .encoders import Encoder, open_encoder
from .inputs import (
    KINDS,
    ItemImages,
    ShardImages,
    caption_items,
    collate_rows,
    detect_kind,
    folder_items,
    manifest_items,
)
from .store import EMB_DIRS, FORMAT, MANIFEST, PART_DIRS, EmbeddingStore

MODALITIES = ("image", "text", "both")
DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class EmbedOptions:
    """modality: image | text | both ("auto": text for a captions file, image otherwise); `both`
    needs a caption for every image (images without one are skipped as no_caption).

    fast_decode: JPEGs are decoded at 1/2 or 1/4 scale inside the decoder (PIL `draft`) when the short side
    stays >= the model's input size, then the usual eval transform runs: less to decode and resize for
    photos larger than the input, but other pixels than the exact path's, hence opt-in; the manifest
    records it (`fast_decode`) and `embed` refuses to mix the two in one directory."""

    modality: str = "auto"
    kind: str | None = None  # folder | manifest | shards | captions (None: detected)
    batch_size: int = 64
    workers: int = 0
    part_size: int = 10_000  # inputs (embedded + skipped) per part file
    dtype: str = "float16"
    append: bool = False
    image_key: str = "image"
    caption_key: str = "caption"
    progress: bool = True
    fast_decode: bool = False

    def __post_init__(self) -> None:
        if self.modality not in (*MODALITIES, "auto"):
            raise ValueError(f"unknown modality {self.modality!r}; choose from {', '.join(MODALITIES)}")
        if self.kind is not None and self.kind not in KINDS:
            raise ValueError(f"unknown data kind {self.kind!r}; choose from {', '.join(KINDS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")
        if self.batch_size < 1 or self.part_size < 1 or self.workers < 0:
            raise ValueError("batch_size and part_size must be >= 1, workers >= 0")


def _modalities(modality: str) -> list[str]:
    return ["image", "text"] if modality == "both" else [modality]


def local_absolute(path: str | None) -> str | None:
    """An existing local file or directory as an absolute path (not resolving symlinks, as the user named
    it); anything else (a preset name, a shard pattern, None) as it is. The manifest records the model
    and data this way, so that an embedding directory works from any working directory."""
    if path is None or not os.path.exists(path):
        return path
    return os.path.abspath(path)


def _new_manifest(enc: Encoder, data: str, kind: str, modality: str, opts: EmbedOptions) -> dict[str, Any]:
    model = enc.describe()
    model["source"] = local_absolute(model["source"])  # `search` / `serve` open it from anywhere
    return {
        "format": FORMAT,
        "version": 1,
        "model": model,
        "preprocess": enc.preprocess_config.to_dict(),
        "dim": enc.embed_dim,
        "dtype": opts.dtype,
        "fast_decode": opts.fast_decode,  # JPEGs decoded at reduced scale (see EmbedOptions)
        "normalized": True,
        "modality": modality,
        "modalities": _modalities(modality),
        "data": {"source": local_absolute(data), "kind": kind},
        "parts": [],
        "count": 0,
        "skipped": {},
        "input_skipped": {},
        "complete": False,
        "runs": [],
    }


def _open_out(out: Path, enc: Encoder, data: str, kind: str, modality: str, opts: EmbedOptions) -> dict:
    """The manifest to continue: a new one, an interrupted run's, or a finished one with `append`."""
    if not (out / MANIFEST).is_file():
        out.mkdir(parents=True, exist_ok=True)
        return _new_manifest(enc, data, kind, modality, opts)
    manifest = EmbeddingStore(out).manifest
    mine, theirs = enc.fingerprint, manifest["model"]["fingerprint"]
    if mine != theirs:
        raise ValueError(
            f"{out} holds embeddings of another model (fingerprint {theirs}, from "
            f"{manifest['model']['source']}); this model's is {mine}: use another --out"
        )
    if manifest["modality"] != modality or manifest["dtype"] != opts.dtype:
        raise ValueError(
            f"{out} holds {manifest['modality']} embeddings in {manifest['dtype']}; this run asks for "
            f"{modality} in {opts.dtype}: use the same settings or another --out"
        )
    if manifest.get("fast_decode", False) != opts.fast_decode:  # older manifests: exact decoding
        was, now = ("without", "with") if opts.fast_decode else ("with", "without")
        raise ValueError(
            f"{out} holds embeddings decoded {was} --fast-decode; this run asks {now}: its pixels differ, "
            "so use the same setting or another --out"
        )
    if manifest["complete"] and not opts.append:
        raise ValueError(
            f"{out} already holds a finished run ({manifest['count']} rows): pass --append to embed only "
            "new inputs, or choose another --out"
        )
    return manifest


def _remove_leftovers(out: Path, manifest: dict[str, Any]) -> None:
    """Delete part files an interrupted run wrote but never listed in the manifest."""
    finished = {p["name"] for p in manifest["parts"]}
    for sub in PART_DIRS:
        d = out / sub
        if d.is_dir():
            for f in d.iterdir():
                if f.name.split(".")[0] not in finished:
                    f.unlink()


def write_part(
    out: Path, name: str, first_id: int, rows: dict[str, list], feats: dict, skipped: list
) -> None:
    """One part's files (embeddings, metadata, skip list), each written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(rows["key"])
    table = pa.table(
        {
            "id": pa.array(np.arange(first_id, first_id + n, dtype=np.int64)),
            "key": pa.array(rows["key"], pa.string()),
            "path": pa.array(rows["path"], pa.string()),
            "caption": pa.array(rows["caption"], pa.string()),
            "width": pa.array(rows["width"], pa.int32()),
            "height": pa.array(rows["height"], pa.int32()),
        }
    )
    for modality, chunks in feats.items():
        write_npy_atomic(
            out / EMB_DIRS[modality] / f"{name}.npy", np.concatenate(chunks) if chunks else chunks
        )
    atomic_file(out / "metadata" / f"{name}.parquet", lambda tmp: pq.write_table(table, tmp))
    lines = "".join(json.dumps({"key": k, "reason": s.reason, "detail": s.detail}) + "\n" for k, s in skipped)
    atomic_file(out / "skipped" / f"{name}.jsonl", lambda tmp: tmp.write_text(lines, encoding="utf-8"))


def _write_skip_log(out: Path, manifest: dict[str, Any]) -> None:
    lines = []
    for p in manifest["parts"]:
        for line in (out / "skipped" / f"{p['name']}.jsonl").read_text(encoding="utf-8").splitlines():
            e = json.loads(line)
            lines.append(f"{e['reason']}\t{e['detail'] or e['key']}\n")
    (out / "skipped.log").write_text("".join(lines), encoding="utf-8")


def _loader(data: str, kind: str, modality: str, enc: Encoder, opts: EmbedOptions, done: set, input_skips):
    """(DataLoader, number of inputs to do or None for a stream)."""
    images = modality != "text"
    transform = enc.preprocess if images else None
    draft_side = enc.preprocess_config.image_size if opts.fast_decode and images else None
    if kind == "shards":
        ds = ShardImages(data, transform, done, images=images, draft_side=draft_side)
        total = None
    else:
        if kind == "folder":
            items = folder_items(data)
        elif kind == "manifest":
            items = manifest_items(data, opts.image_key, opts.caption_key, input_skips, need_image=images)
        else:
            if images:
                raise ValueError(f"{data} is a captions file: it has only texts (use modality 'text')")
            items = caption_items(data)
        # absolute file paths in the metadata: thumbnails and `search` work from any working directory
        # (abspath reads no file system: a missing file is still skipped, named by its key)
        todo = [
            replace(it, path=os.path.abspath(it.path) if it.path else None)
            for it in items
            if it.key not in done
        ]
        ds, total = ItemImages(todo, transform, images=images, draft_side=draft_side), len(todo)
    workers = opts.workers if images else 0  # texts are read in the main process (nothing to decode)
    loader = DataLoader(
        ds, batch_size=opts.batch_size, num_workers=workers, collate_fn=collate_rows, shuffle=False
    )
    return loader, total


def embed(
    data: str | Path,
    out: str | Path,
    model: str | Path | Any,
    *,
    runtime: str = "torch",
    device: str | torch.device | None = None,
    precision: str = "fp32",
    options: EmbedOptions | None = None,
) -> dict[str, Any]:
    """Embed `data` into `out` (see the module docstring); returns the final manifest. `device` None: CPU
    for a checkpoint path, the model's own device for a CLIP (see `open_encoder`)."""
    opts = options or EmbedOptions()
    data, out = str(data), Path(out)
    kind = opts.kind or detect_kind(data)
    modality = opts.modality if opts.modality != "auto" else ("text" if kind == "captions" else "image")
    enc = open_encoder(model, runtime, device=device, precision=precision)
    if modality != "image" and enc.tokenizer is None:
        raise ValueError(f"{enc.source}: the model has no tokenizer files, so it cannot embed captions")
    manifest = _open_out(out, enc, data, kind, modality, opts)
    _remove_leftovers(out, manifest)
    done = EmbeddingStore(out).done_keys() if manifest["parts"] else set()
    input_skips = SkipCounter(data)
    loader, total = _loader(data, kind, modality, enc, opts, done, input_skips)
    manifest["input_skipped"] = input_skips.counts()  # recounted by every run, so not accumulated
    manifest["complete"] = False
    run = {
        "data": data,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "append": opts.append,
        "runtime": enc.runtime,
        "precision": getattr(enc, "precision", "fp32"),  # ONNX graphs run in the precision they hold
        "fast_decode": opts.fast_decode,
        "inputs_done_before": len(done),  # resumed or appended: these were not read again
    }
    rows_before = manifest["count"]
    manifest["runs"].append(run)
    write_json_atomic(out / MANIFEST, manifest)

    mods = manifest["modalities"]
    state = _PartBuffer(mods)
    unit = "text" if modality == "text" else "img"
    bar = tqdm(total=total, unit=unit, disable=not opts.progress, desc="embed", smoothing=0.1)
    for batch in loader:
        state.skipped.extend(batch["skipped"])
        if "text" in mods:  # texts need a caption: rows without one are skipped, counted
            _drop_uncaptioned(batch, state)
        n = len(batch["key"])
        if n:
            if "image" in mods:
                state.feats["image"].append(_cast(enc.encode_pixels(batch["pixels"]), opts.dtype))
            if "text" in mods:
                state.feats["text"].append(_cast(enc.encode_texts(batch["caption"]), opts.dtype))
            for field in state.rows:
                state.rows[field].extend(batch[field])
        bar.update(n + len(batch["skipped"]))
        if state.size >= opts.part_size:
            _flush(out, manifest, state)
            state = _PartBuffer(mods)
    bar.close()
    if state.size or not manifest["parts"]:
        _flush(out, manifest, state, allow_empty=not manifest["parts"])
    manifest["complete"] = True
    _total_skips(manifest)
    run["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    run["rows_added"] = manifest["count"] - rows_before
    write_json_atomic(out / MANIFEST, manifest)
    _write_skip_log(out, manifest)
    return manifest


class _PartBuffer:
    """Rows, features and skips collected for the part being filled."""

    def __init__(self, modalities: list[str]) -> None:
        self.rows: dict[str, list] = {f: [] for f in ("key", "path", "caption", "width", "height")}
        self.feats: dict[str, list[np.ndarray]] = {m: [] for m in modalities}
        self.skipped: list = []

    @property
    def size(self) -> int:
        return len(self.rows["key"]) + len(self.skipped)


def _drop_uncaptioned(batch: dict[str, Any], state: _PartBuffer) -> None:
    from ..data.skips import Skipped

    keep = [i for i, c in enumerate(batch["caption"]) if c]
    if len(keep) == len(batch["key"]):
        return
    for i in sorted(set(range(len(batch["key"]))) - set(keep)):
        state.skipped.append((batch["key"][i], Skipped("no_caption", batch["key"][i])))
    for field in ("key", "path", "caption", "width", "height"):
        batch[field] = [batch[field][i] for i in keep]
    if batch["pixels"] is not None:
        batch["pixels"] = batch["pixels"][keep]


def _cast(feats: torch.Tensor, dtype: str) -> np.ndarray:
    return feats.numpy().astype(dtype)


def _flush(out: Path, manifest: dict[str, Any], state: _PartBuffer, allow_empty: bool = False) -> None:
    """Write the part, then name it in the manifest (the commit point)."""
    if not state.size and not allow_empty:
        return
    name = f"part-{len(manifest['parts']):05d}"
    first_id = manifest["count"]
    feats = {
        m: (chunks if chunks else [np.zeros((0, manifest["dim"]), dtype=manifest["dtype"])])
        for m, chunks in state.feats.items()
    }
    write_part(out, name, first_id, state.rows, feats, state.skipped)
    skipped: dict[str, int] = {}
    for _, s in state.skipped:
        skipped[s.reason] = skipped.get(s.reason, 0) + 1
    rows = len(state.rows["key"])
    manifest["parts"].append({"name": name, "rows": rows, "first_id": first_id, "skipped": skipped})
    manifest["count"] = first_id + rows
    _total_skips(manifest)
    write_json_atomic(out / MANIFEST, manifest)


def _total_skips(manifest: dict[str, Any]) -> None:
    totals = dict(manifest["input_skipped"])
    for p in manifest["parts"]:
        for reason, n in p["skipped"].items():
            totals[reason] = totals.get(reason, 0) + n
    manifest["skipped"] = totals


def append_rows(
    out: str | Path,
    rows: dict[str, list],
    feats: dict[str, np.ndarray],
    fingerprint: str,
    fast_decode: bool = False,
) -> dict:
    """Append rows embedded elsewhere (the server's add-while-serving) to a finished embedding directory
    as one new part; `build_index` then adds that part alone. `rows` holds the metadata fields (key, path,
    caption, width, height), `feats` one (rows, D) array per modality of the directory, made by the model
    whose `fingerprint` the directory records, with JPEGs decoded as the directory's were (`fast_decode`,
    see EmbedOptions). One writer at a time: the caller serialises calls.
    Returns the manifest's entry for the new part (name, rows, first_id)."""
    out = Path(out)
    manifest = EmbeddingStore(out).manifest
    if fingerprint != manifest["model"]["fingerprint"]:
        raise ValueError(
            f"{out} holds embeddings of another model (fingerprint {manifest['model']['fingerprint']}); "
            f"these were made by {fingerprint}"
        )
    if manifest.get("fast_decode", False) != fast_decode:
        was, now = ("without", "with") if fast_decode else ("with", "without")
        raise ValueError(
            f"{out} was embedded {was} fast JPEG decoding; these rows were decoded {now} it: "
            "decode them the way the directory's were"
        )
    if sorted(feats) != sorted(manifest["modalities"]):
        raise ValueError(
            f"{out} holds {' and '.join(manifest['modalities'])} embeddings; got {sorted(feats)}"
        )
    state = _PartBuffer(manifest["modalities"])
    for field in state.rows:
        state.rows[field].extend(rows[field])
    for modality, arr in feats.items():
        if arr.shape != (len(rows["key"]), manifest["dim"]):
            raise ValueError(
                f"{modality} features of shape {arr.shape}; expected ({len(rows['key'])}, {manifest['dim']})"
            )
        state.feats[modality].append(np.asarray(arr).astype(manifest["dtype"]))
    _flush(out, manifest, state)
    return manifest["parts"][-1]
