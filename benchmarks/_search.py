"""Section 2 of benchmarks/embed.py: search latency and recall@10 of flat / HNSW / IVF-PQ indexes.

Two synthetic sets of unit vectors per size (written as float16 parts of 100k rows, as `embed` writes):
- "uniform": isotropic Gaussian directions, the worst case for any approximate index (every point's
  10 nearest neighbours are barely nearer than the rest);
- "clustered": 1,000 Gaussian clusters (centres N(0, I), points centre + N(0, I): cosine ~0.5 within a
  cluster, ~0 across), closer to real embeddings, which are clustered by content.
Queries are fresh draws of the same distribution (none of them indexed), searched one at a time through
`Searcher.search` (metadata included). recall@10 is measured against an exact numpy top-10.

Rows per approximate index: its fixed default search parameters, then the ones `tune_search` picks
for recall@10 >= --target-recall (so the latency at the target is visible). HNSW builds that would take
longer than --hnsw-max-build-s (extrapolated from the previous HNSW build, or from a 20k-vector probe,
as n log n) are skipped and the row says why.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

import numpy as np

from _common import at_least

PART_ROWS = 100_000
CLUSTERS = 1_000
SEARCH_DATA = ("uniform", "clustered")
INDEX_KINDS = ("flat", "hnsw", "ivfpq")


def add_search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index-sizes", default="100000,1000000", help="comma-separated vector counts")
    p.add_argument("--dim", type=at_least(1), default=512)
    p.add_argument("--queries", type=at_least(1), default=200)
    p.add_argument("--search-data", default="uniform,clustered", help="uniform and/or clustered")
    p.add_argument("--index-kinds", default="flat,hnsw,ivfpq")
    p.add_argument("--target-recall", type=at_least(0.0, float), default=0.95)
    p.add_argument("--tune-max-s", type=at_least(0.0, float), default=60.0, help="cap on each tuning sweep")
    p.add_argument(
        "--hnsw-max-build-s",
        type=float,
        default=240.0,
        help="skip an HNSW build estimated to take longer (the 100k build took ~110 s on 2 cores)",
    )


def _generator(data: str, dim: int, seed: int):
    """rows(n) -> (n, dim) float32 unit vectors of one set; its cluster centres are fixed by the seed,
    so later calls draw fresh points of the same distribution."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLUSTERS, dim), dtype=np.float32) if data == "clustered" else None

    def rows(n: int) -> np.ndarray:
        x = rng.standard_normal((n, dim), dtype=np.float32)
        if centres is not None:
            x += centres[rng.integers(0, CLUSTERS, n)]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    return rows


def write_vectors(d: Path, n: int, rows) -> None:
    """An embedding directory of n float16 vectors in parts of PART_ROWS (no full float32 copy)."""
    from clipforge.files import write_json_atomic
    from clipforge.use.embedder import write_part
    from clipforge.use.store import FORMAT

    d.mkdir(parents=True)
    parts = []
    for p, a in enumerate(range(0, n, PART_ROWS)):
        m = min(PART_ROWS, n - a)
        meta = {k: [None] * m for k in ("path", "caption", "width", "height")}
        keys = [str(i) for i in range(a, a + m)]
        write_part(d, f"part-{p:05d}", a, {"key": keys, **meta}, {"image": [rows(m).astype(np.float16)]}, [])
        parts.append({"name": f"part-{p:05d}", "rows": m, "first_id": a, "skipped": {}})
    manifest = {
        "format": FORMAT,
        "version": 1,
        "model": {"fingerprint": "synthetic", "source": "none"},
        "dim": int(rows(1).shape[1]),
        "dtype": "float16",
        "modality": "image",
        "modalities": ["image"],
        "parts": parts,
        "count": n,
        "skipped": {},
        "input_skipped": {},
        "complete": True,
    }
    write_json_atomic(d / "manifest.json", manifest)


