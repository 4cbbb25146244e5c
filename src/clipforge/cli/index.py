"""`clipforge index DIR` (build or grow a faiss index; --delete ids) and `clipforge search DIR QUERY`."""

from __future__ import annotations

import argparse
import json

import numpy as np

from ..use.index import KINDS, build_index, delete_ids
from ..use.search import Searcher


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "index",
        help="build or grow the faiss index of an embedding directory",
        description="Index DIR's embeddings (flat below 50k vectors, HNSW if it fits --max-memory, else "
        "IVF-PQ; or --kind). Run again after `embed --append` to add the new parts without a rebuild.",
    )
    p.add_argument("dir", help="a directory written by `clipforge embed`")
    p.add_argument("--kind", choices=KINDS, default="auto")
    p.add_argument("--max-memory", default="4G", help="memory budget for the index (e.g. 4G, 512M)")
    p.add_argument("--modality", choices=("image", "text"), default="image")
    p.add_argument("--delete", default=None, help="comma-separated row ids to delete from the index")
    p.add_argument(
        "--target-recall",
        type=float,
        default=None,
        help="tune HNSW efSearch / IVF-PQ nprobe and rerank for this recall@10 against exact search "
        "(done anyway for a new or much grown index, at the previous target or 0.95)",
    )
    p.add_argument("--no-tune", action="store_true", help="do not tune the search parameters")
    p.set_defaults(func=run_index)

    s = sub.add_parser(
        "search",
        help="search an indexed embedding directory by text, image, id or vector",
        description="Top-k rows of DIR's index by cosine similarity, with their metadata.",
    )
    s.add_argument("dir", help="an indexed embedding directory")
    s.add_argument("text", nargs="?", default=None, help="text query")
    s.add_argument("--image", default=None, help="image file query")
    s.add_argument("--id", type=int, default=None, help="query by a row id already in the index")
    s.add_argument("--vector", default=None, help="a .npy file or comma-separated floats")
    s.add_argument("-k", "--top-k", type=int, default=10)
    s.add_argument(
        "--dedup", type=float, default=None, help="collapse results within this cosine (e.g. 0.94)"
    )
    s.add_argument("--model", default=None, help="model for text/image queries (default: the manifest's)")
    s.add_argument("--modality", choices=("image", "text"), default="image", help="which index to search")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=run_search)


def run_index(args: argparse.Namespace) -> int:
    if args.delete:
        ids = [int(x) for x in args.delete.split(",") if x.strip()]
        n = delete_ids(args.dir, ids, args.modality)
        print(f"deleted {n} ids from {args.dir} ({len(ids) - n} were already deleted)")
        return 0
    info = build_index(
        args.dir,
        modality=args.modality,
        kind=args.kind,
        max_memory=args.max_memory,
        target_recall=args.target_recall,
        tune=not args.no_tune,
    )
    print(
        f"{args.dir}: {info['kind']} index of {info['count']} {args.modality} vectors {info['params'] or ''}"
    )
    tuned = info.get("search")
    if tuned and info["kind"] != "flat":
        values = {k: tuned[k] for k in ("ef_search", "nprobe", "rerank") if k in tuned}
        print(
            f"search defaults {values}: recall@10 {tuned['recall@10']} (target {tuned['target_recall']}, "
            f"{tuned['queries']} queries{'' if tuned['reached'] else ', NOT reached'})"
        )
    return 0


def _vector(value: str) -> np.ndarray:
    return np.load(value) if value.endswith(".npy") else np.array([float(x) for x in value.split(",")])


def run_search(args: argparse.Namespace) -> int:
    s = Searcher(args.dir, args.modality, encoder=args.model)
    q = s.query(
        text=args.text,
        image=args.image,
        id=args.id,
        vector=None if args.vector is None else _vector(args.vector),
    )
    hits = s.search(q, k=args.top_k, dedup=args.dedup)[0]
    if args.json:
        print(json.dumps(hits, indent=2))
        return 0
    for rank, h in enumerate(hits, 1):
        what = h.get("path") or h.get("key")
        caption = f"  {h['caption']!r}" if h.get("caption") else ""
        print(f"{rank:3d}  {h['score']:.4f}  id {h['id']}  {what}{caption}")
    return 0
