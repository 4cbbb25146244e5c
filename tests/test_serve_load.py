"""A few seconds of real loopback load on uvicorn: 8 concurrent clients searching by text and embedding
images; zero errors, and the server's own metrics show that requests shared forwards (dynamic batching).
The full sweep (1/8/32 clients, batching on/off, latency percentiles, RSS) is benchmarks/serve_load.py."""

from __future__ import annotations

import asyncio
import re
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from clipforge.serve.app import create_app  # noqa: E402
from clipforge.serve.server import running  # noqa: E402
from serve_helpers import build_index_dir, make_service, png_bytes  # noqa: E402

CLIENTS, SECONDS = 8, 3.0


async def _client(base: str, n: int, stop: float, image: bytes, stats: dict) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=30) as c:
        i = 0
        while time.perf_counter() < stop:
            try:
                if (n + i) % 2:
                    r = await c.post("/v1/search", json={"text": f"a picture number {i}", "k": 5})
                else:
                    r = await c.post("/v1/embed/image", files={"files": ("q.png", image)})
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            stats["ok" if ok else "errors"] += 1
            i += 1


def _metric(text: str, name: str, tower: str) -> float:
    m = re.search(rf'^{name}\{{tower="{tower}"\}} ([\d.e+]+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_loopback_load_has_no_errors_and_batches(tmp_path):
    ckpt, emb, _ = build_index_dir(tmp_path)
    service = make_service(ckpt, emb, batch_window_ms=20)
    stats = {"ok": 0, "errors": 0}
    image = png_bytes(size=(64, 64))
    with running(create_app(service)) as base:

        async def main() -> None:
            stop = time.perf_counter() + SECONDS
            await asyncio.gather(*(_client(base, n, stop, image, stats) for n in range(CLIENTS)))

        asyncio.run(main())
        metrics = httpx.get(f"{base}/metrics").text
        assert httpx.get(f"{base}/v1/health").status_code == 200
    assert stats["errors"] == 0 and stats["ok"] >= CLIENTS, stats
    forwards = {t: _metric(metrics, "clipforge_forwards_total", t) for t in ("text", "image")}
    items = {t: _metric(metrics, "clipforge_items_total", t) for t in ("text", "image")}
    assert sum(items.values()) == stats["ok"]  # one text or one image per request
    assert sum(forwards.values()) < sum(items.values()), (forwards, items)  # requests shared forwards
    assert 'status="500"' not in metrics
