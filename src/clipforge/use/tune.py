"""Recall-targeted search parameters for an approximate index, as autofaiss tunes them.

    info = tune_search("emb/", target_recall=0.95)   # also run by build_index for HNSW / IVF-PQ
    info["search"]   # {"ef_search": 96, "recall@10": 0.962, "reached": True, ...} or nprobe + rerank

The smallest efSearch (HNSW), or the smallest nprobe and then the smallest rerank depth (IVF-PQ), whose
measured recall@10 against exact search reaches the target is written to DIR/index/<modality>.json;
`Searcher` uses it as its default (explicit arguments still win).

How the estimate stays honest:
- queries are indexed vectors drawn at random, each moved by isotropic noise of norm `noise` (1.73:
  cosine 0.5 to the vector it was drawn from), and that vector is left out of both the exact and the
  approximate top-k: a self-match is found by any index that routes the query near its source, and
  would count as one free hit in ten. Queries far from the data are the hard ones (their top-10 is
  spread out and close in score) and the usual ones: CLIP's text-to-image cosines are about 0.3. Near
  queries (image by image, cosine 0.9) reach the target at smaller values, so noise=0.5 tunes for those.
- a returned id counts as a hit when its exact cosine reaches the exact k-th score (less 1e-6): an
  index that returns the other copy of a duplicated vector is not penalised for the tie.
- a value is chosen when the recall's lower bound (mean - 2 standard errors over the queries) reaches
  the target, so an index tuned on a few hundred queries still meets it on fresh ones.
The sweep is bounded: fixed ascending grids, and it stops at `max_seconds` (the last value tried is
kept and "reached" says false).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..files import write_json_atomic
from .index_files import index_paths, read_deleted
from .search import Searcher
from .store import EmbeddingStore

DEFAULT_TARGET_RECALL = 0.95
K = 10  # recall@10
EF_GRID = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
RERANK_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
# A grown index keeps its tuned values until it has grown by this fraction (re-tuning on every small
# add would make each add as slow as an exact search over the collection).
RETUNE_GROWTH = 0.1


def nprobe_grid(nlist: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 11, 16, ... (about sqrt(2) apart) up to and including nlist."""
    grid, p = [], 1
    while p < nlist:
        grid.append(p)
        p = max(p + 1, round(p * 2**0.5))
    return [*grid, nlist]


def needs_tuning(info: dict[str, Any], target_recall: float | None) -> bool:
    """Whether build_index should (re)tune an approximate index: a target was asked for, the index is
    new, or it grew (or shrank) by more than RETUNE_GROWTH since its tuning."""
    if info["kind"] == "flat":
        return False
    tuned = info.get("search")
    if not tuned or target_recall is not None:
        return True
    return abs(info["count"] - tuned["count"]) > RETUNE_GROWTH * max(tuned["count"], 1)


def _indexed_ids(store: EmbeddingStore, info: dict[str, Any], deleted: np.ndarray) -> np.ndarray:
    parts = set(info["parts"])
    ids = [
        np.arange(p["first_id"], p["first_id"] + p["rows"], dtype=np.int64)
        for p in store.parts
        if p["name"] in parts
    ]
    ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    return np.setdiff1d(ids, deleted, assume_unique=True)


