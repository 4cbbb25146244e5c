"""Tokenizer throughput: clipforge vs OpenAI's reference simple_tokenizer vs HF CLIPTokenizer (Rust).

    python benchmarks/tokenizer.py [--n 10000] [--out benchmarks/results/tokenizer.json]

Tokenises n varied captions into (n, 77) LongTensors twice: "cold" (a fresh tokenizer, empty word
cache) and "warm" (the same texts again), in one batch call and one call per caption (what a dataset's
__getitem__ does). Prints a table of texts/s and writes JSON. HF's CLIPTokenizer skips ftfy and HTML
unescaping, so it does less work than the other two (and its ids differ on such text).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import platform
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import at_least, write_json
from clipforge.tokenizer import Tokenizer, find_openai_vocab

_WORDS = (
    "a an the of on in with at near under over two three several small large red blue green yellow white "
    "black brown old young man woman child dog cat horse bird car bus train boat plane street road park "
    "beach field tree house building kitchen table plate food pizza sandwich cake sitting standing riding "
    "holding walking running playing looking eating flying parked next to front top side background "
    "colorful wooden metal sunny snowy city river mountain sky water grass window door people group"
)
WORDS = _WORDS.split()
EXTRAS = [
    "café",
    "naïve",
    "😀",
    "東京",
    "&amp;",
    "it's",
    "3.5",
    "100%",
    "Ünïcödé",
    "—",
    "#photo",
    "São Paulo",
]


def make_captions(n: int, seed: int = 0) -> list[str]:
    """Caption-like texts: a common vocabulary, random made-up words (so the cold cache misses), extras."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = []
    for _ in range(n):
        words = rng.choices(WORDS, k=rng.randint(6, 18))
        if rng.random() < 0.5:
            words.insert(rng.randrange(len(words)), "".join(rng.choices(letters, k=rng.randint(4, 10))))
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), rng.choice(EXTRAS))
        text = " ".join(words)
        out.append(text[0].upper() + text[1:] + rng.choice([".", "", "!", " ."]))
    return out


def load_reference():
    """OpenAI's clip/simple_tokenizer.py, loaded by file path (`import clip` needs torchvision)."""
    try:
        path = importlib.metadata.distribution("openai-clip").locate_file("clip/simple_tokenizer.py")
    except importlib.metadata.PackageNotFoundError:
        return None
    spec = importlib.util.spec_from_file_location("_openai_simple_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_tokenize(ref, texts: list[str], ctx: int = 77) -> torch.Tensor:
    """clip.tokenize (clip/clip.py) with truncate=True, verbatim in behaviour."""
    sot, eot = ref.encoder["<|startoftext|>"], ref.encoder["<|endoftext|>"]
    result = torch.zeros(len(texts), ctx, dtype=torch.long)
    for i, text in enumerate(texts):
        tokens = [sot, *ref.encode(text), eot]
        if len(tokens) > ctx:
            tokens = tokens[:ctx]
            tokens[-1] = eot
        result[i, : len(tokens)] = torch.tensor(tokens)
    return result


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench(name: str, make, batch, single, texts: list[str]) -> tuple[list[dict], torch.Tensor]:
    """Cold batch on a fresh instance, then warm batch (best of 3), then warm per-text calls."""
    tok = make()
    t_cold, ids = timed(lambda: batch(tok, texts))
    t_warm = min(timed(lambda: batch(tok, texts))[0] for _ in range(3))
    k = min(len(texts), 3000)
    t_single = timed(lambda: [single(tok, t) for t in texts[:k]])[0] * len(texts) / k
    n = len(texts)
    rows = [
        {"tokenizer": name, "mode": "cold, batch", "seconds": t_cold, "texts_per_s": n / t_cold},
        {"tokenizer": name, "mode": "warm, batch", "seconds": t_warm, "texts_per_s": n / t_warm},
        {
            "tokenizer": name,
            "mode": "warm, one call per text",
            "seconds": t_single,
            "texts_per_s": n / t_single,
        },
    ]
    return rows, ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=at_least(1), default=10_000, help="number of captions")
    parser.add_argument(
        "--out", default="tokenizer.json", help="JSON file (relative names go to benchmarks/results/)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    texts = make_captions(args.n)
    vocab = find_openai_vocab()

    rows, ids = bench(
        "clipforge",
        lambda: Tokenizer.from_openai_vocab(vocab),
        lambda tok, xs: tok(xs, truncate=True),
        lambda tok, x: tok(x, truncate=True),
        texts,
    )
    checks = {}
    ref = load_reference()
    if ref is not None:
        ref_rows, ref_ids = bench(
            "openai simple_tokenizer",
            lambda: ref.SimpleTokenizer(str(vocab)),
            lambda tok, xs: reference_tokenize(tok, xs),
            lambda tok, x: reference_tokenize(tok, [x]),
            texts,
        )
        rows += ref_rows
        checks["rows_equal_to_openai"] = int((ids == ref_ids).all(dim=1).sum())
    try:
        import tempfile

        from transformers import CLIPTokenizer

        with tempfile.TemporaryDirectory() as d:
            Tokenizer.from_openai_vocab(vocab).save(d)
            hf_rows, hf_ids = bench(
                "HF CLIPTokenizer (Rust, no ftfy)",
                lambda: CLIPTokenizer.from_pretrained(d),
                lambda tok, xs: tok(
                    xs, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
                )["input_ids"],
                lambda tok, x: tok(
                    x, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
                )["input_ids"],
                texts,
            )
        rows += hf_rows
        hf_ids = torch.where(torch.arange(77) > (hf_ids == 49407).int().argmax(1, keepdim=True), 0, hf_ids)
        checks["rows_equal_to_hf_after_zero_padding"] = int((ids == hf_ids).all(dim=1).sum())
    except ImportError:
        pass

    for r in rows:  # clipforge against each other tokenizer, same texts, same mode, this run
        ours = next(o for o in rows if o["tokenizer"] == "clipforge" and o["mode"] == r["mode"])
        r["clipforge_vs_this"] = ours["texts_per_s"] / r["texts_per_s"]
    print(f"{args.n} captions, mean {ids.count_nonzero(dim=1).float().mean():.1f} tokens each, 1 thread")
    print(f"{'tokenizer':<34} {'mode':<26} {'seconds':>8} {'texts/s':>10} {'clipforge x':>12}")
    for r in rows:
        print(
            f"{r['tokenizer']:<34} {r['mode']:<26} {r['seconds']:>8.3f} {r['texts_per_s']:>10.0f} "
            f"{r['clipforge_vs_this']:>12.2f}"
        )
    for k, v in checks.items():
        print(f"{k}: {v} / {args.n}")
    record = {
        "benchmark": "tokenizer",
        "args": {"n": args.n},
        "n_texts": args.n,
        "machine": platform.platform(),
        "python": platform.python_version(),
        "rows": rows,
        "checks": checks,
        "note": "measured on a shared CPU; HF CLIPTokenizer skips ftfy/HTML unescaping",
    }
    print(f"wrote {write_json(args.out, record)}")


if __name__ == "__main__":
    main()
