"""What a server may do: request limits, batching, binding. One frozen dataclass; the CLI fills it."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..transforms import DEFAULT_MAX_ASPECT

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


@dataclass(frozen=True)
class ServeConfig:
    """Limits are per request unless named otherwise. `api_key` None: no key asked (loopback only)."""

    max_upload_bytes: int = 8 * 1024 * 1024  # a whole request body
    max_pixels: int = 40_000_000  # decoded pixels per image (decompression-bomb guard)
    max_aspect: float = DEFAULT_MAX_ASPECT
    max_items: int = 32  # texts or images in one request
    max_text_chars: int = 2_000  # the tokenizer keeps 77 tokens; longer texts only cost CPU
    max_labels: int = 200
    max_templates: int = 16
    max_k: int = 100
    timeout_s: float = 30.0  # a request still waiting after this is answered 503
    batching: bool = True
    max_batch: int = 32  # items in one forward of a tower
    batch_window_ms: float = 5.0  # how long the first request of a batch waits for company
    max_queue: int = 1024  # items waiting per tower; beyond it requests are answered 503
    thumbnail_size: int = 256
    thumbnail_cache: int = 512  # thumbnails kept in memory
    api_key: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_pixels", "max_items", "max_text_chars", "max_k", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServeConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.timeout_s <= 0 or self.batch_window_ms < 0:
            raise ValueError("ServeConfig.timeout_s must be > 0 and batch_window_ms >= 0")
        if self.api_key is not None and len(self.api_key) < 16:
            raise ValueError(
                "the API key is too short: use at least 16 characters (e.g. `openssl rand -hex 24`)"
            )


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost names; False for 0.0.0.0, :: and every other address."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond this machine without an API key."""
    if not is_loopback(host) and not api_key:
        raise ValueError(
            f"--host {host} makes the server reachable from other machines: set an API key "
            "(CLIPFORGE_API_KEY or --api-key-file) or bind to 127.0.0.1"
        )
