"""Reading request bodies: the JSON and multipart shapes the endpoints accept, and their OpenAPI.

Endpoints that take images read the body themselves (`read_upload_request`: multipart files or JSON
with base64 strings) so that every malformed body gets the server's own {"error", "detail"} answer;
the pydantic models here only document the JSON shapes in /openapi.json.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile

from .errors import ApiError
from .images import decode_base64
from .service import Service


class TextsIn(BaseModel):
    texts: list[str] = Field(description="strings to embed (at most max_items, each at most max_text_chars)")


class ImagesIn(BaseModel):
    images: list[str] = Field(description="base64 images (or data: URLs)")


class ClassifyIn(ImagesIn):
    labels: list[str]
    templates: list[str] = Field(default=["{}"], description='e.g. ["a photo of {}."], averaged per label')
    top_k: int = 5


class SearchIn(BaseModel):
    text: str | None = None
    image: str | None = Field(default=None, description="a base64 image")
    id: int | None = Field(default=None, description="a row id of the index")
    vector: list[float] | None = None
    k: int = 10
    dedup: float | None = Field(default=None, description="collapse results within this cosine, e.g. 0.94")


class AddIn(ImagesIn):
    captions: list[str] | None = None


def body_doc(model: type[BaseModel], fields: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI for an endpoint that reads JSON (`model`) or multipart (`fields`) itself."""
    multipart = {"type": "object", "properties": fields}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": model.model_json_schema()},
                "multipart/form-data": {"schema": multipart},
            },
        }
    }


FILES = {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}}


async def read_upload_request(
    request: Request, service: Service
) -> tuple[list[tuple[str, bytes]], dict[str, Any]]:
    """(uploads as (name, bytes), the other fields) from a multipart or JSON body. Multipart fields are
    a FormFields (lists of strings); JSON fields are as sent."""
    ctype = request.headers.get("content-type", "").lower()
    if ctype.startswith("multipart/form-data"):
        cfg = service.cfg
        try:
            form = await request.form(max_files=cfg.max_items, max_fields=cfg.max_labels + 16)
            uploads, fields = [], FormFields()
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    uploads.append((value.filename or key, await value.read()))
                else:
                    fields.setdefault(key, []).append(value)
        except ApiError:
            raise
        except Exception as e:  # truncated or malformed multipart: the parser's words
            detail = getattr(e, "detail", None) or str(e) or type(e).__name__
            raise ApiError(400, "bad_multipart", f"cannot read the multipart body: {detail}") from None
        return uploads, fields
    if ctype.startswith("application/json"):
        body = await read_json(request)
        images = body.get("images", [])
        if isinstance(body.get("image"), str):
            images = [body["image"]]
        if not isinstance(images, list):
            raise ApiError(422, "invalid_request", "images: give a list of base64 strings")
        if len(images) > service.cfg.max_items:
            raise ApiError(
                413, "too_many", f"{len(images)} images, above the limit of {service.cfg.max_items}"
            )
        return [(f"images[{i}]", decode_base64(v, f"images[{i}]")) for i, v in enumerate(images)], body
    raise ApiError(
        415,
        "unsupported_media_type",
        f"content type {ctype or '(none)'} is not accepted here: send multipart/form-data with files or "
        "application/json with base64 images",
    )


def json_body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for a JSON-only endpoint that reads its body itself (`read_json_request`)."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


async def read_json_request(request: Request) -> dict[str, Any]:
    """The JSON object of a JSON-only endpoint: 415 for another content type, else `read_json`."""
    ctype = request.headers.get("content-type", "").lower()
    if not ctype.startswith("application/json"):
        raise ApiError(
            415, "unsupported_media_type", f"content type {ctype or '(none)'}: send application/json"
        )
    return await read_json(request)


async def read_json(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, "bad_json", f"the body is not valid JSON: {e}") from None
    except RecursionError:  # e.g. 100,000 nested brackets: json's decoder recurses per level
        raise ApiError(400, "bad_json", "the body is not usable JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_request", "the body must be a JSON object")
    return body


class FormFields(dict):
    """The non-file fields of a multipart body: every value a list of strings (a repeated field repeats).
    Numbers can only arrive as strings here, so `int_field` / `float_field` parse them; in a JSON body
    a number must be a JSON number (a string there is a client bug, refused)."""


def _scalar(fields: dict[str, Any], name: str, default: Any) -> tuple[Any, bool]:
    """(the value of field `name`, whether it is a multipart string to parse)."""
    value = fields.get(name, default)
    if not isinstance(fields, FormFields) or name not in fields:
        return value, False
    if len(value) != 1:
        raise ApiError(422, f"bad_{name}", f"{name}: give it once, got {len(value)} values")
    return value[0], True


def int_field(fields: dict[str, Any], name: str, default: int | None = None) -> int | None:
    """An integer field (range checks are the caller's): a JSON integer (not 5.0, "5" or true), or a
    multipart string of one."""
    value, form = _scalar(fields, name, default)
    if form:
        try:
            return int(value)
        except ValueError:
            pass
    elif value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise ApiError(422, f"bad_{name}", f"{name} must be an integer, got {value!r}")


def float_field(fields: dict[str, Any], name: str) -> float | None:
    """A number field, None when absent: a JSON number (not "0.9" or true), or a multipart string of one."""
    value, form = _scalar(fields, name, None)
    if form:
        try:
            return float(value)
        except ValueError:
            pass
    elif value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
        return value
    raise ApiError(422, f"bad_{name}", f"{name} must be a number, got {value!r}")
