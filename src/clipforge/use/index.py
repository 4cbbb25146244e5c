"""A faiss index over an embedding directory, grown in place and searched by cosine similarity.

    info = build_index("emb/")                  # or kind="flat" | "hnsw" | "ivfpq", max_memory="4G"
    build_index("emb/")                         # later: adds only the parts embedded since (no rebuild)
    delete_ids("emb/", [3, 17])

The kind is chosen as autofaiss does, from the vector count and a memory budget: exact inner product
(`flat`) up to FLAT_MAX vectors, HNSW32 while its vectors + graph fit the budget, else IVF-PQ (codes of
at most the budget / count bytes). The vectors are unit norm, so inner product is cosine. IVF-PQ results
are reranked with the exact vectors memory-mapped from the embedding parts (scores stay exact cosines,
recall stays high, memory stays that of the codes).

An approximate index is tuned after it is built or has grown (tune.py): the smallest efSearch / nprobe
and rerank depth reaching a target recall@10 against exact search are stored and become the Searcher's
defaults.

Files: DIR/index/<modality>.json (kind, parameters, parts indexed, count, the index file's name, the
tuned search parameters),
the index file it names (<modality>.<version>.faiss, replaced as a whole on every change) and
<modality>.deleted.npy (deleted ids: removed from flat and IVF indexes; HNSW cannot remove, so its
searches filter them).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..files import write_json_atomic, write_npy_atomic
from .index_files import index_paths, read_deleted
from .store import EmbeddingStore
from .tune import DEFAULT_TARGET_RECALL, needs_tuning, tune_search

KINDS = ("auto", "flat", "hnsw", "ivfpq")
FLAT_MAX = 50_000  # exact search of 50k x 512 fp32 takes a few ms per query on one core
HNSW_M = 32
# Graph quality at build time; 40 (faiss' default) left recall@10 at 0.88 on the tests' clustered set
# at efSearch 128, 100 gives 0.97 (0.99 at efSearch 256, the search default).
HNSW_EF_CONSTRUCTION = 100


def parse_memory(value: str | int) -> int:
    """'4G' / '512M' / '100k' / bytes -> bytes."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([\d.]+)\s*([kKmMgGtT]?)[bB]?\s*", str(value))
    if not m:
        raise ValueError(f"cannot read memory size {value!r}: use e.g. 4G, 512M or a number of bytes")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def choose_kind(n: int, dim: int, max_memory: int) -> str:
    """flat | hnsw | ivfpq for n vectors of dim floats within max_memory bytes."""
    if n <= FLAT_MAX and n * dim * 4 <= max_memory:
        return "flat"
    if n * (dim * 4 + HNSW_M * 2 * 4 + 8) <= max_memory:  # vectors + level-0 links + id map
        return "hnsw"
    return "ivfpq"


