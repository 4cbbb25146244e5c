"""The FastAPI application: versioned JSON endpoints over a Service, the web page, /metrics, /openapi.json.

    app = create_app(Service(open_encoder("ckpt/"), ServeConfig(), index_dir="emb/"))

Every answer to bad input is a 4xx JSON body {"error": code, "detail": sentence}; endpoints that take
images accept multipart/form-data (files) or JSON with base64 strings. The page's files are read from
the package once, at start: no request path reaches the file system. FastAPI's /docs and /redoc are
off: their pages load JavaScript from a CDN (blank without internet) and no dependency ships it.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from .bodies import (
    FILES,
    AddIn,
    ClassifyIn,
    ImagesIn,
    SearchIn,
    TextsIn,
    body_doc,
    float_field,
    int_field,
    json_body_doc,
    read_json,
    read_json_request,
    read_upload_request,
)
from .errors import STATUS_CODES, ApiError
from .images import decode_base64
from .service import Service

T = TypeVar("T")
STATIC = {"app.js": "text/javascript", "style.css": "text/css"}
OPEN_PATHS = ("/", "/v1/health", "/openapi.json", "/static/")  # no key needed (no data in them)


class Guard:
    """Pure ASGI middleware: API key, request body limit, request counts and latency by route."""

    def __init__(self, app: Any, service: Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cfg, metrics = self.service.cfg, self.service.metrics
        start = time.perf_counter()
        status = {"code": 500}

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            refusal = self._refuse(scope)
            if refusal is not None:
                return await refusal(scope, receive, send_status)
            await self.app(scope, self._limited(receive, cfg.max_upload_bytes), send_status)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", None) or (
                "static" if scope["path"].startswith("/static/") else "unmatched"
            )
            metrics.requests.inc(name, str(status["code"]))
            metrics.latency.observe(time.perf_counter() - start, name)

    def _refuse(self, scope: dict) -> Response | None:
        cfg = self.service.cfg
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        if cfg.api_key and not (path in OPEN_PATHS or path.startswith("/static/")):
            given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")
            if not hmac.compare_digest(given.encode(), cfg.api_key.encode()):
                return error_response(
                    401, "unauthorized", "missing or wrong API key: send it in the X-API-Key header"
                )
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return error_response(400, "bad_request", "Content-Length is not a number")
            if int(length) > cfg.max_upload_bytes:
                return error_response(
                    413,
                    "too_large",
                    f"request body of {length} bytes, above the limit of {cfg.max_upload_bytes}",
                )
        return None

    @staticmethod
    def _limited(receive: Any, limit: int) -> Any:
        """`receive` that refuses a body growing past `limit` (chunked uploads carry no length)."""
        seen = 0

        async def wrapped() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise ApiError(413, "too_large", f"request body above the limit of {limit} bytes")
            return message

        return wrapped


def error_response(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors()[:3]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = getattr(exc, "code", None) or STATUS_CODES.get(exc.status_code, "error")
        detail = str(exc.detail)
        if exc.status_code == 404 and not isinstance(exc, ApiError):
            detail = f"no endpoint {request.method} {request.url.path}: see /openapi.json"
        elif exc.status_code == 405 and not isinstance(exc, ApiError):
            detail = f"{request.method} is not allowed on {request.url.path}: see /openapi.json"
        return error_response(exc.status_code, code, detail, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", _validation_message(exc))


def create_app(service: Service) -> FastAPI:
    cfg = service.cfg
    page = {
        name: (resources.files(__package__) / "static" / name).read_bytes()
        for name in ("index.html", *STATIC)
    }

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()

    app = FastAPI(
        title="clipforge",
        version=__version__,
        description="Embed, classify and search with a CLIP model. Errors: {error, detail}, a 4xx status.",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI and ReDoc fetch their assets from cdn.jsdelivr.net
        redoc_url=None,
    )
    app.state.service = service
    app.add_middleware(Guard, service=service)
    _install_error_handlers(app)

    async def bounded(work: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(work, cfg.timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(
                503, "timeout", f"the request took longer than {cfg.timeout_s:g} s: retry later"
            ) from None

    @app.get("/", include_in_schema=False)
    async def index_page() -> HTMLResponse:
        return HTMLResponse(page["index.html"])

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in STATIC:  # only the page's own files, held in memory
            raise ApiError(404, "not_found", f"no static file {name!r}")
        return Response(page[name], media_type=STATIC[name], headers={"Cache-Control": "no-cache"})

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        """Liveness: the model and the index the server holds."""
        return {"status": "ok", "version": __version__, **service.describe()}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        """Prometheus text format: requests, latency, batch sizes, forwards, queue depth, index size."""
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/embed/text", openapi_extra=json_body_doc(TextsIn))
    async def embed_text(request: Request) -> dict[str, Any]:
        """Unit-norm text embeddings, one row per text."""
        texts = (await read_json_request(request)).get("texts")  # read here: bad JSON gets bad_json
        if not isinstance(texts, list):
            raise ApiError(422, "invalid_request", "texts: give a list of strings")
        vecs = await bounded(service.embed_texts(texts))
        return {"embeddings": vecs.tolist(), "dim": int(vecs.shape[1]), "model": service.encoder.fingerprint}

    @app.post("/v1/embed/image", openapi_extra=body_doc(ImagesIn, FILES))
    async def embed_image(request: Request) -> dict[str, Any]:
        """Unit-norm image embeddings, one row per uploaded image (multipart files or base64 JSON)."""
        uploads, _ = await read_upload_request(request, service)
        vecs, _ = await bounded(service.embed_images(uploads))
        return {"embeddings": vecs.tolist(), "dim": int(vecs.shape[1]), "model": service.encoder.fingerprint}

    classify_fields = {
        **FILES,
        "labels": {"type": "array", "items": {"type": "string"}},
        "templates": {"type": "array", "items": {"type": "string"}},
        "top_k": {"type": "integer"},
    }

    @app.post("/v1/classify", openapi_extra=body_doc(ClassifyIn, classify_fields))
    async def classify(request: Request) -> dict[str, Any]:
        """Zero-shot label probabilities per image (labels embedded once and cached; templates averaged)."""
        uploads, fields = await read_upload_request(request, service)
        labels = fields.get("labels")
        if not isinstance(labels, list) or not labels:
            raise ApiError(422, "no_labels", "labels: give a list of label strings")
        templates = fields.get("templates") or ["{}"]
        if not isinstance(templates, list):  # a bare string would be read one character at a time
            raise ApiError(422, "bad_template", 'templates: give a list of strings, e.g. ["a photo of {}."]')
        top_k = int_field(fields, "top_k", 5)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise ApiError(422, "bad_top_k", "top_k must be a positive integer")
        results = await bounded(service.classify(uploads, labels, templates, top_k))
        return {"results": results}

    search_fields = {"file": {"type": "string", "format": "binary"}, "k": {"type": "integer"}}

    @app.post("/v1/search", openapi_extra=body_doc(SearchIn, search_fields))
    async def search(request: Request) -> dict[str, Any]:
        """Nearest indexed rows to a text, an image (base64 or multipart), a row id or a vector."""
        ctype = request.headers.get("content-type", "").lower()
        if ctype.startswith("multipart/form-data"):
            uploads, fields = await read_upload_request(request, service)
            if len(uploads) != 1:
                raise ApiError(422, "bad_query", f"upload exactly one image to search by, got {len(uploads)}")
            query = {"image": uploads[0]}
        elif ctype.startswith("application/json"):
            fields = await read_json(request)
            query = {q: fields[q] for q in ("text", "image", "id", "vector") if fields.get(q) is not None}
            if len(query) != 1:
                raise ApiError(422, "bad_query", "give exactly one of text, image, id or vector")
            if "image" in query:
                query["image"] = ("image", decode_base64(query["image"], "image"))
        else:
            raise ApiError(
                415, "unsupported_media_type", f"content type {ctype or '(none)'}: send application/json"
            )
        k = service.check_k(int_field(fields, "k", 10))
        dedup = float_field(fields, "dedup")
        if dedup is not None and not 0.5 <= dedup <= 1.0:
            raise ApiError(422, "bad_dedup", "dedup must be a cosine from 0.5 to 1")

        async def run() -> dict[str, Any]:
            start = time.perf_counter()
            ((what, value),) = query.items()
            if what == "text":
                if not isinstance(value, str):
                    raise ApiError(422, "bad_query", "text must be a string")
                vec = await service.embed_texts([value])
            elif what == "image":
                vec, _ = await service.embed_images([value])
            elif what == "id":
                vec = service.vector_of(value)
            else:
                vec = service.check_vector(value)
            hits = await service.search(vec, k, dedup)
            return {"results": hits, "query": what, "took_ms": round(1000 * (time.perf_counter() - start), 2)}

        return await bounded(run())

    @app.get("/v1/thumbnail/{row_id}", responses={200: {"content": {"image/jpeg": {}}}})
    async def thumbnail(row_id: int, size: int | None = None) -> Response:
        """A JPEG of an indexed image (long side `size`, default 256), by row id only."""
        jpeg = await bounded(service.thumbnail(row_id, size))
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    add_fields = {**FILES, "captions": {"type": "array", "items": {"type": "string"}}}

    @app.post("/v1/index/add", openapi_extra=body_doc(AddIn, add_fields))
    async def index_add(request: Request) -> dict[str, Any]:
        """Embed images and add them to the served index (a new part; the index grows in place)."""
        uploads, fields = await read_upload_request(request, service)
        captions = fields.get("captions")
        if captions is not None and not isinstance(captions, list):
            raise ApiError(422, "bad_captions", "captions: give a list of strings, one per image")
        ids = await bounded(service.add_images(uploads, captions))
        return {"ids": ids, "count": int(service.searcher.index.ntotal)}

    return app
