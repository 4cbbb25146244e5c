"""clipforge serve: every endpoint against the use/ library it fronts (same vectors, same hits, same label
probabilities), malformed requests answered with the right 4xx (and the server healthy after), the
API key, timeouts, and dynamic batching (concurrent requests -> fewer forwards, same results)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from clipforge.cli import main as cli_main  # noqa: E402
from clipforge.serve.app import create_app  # noqa: E402
from clipforge.serve.config import ServeConfig, check_bind, is_loopback  # noqa: E402
from clipforge.transforms import load_image, load_image_reduced  # noqa: E402
from clipforge.use import EmbeddingStore, EmbedOptions, embed  # noqa: E402
from clipforge.use.classify import Classifier  # noqa: E402
from clipforge.use.embedder import append_rows  # noqa: E402
from clipforge.use.index import build_index  # noqa: E402
from clipforge.use.search import Searcher  # noqa: E402
from serve_helpers import N_IMAGES, bomb_png, build_index_dir, make_service, png_bytes  # noqa: E402

KEY = "k" * 24


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_index_dir(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def client(built):
    ckpt, emb, _ = built
    service = make_service(ckpt, emb, max_items=8, max_upload_bytes=2_000_000, max_pixels=4_000_000)
    with TestClient(create_app(service)) as c:
        yield c


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_health_docs_and_page(client):
    h = client.get("/v1/health").json()
    assert h["status"] == "ok" and h["index"] == {"count": N_IMAGES, "kind": "flat", "modality": "image"}
    paths = client.get("/openapi.json").json()["paths"]
    for p in ("/v1/embed/text", "/v1/embed/image", "/v1/classify", "/v1/search", "/v1/index/add"):
        assert p in paths
    assert "multipart/form-data" in paths["/v1/embed/image"]["post"]["requestBody"]["content"]
    page = client.get("/")
    assert page.status_code == 200 and 'id="q"' in page.text
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")


def test_embed_text_equals_library(client):
    service = client.app.state.service
    texts = ["a red picture", "a blue picture number 3"]
    out = client.post("/v1/embed/text", json={"texts": texts}).json()
    got = np.array(out["embeddings"])
    want = service.encoder.encode_texts(texts).numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert out["dim"] == want.shape[1] and out["model"] == service.encoder.fingerprint


def test_embed_image_multipart_and_base64_equal_library(client, built):
    service = client.app.state.service
    path = built[2][0]
    data = path.read_bytes()
    multi = client.post("/v1/embed/image", files=[("files", (path.name, data))]).json()["embeddings"]
    b64 = client.post("/v1/embed/image", json={"images": [_b64(data)]}).json()["embeddings"]
    enc = service.encoder
    want = enc.encode_pixels(enc.preprocess(load_image(path))[None]).numpy()
    np.testing.assert_allclose(np.array(multi), want, atol=1e-5)
    np.testing.assert_allclose(np.array(b64), want, atol=1e-5)


def test_classify_equals_library_classifier(client, built):
    service = client.app.state.service
    path = built[2][1]
    labels, templates = ["a red thing", "a green thing", "a blue thing"], ["a photo of {}.", "{}"]
    want, _ = Classifier(service.encoder, labels, templates).classify([path], top_k=3)
    files = [("files", (path.name, path.read_bytes()))]
    data = {"labels": labels, "templates": templates, "top_k": "3"}
    got = client.post("/v1/classify", files=files, data=data).json()["results"][0]
    assert got["labels"] == want[0]["labels"]
    np.testing.assert_allclose(got["scores"], want[0]["scores"], atol=1e-5)
    as_json = client.post(
        "/v1/classify",
        json={"images": [_b64(path.read_bytes())], "labels": labels, "templates": templates, "top_k": 3},
    ).json()["results"][0]
    assert as_json["labels"] == got["labels"]


def test_search_by_text_image_id_vector(client, built):
    _, emb, images = built
    lib = Searcher(emb, encoder=client.app.state.service.encoder)
    want = [h["id"] for h in lib.search(lib.query(text="a purple picture"), k=5)[0]]
    got = client.post("/v1/search", json={"text": "a purple picture", "k": 5}).json()["results"]
    assert [h["id"] for h in got] == want
    assert set(got[0]) == {"id", "score", "key", "caption", "width", "height", "thumbnail"}  # no path
    assert got[0]["thumbnail"] == f"/v1/thumbnail/{got[0]['id']}"

    by_id = client.post("/v1/search", json={"id": 4, "k": 3}).json()["results"]
    assert by_id[0]["id"] == 4 and by_id[0]["score"] == pytest.approx(1.0, abs=1e-5)
    vec = lib.store.vectors([7])[0].tolist()
    assert client.post("/v1/search", json={"vector": vec, "k": 1}).json()["results"][0]["id"] == 7

    key_to_id = {r["key"]: r["id"] for r in lib.store.metadata(["id", "key"]).to_pylist()}
    target = images[5]  # photos/sub/img005.png
    upload = client.post("/v1/search", files={"file": (target.name, target.read_bytes())}, data={"k": "2"})
    hit = upload.json()["results"][0]
    assert hit["id"] == key_to_id[target.relative_to(images[0].parent).as_posix()]
    assert hit["score"] == pytest.approx(1.0, abs=1e-4)


def test_thumbnail_by_id_only(client):
    r = client.get("/v1/thumbnail/2")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    img = Image.open(io.BytesIO(r.content))
    assert max(img.size) <= 256
    assert client.get("/v1/thumbnail/2?size=20").status_code == 200
    assert client.get("/v1/thumbnail/2?size=0").json()["error"] == "bad_size"
    assert client.get(f"/v1/thumbnail/{N_IMAGES + 50}").json()["error"] == "unknown_id"
    for bad in ("-1", "..%2F..%2Fmanifest.json", "manifest.json", "1.5"):
        r = client.get(f"/v1/thumbnail/{bad}")
        assert r.status_code in (404, 422), (bad, r.status_code)
    assert client.get("/static/..%2F..%2Fapp.py").status_code == 404
    assert client.get("/static/index.html").status_code == 404  # only the page's assets, by name


def _truncated_multipart() -> tuple[bytes, str]:
    boundary = "XyZ123boundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode() + png_bytes()[:60]  # cut inside the file: no closing boundary
    return body, f"multipart/form-data; boundary={boundary}"


def _malformed(client):
    """(name, request thunk, expected status, expected error code or None)."""
    big = png_bytes(size=(1200, 1200))  # ~4 MB of noise as PNG: above the 2 MB body limit
    trunc, trunc_type = _truncated_multipart()
    return [
        ("truncated multipart", lambda: client.post(
            "/v1/embed/image", content=trunc, headers={"content-type": trunc_type}), 400, None),
        ("decompression bomb", lambda: client.post(
            "/v1/embed/image", files={"files": ("bomb.png", bomb_png())}), 413, "image_too_large"),
        ("50k-character text", lambda: client.post(
            "/v1/embed/text", json={"texts": ["x" * 50_000]}), 413, "text_too_long"),
        ("text/plain to an image endpoint", lambda: client.post(
            "/v1/embed/image", content=b"hello", headers={"content-type": "text/plain"}), 415, None),
        ("form to a JSON endpoint", lambda: client.post(
            "/v1/embed/text", data={"texts": "a"}), 415, "unsupported_media_type"),  # as /v1/search says
        ("texts not a list", lambda: client.post(
            "/v1/embed/text", json={"texts": "a"}), 422, "invalid_request"),
        ("no texts field", lambda: client.post("/v1/embed/text", json={}), 422, "invalid_request"),
        ("unknown endpoint", lambda: client.get("/v1/nothing/here"), 404, "not_found"),
        ("wrong method", lambda: client.get("/v1/search"), 405, "method_not_allowed"),
        ("invalid JSON", lambda: client.post(
            "/v1/search", content=b"{not json", headers={"content-type": "application/json"}),
            400, "bad_json"),
        ("JSON array body", lambda: client.post("/v1/search", json=[1, 2]), 422, "invalid_request"),
        ("JSON nested 100k deep", lambda: client.post(
            "/v1/search", content=b'{"vector": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            headers={"content-type": "application/json"}), 400, "bad_json"),
        ("empty text", lambda: client.post("/v1/embed/text", json={"texts": ["  "]}), 400, "empty_text"),
        ("no texts", lambda: client.post("/v1/embed/text", json={"texts": []}), 400, "empty_text"),
        ("too many texts", lambda: client.post("/v1/embed/text", json={"texts": ["a"] * 9}), 413, "too_many"),
        ("not an image", lambda: client.post(
            "/v1/embed/image", files={"files": ("x.jpg", b"\xff\xd8\xff not a jpeg")}), 400, "bad_image"),
        ("bad base64", lambda: client.post("/v1/embed/image", json={"images": ["@@@"]}), 400, "bad_image"),
        ("empty upload", lambda: client.post(
            "/v1/embed/image", files={"files": ("x.png", b"")}), 400, "bad_image"),
        ("body above the limit", lambda: client.post(
            "/v1/embed/image", files={"files": ("big.png", big)}), 413, "too_large"),
        ("k = 0", lambda: client.post("/v1/search", json={"id": 1, "k": 0}), 422, "bad_k"),
        ("k too large", lambda: client.post("/v1/search", json={"id": 1, "k": 10_000}), 422, "bad_k"),
        ("k not a number", lambda: client.post(
            "/v1/search", files={"file": ("a.png", png_bytes())}, data={"k": "ten"}), 422, "bad_k"),
        ("unknown id", lambda: client.post("/v1/search", json={"id": 999}), 404, "unknown_id"),
        ("two queries", lambda: client.post("/v1/search", json={"id": 1, "text": "a"}), 422, "bad_query"),
        ("vector of the wrong size", lambda: client.post(
            "/v1/search", json={"vector": [1.0, 2.0]}), 422, "bad_vector"),
        ("zero vector", lambda: client.post(
            "/v1/search", json={"vector": [0.0] * 32}), 422, "bad_vector"),
        ("no labels", lambda: client.post(
            "/v1/classify", files={"files": ("a.png", png_bytes())}), 422, "no_labels"),
        ("template without {}", lambda: client.post(
            "/v1/classify", files={"files": ("a.png", png_bytes())},
            data={"labels": ["a"], "templates": ["no placeholder"]}), 400, "bad_template"),
        ("templates as one string", lambda: client.post(
            "/v1/classify", json={"images": [_b64(png_bytes())], "labels": ["a"], "templates": "a {}"}),
            422, "bad_template"),
        ("a label that is a number", lambda: client.post(
            "/v1/classify", json={"images": [_b64(png_bytes())], "labels": [1]}), 422, "invalid_request"),
    ]  # fmt: skip


def test_malformed_requests_get_4xx_and_server_stays_healthy(client):
    failures = []
    for name, request, status, code in _malformed(client):
        r = request()
        body = r.json()
        if r.status_code != status or (code and body.get("error") != code) or not body.get("detail"):
            failures.append(f"{name}: {r.status_code} {body}")
        assert client.get("/v1/health").status_code == 200, name
    assert not failures, "\n".join(failures)
    metrics = client.get("/metrics").text
    assert 'status="500"' not in metrics
    # the server still answers real work after all that
    assert client.post("/v1/search", json={"text": "a red picture", "k": 2}).status_code == 200


def test_add_images_while_serving(built, tmp_path):
    ckpt, emb, _ = built
    mine = tmp_path / "emb"
    shutil.copytree(emb, mine)
    with TestClient(create_app(make_service(ckpt, mine))) as c:
        new = [png_bytes(colour=(10, 250, 10)), png_bytes(colour=(250, 250, 10), fmt="JPEG")]
        r = c.post("/v1/index/add", files=[("files", ("g.png", new[0])), ("files", ("y.jpg", new[1]))])
        assert r.status_code == 200, r.text
        assert r.json() == {"ids": [N_IMAGES, N_IMAGES + 1], "count": N_IMAGES + 2}
        hit = c.post("/v1/search", files={"file": ("g.png", new[0])}, data={"k": "1"}).json()["results"][0]
        assert hit["id"] == N_IMAGES and hit["key"].startswith("uploads/")
        assert c.get(f"/v1/thumbnail/{N_IMAGES + 1}").status_code == 200
        assert c.get("/v1/health").json()["index"]["count"] == N_IMAGES + 2
        assert c.post("/v1/index/add", json={"images": [_b64(b"junk")]}).status_code == 400
        for captions in (5, "x", [{"a": 1}], [7]):  # not a list of strings: refused, nothing written
            r = c.post("/v1/index/add", json={"images": [_b64(new[0])], "captions": captions})
            assert (r.status_code, r.json()["error"]) == (422, "bad_captions"), (captions, r.text)
    assert Searcher(mine).index.ntotal == N_IMAGES + 2  # on disk: a restart serves them too
    assert len(list((mine / "uploads").iterdir())) == 2


def test_an_added_image_keeps_an_absolute_path(built, tmp_path, monkeypatch):
    """Served as a relative --index: the path written for an upload was relative to the server's working
    directory, so a server started from anywhere else answered its thumbnail with image_missing."""
    ckpt, emb, _ = built
    shutil.copytree(emb, tmp_path / "emb")
    monkeypatch.chdir(tmp_path)
    with TestClient(create_app(make_service(ckpt, "emb"))) as c:
        new_id = c.post("/v1/index/add", files={"files": ("g.png", png_bytes())}).json()["ids"][0]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with TestClient(create_app(make_service(ckpt, tmp_path / "emb"))) as c:
        assert c.get(f"/v1/thumbnail/{new_id}").status_code == 200


def test_adds_grow_the_caption_index_too(built, tmp_path):
    """A directory embedded with captions and indexed for both modalities: an add through the server
    grows the text index as well, so `clipforge search --modality text` sees the new rows."""
    ckpt, _, images = built
    both = tmp_path / "emb"
    embed(images[0].parent, both, ckpt, options=EmbedOptions(modality="both", progress=False))
    build_index(both)
    build_index(both, modality="text")
    with TestClient(create_app(make_service(ckpt, both))) as c:
        assert c.post("/v1/index/add", json={}).json()["error"] == "no_image"  # before "give captions"
        r = c.post("/v1/index/add", json={"images": [_b64(png_bytes())], "captions": ["a brand new caption"]})
        assert r.status_code == 200, r.text
    text = Searcher(both, "text")
    assert text.index.ntotal == text.store.count == N_IMAGES + 1
    assert text.search(text.store.vectors([N_IMAGES], "text"), 1)[0][0]["id"] == N_IMAGES


def test_adds_to_a_fast_decoded_index_are_decoded_the_same_way(built, tmp_path):
    """A directory made with `embed --fast-decode` gets uploads decoded at reduced scale too (its rows stay
    one kind), with their full sizes in the metadata; append_rows refuses rows decoded the other way."""
    ckpt, emb, _ = built
    mine = tmp_path / "emb"
    shutil.copytree(emb, mine)
    manifest_path = mine / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["fast_decode"] = True
    manifest_path.write_text(json.dumps(manifest))
    photo = png_bytes(size=(200, 160), colour=(40, 90, 200), fmt="JPEG")
    service = make_service(ckpt, mine)
    with TestClient(create_app(service)) as c:
        r = c.post("/v1/index/add", files=[("files", ("p.jpg", photo))])
        assert r.status_code == 200, r.text
        (new_id,) = r.json()["ids"]
    enc = service.encoder
    reduced, size = load_image_reduced(io.BytesIO(photo), enc.preprocess_config.image_size)
    assert reduced.size[0] < 200 and size == (200, 160)  # the decoder did scale it down
    want = enc.encode_pixels(enc.preprocess(reduced)[None]).numpy()[0]
    exact = enc.encode_pixels(enc.preprocess(load_image(io.BytesIO(photo)))[None]).numpy()[0]
    store = EmbeddingStore(mine)
    got = store.vectors([new_id], "image")[0].astype(np.float32)
    assert np.abs(got - want).max() < 2e-4 < np.abs(got - exact).max()  # exact decoding: 6e-4 away
    meta = store.metadata(["width", "height"]).to_pylist()[new_id]
    assert (meta["width"], meta["height"]) == (200, 160)
    rows = {"key": ["x"], "path": ["x"], "caption": [None], "width": [1], "height": [1]}
    with pytest.raises(ValueError, match=r"emb was embedded with fast JPEG decoding; these rows"):
        append_rows(mine, rows, {"image": want[None]}, enc.fingerprint)


def test_api_key_required_when_set_and_compared(built):
    ckpt, emb, _ = built
    with TestClient(create_app(make_service(ckpt, emb, api_key=KEY))) as c:
        body = {"texts": ["a"]}
        assert c.post("/v1/embed/text", json=body).status_code == 401
        assert c.post("/v1/embed/text", json=body, headers={"X-API-Key": "k" * 23 + "x"}).status_code == 401
        assert c.post("/v1/embed/text", json=body, headers={"X-API-Key": KEY}).status_code == 200
        bearer = {"Authorization": f"Bearer {KEY}"}
        assert c.post("/v1/embed/text", json=body, headers=bearer).status_code == 200
        assert c.get("/metrics").status_code == 401
        assert c.get("/v1/thumbnail/1").status_code == 401
        assert c.get("/v1/health").status_code == 200 and c.get("/").status_code == 200


def test_binding_beyond_loopback_needs_a_key(built, capsys, monkeypatch):
    for host in ("127.0.0.1", "127.0.0.5", "::1", "localhost"):
        assert is_loopback(host)
    for host in ("0.0.0.0", "::", "192.168.1.4", "example.com"):
        assert not is_loopback(host)
        with pytest.raises(ValueError, match="API key"):
            check_bind(host, None)
        check_bind(host, KEY)
    monkeypatch.delenv("CLIPFORGE_API_KEY", raising=False)
    start = time.perf_counter()
    assert cli_main(["serve", "--model", str(built[0]), "--host", "0.0.0.0"]) == 1
    assert "API key" in capsys.readouterr().err and time.perf_counter() - start < 5
    with pytest.raises(ValueError, match="too short"):
        ServeConfig(api_key="short")


def test_request_timeout_is_a_503_and_the_server_recovers(built):
    ckpt, emb, _ = built
    service = make_service(ckpt, emb, timeout_s=0.2)
    forward = service.text.forward

    def slow(items):
        time.sleep(0.6)
        return forward(items)

    with TestClient(create_app(service)) as c:
        service.text.forward = slow
        r = c.post("/v1/embed/text", json={"texts": ["a"]})
        assert r.status_code == 503 and r.json()["error"] == "timeout"
        service.text.forward = forward
        time.sleep(0.5)  # the slow forward already running finishes in its thread
        assert c.post("/v1/embed/text", json={"texts": ["a"]}).status_code == 200


async def _concurrent_texts(app, texts):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        rs = await asyncio.gather(*(c.post("/v1/embed/text", json={"texts": [t]}) for t in texts))
    return [r.json()["embeddings"][0] for r in rs]


@pytest.mark.parametrize("batching", [True, False])
def test_concurrent_requests_share_forwards(built, batching):
    ckpt, emb, _ = built
    service = make_service(ckpt, emb, batching=batching, batch_window_ms=200, max_batch=8)
    texts = [f"a picture number {i}" for i in range(16)]
    got = asyncio.run(_concurrent_texts(create_app(service), texts))
    service.close()
    forwards = service.metrics.forwards.get("text")
    if batching:
        assert forwards == 2, forwards  # 16 single-text requests, 8 per forward
        assert service.metrics.batch_size.total("text") == 16
    else:
        assert forwards == 16
    want = service.encoder.encode_texts(texts).numpy()
    np.testing.assert_allclose(np.array(got), want, atol=1e-5)  # batching changes no answer


def test_batcher_keeps_requests_whole_and_in_order():
    from clipforge.serve.batcher import Batcher
    from clipforge.serve.metrics import ServerMetrics

    seen = []

    def forward(items):
        seen.append(len(items))
        if "boom" in items:
            raise RuntimeError("model failed")
        return [x.upper() for x in items]

    async def main():
        b = Batcher("text", forward, ServerMetrics(), max_batch=5, window_s=0.05)
        reqs = [["a", "b"], ["c", "d"], ["e", "f"], ["g"]]
        out = await asyncio.gather(*(b.submit(r) for r in reqs))
        with pytest.raises(RuntimeError, match="model failed"):
            await b.submit(["boom"])
        b.close()
        return out

    out = asyncio.run(main())
    assert out == [["A", "B"], ["C", "D"], ["E", "F"], ["G"]]
    assert seen[:2] == [4, 3] and all(n <= 5 for n in seen)  # 2+2, then +2 would pass 5: next forward


def test_metrics_text_format():
    from clipforge.serve.metrics import ServerMetrics

    m = ServerMetrics()
    for v in (1, 3, 3, 40):
        m.batch_size.observe(v, "image")
    text = m.render()
    assert 'clipforge_batch_size_bucket{tower="image",le="1"} 1' in text
    assert 'clipforge_batch_size_bucket{tower="image",le="4"} 3' in text
    assert 'clipforge_batch_size_bucket{tower="image",le="+Inf"} 4' in text
    assert 'clipforge_batch_size_sum{tower="image"} 47' in text
    assert "# TYPE clipforge_queue_depth gauge" in text


def test_service_refuses_an_index_of_another_model(built, tmp_path):
    from use_helpers import tiny_checkpoint

    other = tiny_checkpoint(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="fingerprint"):
        make_service(other, built[1])


def test_onnx_runtime_serves_the_same_index(built, tmp_path):
    pytest.importorskip("onnxruntime")
    from clipforge.use.onnx_export import export_onnx

    ckpt, emb, _ = built
    export_onnx(ckpt, tmp_path / "onnx")
    torch_service = make_service(ckpt, emb)
    with TestClient(create_app(make_service(tmp_path / "onnx", emb))) as c:  # same fingerprint: accepted
        assert c.get("/v1/health").json()["model"]["runtime"] == "onnx"
        got = np.array(c.post("/v1/embed/text", json={"texts": ["a red picture"]}).json()["embeddings"])
        hits = c.post("/v1/search", json={"text": "a red picture", "k": 3}).json()["results"]
    want = torch_service.encoder.encode_texts(["a red picture"]).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    lib = Searcher(emb, encoder=torch_service.encoder)
    assert [h["id"] for h in hits] == [h["id"] for h in lib.search(lib.query(text="a red picture"), k=3)[0]]
    torch_service.close()
