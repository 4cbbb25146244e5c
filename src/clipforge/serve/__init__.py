"""The HTTP server and search page: `clipforge serve` (needs `pip install clipforge[serve]`).

A top layer beside cli/: it builds on use/ (encoders, index, search, classify) and never on train/.
FastAPI on uvicorn; concurrent requests for one tower share a forward (`batcher.Batcher`); limits,
the API key and metrics live in `app.Guard` and `config.ServeConfig`. The page (static/) is plain
HTML + JS + CSS with no build step and nothing fetched from the network.
"""

from .config import ServeConfig, check_bind, is_loopback

__all__ = ["ServeConfig", "check_bind", "is_loopback"]
