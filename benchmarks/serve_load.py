"""Loopback load on `clipforge serve`: throughput and latency with dynamic batching on and off.

The server runs as its own process (`python -m clipforge serve`, uvicorn, one event loop) over a small
index of synthetic images; N concurrent HTTP clients (asyncio + httpx, keep-alive) send requests for M
seconds each, one scenario at a time:

  search_text   POST /v1/search {"text": ..., "k": 10}   (text tower + faiss)
  embed_image   POST /v1/embed/image, one 224x224 JPEG    (decode + preprocess + image tower)

For every (batching, scenario, clients) row: requests/s (and its ratio to the same row without batching,
in the same run), p50/p95/p99 latency, errors (must be 0), the
mean items per forward from the server's /metrics, and the server's RSS before and after the row
(read from /proc; it should stay flat). The server is bounded: nothing leaves 127.0.0.1.

    python benchmarks/serve_load.py                        # tiny-vit, 1/8/32 clients, 10 s per row
    python benchmarks/serve_load.py --model ViT-B-32 --seconds 20
    python benchmarks/serve_load.py --quick                # 1/8 clients, 2 s per row: checks that it runs

Prints a table and writes benchmarks/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import at_least, format_table, write_json
from clipforge import Tokenizer, create_model, save_pretrained
from clipforge.config import PRESETS
from clipforge.use import EmbedOptions, embed
from clipforge.use.index import build_index

SCENARIOS = ("search_text", "embed_image")


def make_index(work: Path, model: str, n_images: int) -> tuple[Path, Path]:
    """(checkpoint dir, indexed embedding dir) of n random-colour JPEGs under work/."""
    net = create_model(model).eval()
    ckpt = save_pretrained(
        net,
        work / "ckpt",
        tokenizer=Tokenizer.from_openai_vocab(context_length=net.config.text.context_length),
    )
    rng = np.random.default_rng(0)
    photos = work / "photos"
    photos.mkdir()
    for i in range(n_images):
        arr = np.clip(rng.integers(0, 255, 3) + rng.normal(0, 30, (96, 128, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(photos / f"img{i:04d}.jpg", quality=90)
    embed(photos, work / "emb", ckpt, options=EmbedOptions(batch_size=32, progress=False))
    build_index(work / "emb")
    return ckpt, work / "emb"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(ckpt: Path, emb: Path, port: int, batching: bool, threads: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "clipforge", "serve", "--model", str(ckpt), "--index", str(emb)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    if not batching:
        cmd.append("--no-batching")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not answer /v1/health within 120 s")


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


async def one_client(base: str, scenario: str, n: int, stop: float, lat: list, errors: list) -> None:
    image = jpeg(n)
    async with httpx.AsyncClient(base_url=base, timeout=60) as c:
        i = 0
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            try:
                if scenario == "search_text":
                    r = await c.post("/v1/search", json={"text": f"a photo number {n}-{i}", "k": 10})
                else:
                    r = await c.post("/v1/embed/image", files={"files": ("q.jpg", image)})
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")
            except httpx.HTTPError as e:
                errors.append(f"{type(e).__name__}: {e}")
            lat.append(time.perf_counter() - t0)
            i += 1


def tower_counts(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics").text
    out = {}
    for name in ("forwards", "items"):
        for tower in ("text", "image"):
            m = re.search(rf'^clipforge_{name}_total\{{tower="{tower}"\}} ([\d.e+]+)$', text, re.M)
            out[f"{name}_{tower}"] = float(m.group(1)) if m else 0.0
    return out


def run_row(base: str, pid: int, scenario: str, clients: int, seconds: float) -> dict:
    lat: list[float] = []
    errors: list[str] = []
    before, rss0 = tower_counts(base), rss_mb(pid)

    async def main() -> None:
        stop = time.perf_counter() + seconds
        await asyncio.gather(*(one_client(base, scenario, n, stop, lat, errors) for n in range(clients)))

    start = time.perf_counter()
    asyncio.run(main())
    elapsed = time.perf_counter() - start
    after = tower_counts(base)
    tower = "text" if scenario == "search_text" else "image"
    forwards = after[f"forwards_{tower}"] - before[f"forwards_{tower}"]
    items = after[f"items_{tower}"] - before[f"items_{tower}"]
    q = np.percentile(np.array(lat) * 1000, [50, 95, 99]) if lat else [float("nan")] * 3
    return {
        "scenario": scenario,
        "clients": clients,
        "requests": len(lat),
        "req_per_s": len(lat) / elapsed,
        "p50_ms": float(q[0]),
        "p95_ms": float(q[1]),
        "p99_ms": float(q[2]),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "items_per_forward": items / forwards if forwards else None,
        "rss_before_mb": rss0,
        "rss_after_mb": rss_mb(pid),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-vit", choices=list(PRESETS), metavar="PRESET")
    p.add_argument("--images", type=at_least(1), default=200)
    p.add_argument("--clients", default="1,8,32", help="comma-separated client counts")
    p.add_argument("--seconds", type=at_least(0.1, float), default=10.0, help="per row")
    p.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"comma-separated: {', '.join(SCENARIOS)}"
    )
    p.add_argument("--threads", type=at_least(1), default=os.cpu_count(), help="the server's torch threads")
    p.add_argument("--quick", action="store_true", help="1 and 8 clients, 2 s per row, 32 images")
    p.add_argument("--out", default="serve_load.json")
    args = p.parse_args(argv)
    if args.quick:
        args.clients, args.seconds, args.images = "1,8", 2.0, 32
    try:
        clients = [at_least(1)(c) for c in args.clients.split(",")]
    except argparse.ArgumentTypeError as e:
        p.error(f"--clients {args.clients}: {e}")
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown or not scenarios:
        what = f"unknown scenarios {sorted(unknown)}" if unknown else "no scenario given"
        p.error(f"--scenarios {args.scenarios!r}: {what}; choose from {', '.join(SCENARIOS)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, emb = make_index(Path(tmp), args.model, args.images)
        for batching in (True, False):
            port = free_port()
            proc = start_server(ckpt, emb, port, batching, args.threads)
            base = f"http://127.0.0.1:{port}"
            try:
                for scenario in scenarios:
                    run_row(base, proc.pid, scenario, 1, min(1.0, args.seconds))  # warm-up, not reported
                    for n in clients:
                        row = {
                            "batching": "on" if batching else "off",
                            **run_row(base, proc.pid, scenario, n, args.seconds),
                        }
                        rows.append(row)
                        print(
                            f"  batching {row['batching']:3s} {scenario:12s} {n:3d} clients: "
                            f"{row['req_per_s']:.1f} req/s, {row['errors']} errors",
                            flush=True,
                        )
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    for row in rows:  # batching's gain, both sides measured in this run
        off = next(r for r in rows if r["batching"] == "off" and r["scenario"] == row["scenario"]
                   and r["clients"] == row["clients"])  # fmt: skip
        row["vs_no_batching"] = row["req_per_s"] / off["req_per_s"] if off["req_per_s"] else None
    columns = ["batching", "scenario", "clients", "req_per_s", "vs_no_batching", "p50_ms", "p95_ms", "p99_ms"]
    columns += ["errors"]
    columns += ["items_per_forward", "rss_before_mb", "rss_after_mb"]
    print(f"\nclipforge serve on 127.0.0.1, {args.model}, {args.seconds:g} s per row:")
    print(format_table(rows, columns))
    errors = sum(r["errors"] for r in rows)
    path = write_json(
        args.out,
        {
            "args": vars(args),
            "rows": rows,
            "total_errors": errors,
            "median_req_per_s": statistics.median(r["req_per_s"] for r in rows),
        },
    )
    print(f"\nwrote {path}")
    if errors:
        print(f"{errors} requests failed; first: {next(r['first_error'] for r in rows if r['errors'])}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
