"""Errors a request can cause, answered as JSON: {"error": code, "detail": one line naming the problem}."""

from __future__ import annotations

from fastapi import HTTPException


class ApiError(HTTPException):
    """A 4xx (or 503) with a short machine-readable code and a sentence for people.

    A subclass of FastAPI's HTTPException so that raising it while FastAPI reads a body (the upload limit
    fires there) is passed through instead of being turned into a generic 400."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=status, detail=detail, headers=headers)
        self.code = code


# the code for errors Starlette or FastAPI raise themselves, by status
STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    503: "unavailable",
}