def _hnsw_build_estimate(n: int, last: tuple[int, float] | None, rows) -> float:
    """Seconds to build HNSW over n vectors, as n log n from the last build or a 20k-vector probe."""
    if last is None:
        import faiss

        from clipforge.use.index import HNSW_EF_CONSTRUCTION, HNSW_M

        probe = rows(20_000)
        index = faiss.IndexHNSWFlat(probe.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        t0 = time.perf_counter()
        index.add(probe)
        last = (len(probe), time.perf_counter() - t0)
    n0, t0 = last
    return t0 * (n / n0) * math.log(n) / math.log(n0)


def _measure(searcher, queries: np.ndarray, exact: np.ndarray) -> dict[str, float]:
    lat, recall = [], []
    for q, e in zip(queries, exact):
        t0 = time.perf_counter()
        hits = searcher.search(q[None], k=10)[0]
        lat.append(time.perf_counter() - t0)
        recall.append(len({h["id"] for h in hits} & set(e.tolist())) / 10)
    return {
        "p50_ms": 1e3 * float(np.percentile(lat, 50)),
        "p99_ms": 1e3 * float(np.percentile(lat, 99)),
        "recall@10": float(np.mean(recall)),
    }


def _params(searcher) -> str:
    import faiss

    kind = searcher.info["kind"]
    if kind == "hnsw":
        return f"ef_search={faiss.downcast_index(searcher.index.index).hnsw.efSearch}"
    if kind == "ivfpq":
        return f"nprobe={searcher.index.nprobe} rerank={searcher.rerank}"
    return "exact"


def bench_search(args, work: Path) -> list[dict]:
    from clipforge.use.index import build_index
    from clipforge.use.search import Searcher
    from clipforge.use.store import EmbeddingStore
    from clipforge.use.tune import exact_top, tune_search

    rows_out: list[dict] = []
    last_hnsw: tuple[int, float] | None = None
    for n in args.index_sizes:
        for di, data in enumerate(args.search_data):
            rows = _generator(data, args.dim, seed=di)
            d = work / f"vectors_{data}_{n}"
            t0 = time.perf_counter()
            write_vectors(d, n, rows)
            queries = rows(args.queries)  # fresh points of the same distribution, not indexed
            store = EmbeddingStore(d)
            exact = exact_top(store, "image", queries, 10, {p["name"] for p in store.parts}, np.zeros(0))[1]
            print(f"[search] {data} {n}: vectors written, exact top-10 in {time.perf_counter() - t0:.0f} s")
            base = {"data": data, "vectors": n}
            for kind in args.index_kinds:
                s = None  # the previous index (2 GB for flat at 1M) goes before the next is built
                shutil.rmtree(d / "index", ignore_errors=True)
                if kind == "hnsw":
                    est = _hnsw_build_estimate(n, last_hnsw, rows)
                    if est > args.hnsw_max_build_s:
                        why = f"estimated build {est:.0f} s > --hnsw-max-build-s {args.hnsw_max_build_s:.0f}"
                        print(f"[search] {data} {n}: hnsw skipped ({why})")
                        rows_out.append({**base, "index": "hnsw", "skipped": why})
                        continue
                t0 = time.perf_counter()
                build_index(d, kind=kind, tune=False)
                build_s = time.perf_counter() - t0
                if kind == "hnsw":
                    last_hnsw = (n, build_s)
                s = Searcher(d)
                rows_out.append(
                    {
                        **base,
                        "index": kind,
                        "params": _params(s),
                        "build_s": build_s,
                        **_measure(s, queries, exact),
                    }
                )
                print(f"[search] {rows_out[-1]}")
                if kind == "flat":
                    continue
                info = tune_search(d, target_recall=args.target_recall, max_seconds=args.tune_max_s)
                tuned = info["search"]
                s = Searcher(d)
                rows_out.append(
                    {
                        **base,
                        "index": f"{kind} tuned {args.target_recall}",
                        "params": _params(s),
                        "tune_s": tuned["seconds"],
                        "tune_estimate": tuned["recall@10"],
                        "tune_reached": tuned["reached"],
                        **_measure(s, queries, exact),
                    }
                )
                print(f"[search] {rows_out[-1]}")
            del store, s
            shutil.rmtree(d)
    return rows_out


SEARCH_COLUMNS = [
    "data",
    "vectors",
    "index",
    "params",
    "build_s",
    "tune_s",
    "p50_ms",
    "p99_ms",
    "recall@10",
    "tune_estimate",
    "skipped",
]