def exact_top(
    store: EmbeddingStore,
    modality: str,
    queries: np.ndarray,
    k: int,
    parts: set[str],
    deleted: np.ndarray,
    chunk: int = 65536,
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each (Q, k) best first, of an exact inner-product search over the named parts,
    deleted ids excluded; streams the parts chunk by chunk (fp16 parts are upcast one chunk at a time)."""
    nq = len(queries)
    best_s = np.full((nq, 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((nq, 0), dtype=np.int64)
    for part, arr in store.iter_parts(modality):
        if part["name"] not in parts:
            continue
        for a in range(0, part["rows"], chunk):
            x = np.asarray(arr[a : a + chunk], dtype=np.float32)
            ids = np.arange(part["first_id"] + a, part["first_id"] + a + len(x), dtype=np.int64)
            scores = queries @ x.T  # (Q, chunk)
            if len(deleted):
                scores[:, np.isin(ids, deleted)] = -np.inf
            s = np.concatenate([best_s, scores], axis=1)
            i = np.concatenate([best_i, np.broadcast_to(ids, scores.shape)], axis=1)
            top = np.argpartition(-s, min(k, s.shape[1]) - 1, axis=1)[:, :k]
            best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)


def _drop(ids: np.ndarray, source: int, k: int) -> np.ndarray:
    """The first k ids other than the query's source vector."""
    return ids[ids != source][:k]


def tune_search(
    directory: str | Path,
    modality: str = "image",
    target_recall: float = DEFAULT_TARGET_RECALL,
    *,
    queries: int = 300,
    noise: float = 1.73,
    max_seconds: float = 120.0,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Measure recall@10 over a sweep of search parameters, record the smallest reaching
    `target_recall` in the index's JSON (key "search") and return that JSON (see the module docstring)."""
    if not 0 < target_recall <= 1:
        raise ValueError(f"target recall {target_recall} is not in (0, 1]: use e.g. 0.95")
    directory = Path(directory)
    t_start = time.perf_counter()
    info_path = index_paths(directory, modality)[1]
    if not info_path.is_file():
        raise FileNotFoundError(
            f"no {modality} index in {directory}: run `clipforge index {directory}` first"
        )
    info = json.loads(info_path.read_text(encoding="utf-8"))
    record: dict[str, Any] = {"target_recall": target_recall, "count": info["count"]}
    if info["kind"] == "flat":  # exact: nothing to tune (and no need to load the index)
        info["search"] = {**record, "recall@10": 1.0, "reached": True}
        write_json_atomic(info_path, info)
        return info
    s = Searcher(directory, modality)
    info = s.info

    deleted = read_deleted(directory, modality)
    pool = _indexed_ids(s.store, info, deleted)
    if len(pool) <= K:
        raise ValueError(f"{info_path}: {len(pool)} indexed vectors are too few to measure recall@{K}")
    rng = np.random.default_rng(seed)
    source = np.sort(rng.choice(pool, size=min(queries, len(pool)), replace=False))
    q = s.store.vectors(source, modality)
    q += rng.standard_normal(q.shape, dtype=np.float32) * (noise / np.sqrt(q.shape[1]))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    ex_s, ex_i = exact_top(s.store, modality, q, K + 1, set(info["parts"]), deleted)
    kth = np.array([e_s[e_i != src][K - 1] for e_s, e_i, src in zip(ex_s, ex_i, source)])

    def recall(found: list[np.ndarray]) -> tuple[float, float]:
        """Mean recall@K over the queries and its standard error."""
        per = np.empty(len(found))
        for j, ids in enumerate(found):
            ids = np.unique(_drop(ids, source[j], K))
            cos = s.store.vectors(ids, modality) @ q[j] if len(ids) else np.zeros(0)
            per[j] = np.sum(cos >= kth[j] - 1e-6) / K
        return float(per.mean()), float(per.std() / np.sqrt(len(per)))

    tried: list[dict[str, Any]] = []

    def note(r: float, se: float, **params: int) -> bool:
        tried.append({**params, "recall@10": round(r, 4), "stderr": round(se, 4)})
        if progress:
            print(f"tune {info['kind']}: {params} recall@10 {r:.4f} +- {se:.4f}")
        return r - 2 * se >= target_recall

    reached, chosen, measured = False, {}, (0.0, 0.0)
    if info["kind"] == "hnsw":
        import faiss

        hnsw = faiss.downcast_index(s.index.index).hnsw
        for ef in EF_GRID:
            hnsw.efSearch = ef
            measured = recall([i for _, i in s.candidates(q, K + 1 + len(deleted))])
            chosen = {"ef_search": ef}
            reached = note(*measured, ef_search=ef)
            if reached or time.perf_counter() - t_start > max_seconds:
                break
    else:
        # one index search per nprobe at the deepest rerank; shallower depths are prefixes of it
        deepest = K * RERANK_GRID[-1] + 1
        for nprobe in nprobe_grid(info["params"]["nlist"]):
            s.index.nprobe = nprobe
            raw_s, raw_i = s.index.search(q, min(deepest, s.index.ntotal))

            def at(rerank: int, raw_s=raw_s, raw_i=raw_i) -> list[np.ndarray]:
                n = K * rerank + 1  # the Searcher fetches K * rerank; +1 for the dropped source
                return [s.refine(qq, a[:n], b[:n])[1] for qq, a, b in zip(q, raw_s, raw_i)]

            measured = recall(at(RERANK_GRID[-1]))
            chosen = {"nprobe": nprobe, "rerank": RERANK_GRID[-1]}
            reached = note(*measured, **chosen)
            if reached:
                for rerank in RERANK_GRID[:-1]:
                    r = recall(at(rerank))
                    if note(*r, nprobe=nprobe, rerank=rerank):
                        chosen, measured = {"nprobe": nprobe, "rerank": rerank}, r
                        break
                break
            if time.perf_counter() - t_start > max_seconds:
                break
    info["search"] = {
        **record,
        **chosen,
        "recall@10": round(measured[0], 4),
        "stderr": round(measured[1], 4),
        "reached": reached,
        "queries": len(source),
        "noise": noise,
        "seconds": round(time.perf_counter() - t_start, 2),
        "tried": tried,
    }
    # re-read before writing: only the "search" entry is ours (the index may have been committed since)
    current = json.loads(info_path.read_text(encoding="utf-8"))
    if current.get("file") != info.get("file"):
        raise RuntimeError(f"{info_path} changed while tuning: run tune_search again")
    current["search"] = info["search"]
    write_json_atomic(info_path, current)
    if not reached:
        print(
            f"warning: {info_path}: recall@{K} {measured[0]:.3f} < target {target_recall} at {chosen} "
            f"(grid end or {max_seconds:.0f} s limit): search with larger values or build another kind",
            file=sys.stderr,
        )
    return current
