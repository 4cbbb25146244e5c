"""clipforge serve: what the server itself answers about its API and request bodies: nothing fetched
from a CDN, one error shape for a bad body on every JSON endpoint, the server's own limits quoted,
JSON fields of the wrong type refused (multipart fields are strings and are parsed)."""

from __future__ import annotations

import base64

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient

from clipforge.serve.app import create_app
from serve_helpers import bomb_png, build_index_dir, make_service, png_bytes


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    ckpt, emb, _ = build_index_dir(tmp_path_factory.mktemp("serve_requests"))
    with TestClient(create_app(make_service(ckpt, emb, max_items=8, max_pixels=4_000_000))) as c:
        yield c


def test_nothing_served_loads_from_the_network(client):
    """/docs was FastAPI's Swagger UI, whose JS and CSS come from cdn.jsdelivr.net: a blank page on a
    machine without internet. The interactive docs are off; /openapi.json describes the API."""
    for path in ("/docs", "/redoc"):
        r = client.get(path)
        assert r.status_code == 404 and r.json()["error"] == "not_found", path
        assert "/openapi.json" in r.json()["detail"]
    assert "/v1/search" in client.get("/openapi.json").json()["paths"]
    for path in ("/", "/static/app.js", "/static/style.css"):
        text = client.get(path).text
        assert "cdn." not in text and "https://" not in text, path


JSON_ENDPOINTS = ("/v1/embed/text", "/v1/embed/image", "/v1/classify", "/v1/search", "/v1/index/add")


@pytest.mark.parametrize("path", JSON_ENDPOINTS)
def test_every_json_endpoint_answers_a_bad_body_the_same_way(client, path):
    """/v1/embed/text let FastAPI parse its body: invalid JSON got FastAPI's own error ('1: JSON decode
    error') instead of the one-line bad_json every other endpoint gives."""
    headers = {"content-type": "application/json"}
    for body, status, code in (
        (b"{not json", 400, "bad_json"),
        (b"\xff\xfe", 400, "bad_json"),
        (b"[1, 2]", 422, "invalid_request"),
    ):
        r = client.post(path, content=body, headers=headers)
        assert (r.status_code, set(r.json()), r.json()["error"]) == (status, {"error", "detail"}, code), (
            body,
            r.text,
        )
        assert isinstance(r.json()["detail"], str) and "\n" not in r.json()["detail"]


def test_a_decompression_bomb_is_refused_with_the_servers_limit(client):
    """A 20,000 x 20,000 PNG is past PIL's own hard limit, so PIL refused it first and the 413 quoted
    PIL's 178,956,970 pixels, not the limit the server applies (max_pixels, here 4,000,000)."""
    r = client.post("/v1/embed/image", files={"files": ("bomb.png", bomb_png())})
    assert (r.status_code, r.json()["error"]) == (413, "image_too_large")
    detail = r.json()["detail"]
    assert "bomb.png" in detail and "400000000 pixels" in detail and "max_pixels=4000000" in detail, detail
    assert "178956970" not in detail and "MAX_IMAGE_PIXELS" not in detail


def _b64_png() -> str:
    return base64.b64encode(png_bytes()).decode()


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"id": 1.0}, "bad_id"),  # was 404 unknown_id: a type error, not a missing row
        ({"id": "4"}, "bad_id"),
        ({"id": True}, "bad_id"),
        ({"id": 1, "k": "5"}, "bad_k"),  # was accepted: JSON has numbers, a string is a client bug
        ({"id": 1, "k": ["5"]}, "bad_k"),  # was accepted as if it were a multipart field
        ({"id": 1, "k": 5.0}, "bad_k"),
        ({"id": 1, "k": True}, "bad_k"),
        ({"id": 1, "dedup": "0.95"}, "bad_dedup"),  # was accepted
        ({"id": 1, "dedup": True}, "bad_dedup"),  # was read as 1.0
        ({"labels": ["a", "b"], "top_k": "2"}, "bad_top_k"),  # was accepted
        ({"labels": ["a", "b"], "top_k": 2.0}, "bad_top_k"),
    ],
)
def test_json_fields_of_the_wrong_type_are_refused(client, body, code):
    path = "/v1/classify" if "labels" in body else "/v1/search"
    if "labels" in body:
        body = {**body, "images": [_b64_png()]}
    r = client.post(path, json=body)
    assert (r.status_code, r.json()["error"]) == (422, code), r.text


def test_numbers_arrive_as_strings_in_multipart_and_as_numbers_in_json(client):
    """Multipart form fields are strings by nature: "2" is read as 2 there, and only there."""
    image = {"file": ("a.png", png_bytes())}
    r = client.post("/v1/search", files=image, data={"k": "2", "dedup": "0.99"})
    assert r.status_code == 200 and len(r.json()["results"]) == 2, r.text
    r = client.post("/v1/search", files=image, data={"k": "2.0"})
    assert (r.status_code, r.json()["error"]) == (422, "bad_k")
    r = client.post("/v1/search", files=image, data={"k": ["2", "3"]})
    assert (r.status_code, r.json()["error"]) == (422, "bad_k")
    files = {"files": ("a.png", png_bytes())}
    r = client.post("/v1/classify", files=files, data={"labels": ["a", "b", "c"], "top_k": "2"})
    assert r.status_code == 200 and len(r.json()["results"][0]["labels"]) == 2, r.text
    r = client.post("/v1/search", json={"id": 1, "k": 2, "dedup": 1})
    assert r.status_code == 200 and len(r.json()["results"]) == 2, r.text
    assert client.post("/v1/search", json={"id": 10**6}).json()["error"] == "unknown_id"
