"""Nested training state <-> one `.safetensors` file, a format that cannot run code when read.

Run checkpoints hold more than tensors: optimizer state with integer keys, tuples (Adam's betas, Python's
`random` state), numpy arrays (numpy's RNG state), ints, floats, strings, None. A pickle stores all of
that but also lets the file name any callable to run on load, so a checkpoint copied from another
machine could execute code. Here the tensors (and numpy arrays, as raw bytes) go into the safetensors
body and everything else into a JSON tree in the safetensors metadata, in which a tensor is a reference
by name. Reading parses JSON and tensor bytes only. The round trip is exact: floats go through
`repr`-exact JSON, non-finite floats and every container type are tagged, dict keys keep their types.

JSON encoding (every container is a one-key object, so nothing is ambiguous):
  None, bool, int, str, finite float -> themselves
  {"float": "nan" | "inf" | "-inf"}                  non-finite float
  {"list": [...]}, {"tuple": [...]}                  sequences
  {"dict": [[key, value], ...]}                      mappings, keys of any encodable type, in order
  {"odict": [[key, value], ...]}                     an OrderedDict (what model.state_dict() returns)
  {"tensor": name}                                   a torch tensor (CPU on load)
  {"ndarray": name, "dtype": "<u4", "shape": [...]}  a numpy array, stored as its raw bytes
  {"npscalar": name, "dtype": "<f8"}                 a numpy scalar (np.float64(...), np.int64(...))
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import atomic_file

STATE_FORMAT = "clipforge-state"
STATE_VERSION = "1"


class StateFormatError(ValueError):
    """A file that is not a readable clipforge state file (message: one line naming the file)."""


# ------------------------------------------------------------------------------------------ encode
class _Encoder:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._storages: set[tuple[int, torch.device]] = set()

    def _name(self, path: str) -> str:
        name, n = path or "root", 1
        while name in self.tensors:  # two paths that print alike ("1" and 1): keep both
            n += 1
            name = f"{path}#{n}"
        return name

    def _add(self, t: torch.Tensor, path: str) -> str:
        t = t.detach()
        if type(t) not in (torch.Tensor, torch.nn.Parameter):
            # a DTensor / subclass would be saved as one shard, silently; state must be consolidated first
            raise TypeError(f"state at '{path}': {type(t).__name__} is not a plain tensor; gather it first")
        t = t.cpu()
        key = (t.untyped_storage().data_ptr(), t.device)
        # safetensors refuses tensors that share memory (tied weights, views of one buffer): copy those
        if not t.is_contiguous() or (t.numel() and key in self._storages):
            t = t.contiguous().clone()
        if t.numel():
            self._storages.add((t.untyped_storage().data_ptr(), t.device))
        name = self._name(path)
        self.tensors[name] = t
        return name

    def encode(self, obj: Any, path: str) -> Any:
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, int) and not isinstance(obj, np.integer):
            return int(obj)
        if isinstance(obj, float) and not isinstance(obj, np.floating):
            return float(obj) if math.isfinite(obj) else {"float": repr(float(obj))}
        if isinstance(obj, torch.Tensor):
            return {"tensor": self._add(obj, path)}
        if isinstance(obj, np.ndarray | np.generic):
            arr = np.asarray(obj)
            if arr.dtype.hasobject:
                raise TypeError(f"state at '{path}': numpy arrays of Python objects cannot be stored")
            data = bytearray(np.ascontiguousarray(arr).tobytes())
            raw = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
            name = self._add(raw, path)
            if isinstance(obj, np.generic):
                return {"npscalar": name, "dtype": arr.dtype.str}
            return {"ndarray": name, "dtype": arr.dtype.str, "shape": list(arr.shape)}
        if isinstance(obj, Mapping):
            kind = "odict" if isinstance(obj, OrderedDict) else "dict"
            return {kind: [[self.encode(k, path), self.encode(v, f"{path}/{k}")] for k, v in obj.items()]}
        if isinstance(obj, tuple | list):
            kind = "tuple" if isinstance(obj, tuple) else "list"
            return {kind: [self.encode(v, f"{path}/{i}") for i, v in enumerate(obj)]}
        raise TypeError(f"state at '{path}': {type(obj).__name__} cannot be stored in a state file")


def encode_state(state: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) for `state`; raises TypeError naming the path of a value that
    cannot be stored (a callable, an object, a tensor subclass)."""
    enc = _Encoder()
    tree = enc.encode(state, "")
    meta = {"format": STATE_FORMAT, "version": STATE_VERSION, "state": json.dumps(tree, allow_nan=False)}
    return enc.tensors, meta


