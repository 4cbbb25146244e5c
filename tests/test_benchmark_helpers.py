"""The benchmarks' helpers that reach into the library (benchmarks/_search.py writes embedding
directories by hand): they must follow the library's renames, or the benchmark dies minutes into a run."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from helpers import import_benchmark


@pytest.fixture
def search_bench(monkeypatch):
    yield import_benchmark(monkeypatch, "_search")
    sys.modules.pop("_search", None)


def test_search_benchmark_writes_a_store_the_library_reads(search_bench, tmp_path):
    from clipforge.use.store import EmbeddingStore

    rows = search_bench._generator("clustered", 8, seed=0)
    search_bench.write_vectors(tmp_path / "v", 30, rows)
    store = EmbeddingStore(tmp_path / "v")
    vectors = store.vectors(np.arange(store.count))
    assert store.count == 30 and vectors.shape == (30, 8)
    np.testing.assert_allclose(np.linalg.norm(vectors.astype(np.float32), axis=1), 1.0, atol=1e-3)