def ivfpq_params(n: int, dim: int, max_memory: int) -> dict[str, int]:
    """nlist ~ 4 sqrt(n) (>= 39 training points per list); m sub-quantizers with dim % m == 0, as many as
    the budget allows up to dim / 4 (the exact rerank recovers what coarser codes lose); 8-bit codes,
    6-bit below 10k vectors (256 centroids want ~10k training points, 64 want ~2.5k)."""
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
    budget = max(1, int(max_memory * 0.9 / max(n, 1)) - 8)
    m = max([d for d in range(1, max(1, dim // 4) + 1) if dim % d == 0 and d <= budget] or [1])
    return {"nlist": nlist, "m": m, "nbits": 8 if n >= 10_000 else 6}


def _new_index(kind: str, dim: int, params: dict[str, int], sample: np.ndarray):
    import faiss

    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        return faiss.IndexIDMap2(hnsw)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(
        quantizer, dim, params["nlist"], params["m"], params["nbits"], faiss.METRIC_INNER_PRODUCT
    )
    index.train(sample)
    return index


def _training_sample(store: EmbeddingStore, modality: str, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(store.count, size=min(size, store.count), replace=False))
    return store.vectors(ids, modality)


def build_index(
    directory: str | Path,
    *,
    modality: str = "image",
    kind: str = "auto",
    max_memory: str | int = "4G",
    target_recall: float | None = None,
    tune: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Create the index, or add the parts embedded since the last call; returns the index's JSON.

    An approximate index is then tuned (`tune.tune_search`) when `target_recall` is given, or for the
    target it was tuned for before (else 0.95) when it is new or grew by more than 10% since;
    `tune=False` skips that (the Searcher then keeps its previous or fixed defaults)."""
    import faiss

    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose from {', '.join(KINDS)}")
    directory = Path(directory)
    store = EmbeddingStore(directory)
    index_path, info_path, _ = index_paths(directory, modality)
    if info_path.is_file():
        info = json.loads(info_path.read_text(encoding="utf-8"))
        if kind not in ("auto", info["kind"]):
            raise ValueError(
                f"{index_path} is a {info['kind']} index; delete {directory / 'index'} to rebuild "
                f"it as {kind}"
            )
        if info["fingerprint"] != store.manifest["model"]["fingerprint"]:
            raise ValueError(f"{index_path} was built from another model's embeddings: delete it and rebuild")
        index = faiss.read_index(str(index_path))
    else:
        budget = parse_memory(max_memory)
        chosen = choose_kind(store.count, store.dim, budget) if kind == "auto" else kind
        params = ivfpq_params(store.count, store.dim, budget) if chosen == "ivfpq" else {}
        if chosen == "ivfpq":
            if store.count < 39 * params["nlist"] or store.count < 256:
                raise ValueError(
                    f"{store.count} vectors are too few to train an IVF-PQ index: use flat or hnsw"
                )
            sample = _training_sample(store, modality, max(40 * 2 ** params["nbits"], 64 * params["nlist"]))
        else:
            sample = None
        index = _new_index(chosen, store.dim, params, sample)
        info = {
            "kind": chosen,
            "params": params,
            "modality": modality,
            "dim": store.dim,
            "metric": "inner_product",
            "fingerprint": store.manifest["model"]["fingerprint"],
            "parts": [],
            "count": 0,
        }
    deleted = set(read_deleted(directory, modality).tolist())
    done = set(info["parts"])
    for part, arr in store.iter_parts(modality):
        if part["name"] in done:
            continue
        ids = np.arange(part["first_id"], part["first_id"] + part["rows"], dtype=np.int64)
        keep = np.array([i not in deleted for i in ids.tolist()], dtype=bool)
        for s in range(0, int(keep.sum()), 65536):  # bounded memory: fp16 parts are upcast per chunk
            sel = ids[keep][s : s + 65536]
            index.add_with_ids(np.ascontiguousarray(arr[sel - part["first_id"]], dtype=np.float32), sel)
        info["parts"].append(part["name"])
        if progress:
            print(f"indexed {part['name']}: {int(keep.sum())} vectors")
    info["count"] = int(index.ntotal)
    _commit(directory, modality, index, info)
    if tune and needs_tuning(info, target_recall):
        target = target_recall or info.get("search", {}).get("target_recall", DEFAULT_TARGET_RECALL)
        info = tune_search(directory, modality, target, progress=progress)
    return info


def _commit(directory: Path, modality: str, index: Any, info: dict[str, Any]) -> None:
    """Write the index under a new name, then the JSON naming it (the commit point: a crash before it
    leaves the previous index and JSON in force), then drop the old file."""
    import faiss

    d = directory / "index"
    d.mkdir(parents=True, exist_ok=True)
    version = int(info.get("version", 0)) + 1
    name = f"{modality}.{version}.faiss"
    faiss.write_index(index, str(d / name))
    info.update(version=version, file=name)
    write_json_atomic(d / f"{modality}.json", info)
    for old in d.glob(f"{modality}.*.faiss"):
        if old.name != name:
            old.unlink()


def delete_ids(directory: str | Path, ids: list[int] | np.ndarray, modality: str = "image") -> int:
    """Delete row ids from the index (the embeddings and metadata stay); returns how many were new."""
    import faiss

    directory = Path(directory)
    index_path, info_path, deleted_path = index_paths(directory, modality)
    if not info_path.is_file():
        raise FileNotFoundError(f"no index in {directory}: run `clipforge index {directory}` first")
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    old = read_deleted(directory, modality)
    new = np.setdiff1d(ids, old)
    info = json.loads(info_path.read_text(encoding="utf-8"))
    if info["kind"] != "hnsw" and new.size:  # HNSW cannot remove: its searches filter the deleted ids
        index = faiss.read_index(str(index_path))
        index.remove_ids(new)
        info["count"] = int(index.ntotal)
    # the deleted list first: were the index not rewritten, searches still filter these ids
    write_npy_atomic(deleted_path, np.union1d(old, ids))
    if info["kind"] != "hnsw" and new.size:
        _commit(directory, modality, index, info)
    return int(new.size)