# ------------------------------------------------------------------------------------------ decode
def _hashable(key: Any) -> Any:
    if isinstance(key, list):  # JSON cannot carry a tuple key as a tuple; a list key is invalid anyway
        raise TypeError("a dict key decoded to a list")
    return key


def decode_state(tree: Any, tensors: Mapping[str, torch.Tensor], where: str = "state") -> Any:
    """Inverse of `encode_state`: rebuild the nested state from the JSON tree and the tensors."""

    def dec(node: Any) -> Any:
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, dict) and len(node) in (1, 2, 3):
            if "tensor" in node:
                return tensors[node["tensor"]]
            if "float" in node and node["float"] in ("nan", "inf", "-inf"):
                return float(node["float"])
            if "list" in node:
                return [dec(v) for v in node["list"]]
            if "tuple" in node:
                return tuple(dec(v) for v in node["tuple"])
            if "dict" in node:
                return {_hashable(dec(k)): dec(v) for k, v in node["dict"]}
            if "odict" in node:
                return OrderedDict((_hashable(dec(k)), dec(v)) for k, v in node["odict"])
            if "ndarray" in node or "npscalar" in node:
                raw = tensors[node.get("ndarray", node.get("npscalar"))].numpy().tobytes()
                dtype = np.dtype(node["dtype"])
                if dtype.hasobject:
                    raise TypeError("numpy object arrays are not allowed")
                if "npscalar" in node:
                    return np.frombuffer(raw, dtype=dtype)[0]
                return np.frombuffer(raw, dtype=dtype).reshape(node["shape"]).copy()
        raise TypeError(f"unknown node {str(node)[:80]}")

    try:
        return dec(tree)
    except (KeyError, TypeError, ValueError, IndexError, RecursionError) as e:
        raise StateFormatError(f"{where}: malformed state tree ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------------------------------ files
def save_state(state: Any, path: str | Path) -> Path:
    """Write `state` to `path` atomically: a temp file in the same folder, fsync, then os.replace, so a
    crash (or SIGKILL) mid-write leaves the previous file intact and nothing half-written under `path`."""
    from .io import save_safetensors

    path = Path(path)
    tensors, meta = encode_state(state)  # before touching the disk: a bad value leaves no temp file
    return atomic_file(path, lambda tmp: save_safetensors(tensors, tmp, metadata=meta))


def load_state(path: str | Path) -> Any:
    """Read a file written by `save_state` (tensors on CPU). Raises StateFormatError (one line naming the
    file) for anything else: truncated or garbage bytes, a plain safetensors file, a malformed tree."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"state file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != STATE_FORMAT:
                raise StateFormatError(
                    f"{path}: a safetensors file without clipforge state metadata (format="
                    f"{meta.get('format')!r}); expected a file written by clipforge.checkpoints.save_state"
                )
            if meta.get("version") != STATE_VERSION:
                raise StateFormatError(
                    f"{path}: state format version {meta.get('version')!r}, this clipforge reads "
                    f"{STATE_VERSION!r}; use the clipforge version that wrote it"
                )
            names = f.keys()
            tensors = {k: f.get_tensor(k) for k in names}
        tree = json.loads(meta["state"])
    except StateFormatError:
        raise
    except Exception as e:  # safetensors' own errors (truncated header, bad offsets) or bad JSON
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StateFormatError(
            f"{path}: not a readable clipforge state file ({reason}); the file is truncated or corrupt"
        ) from None
    return decode_state(tree, tensors, str(path))
