"""Read the tensors of a TorchScript archive (OpenAI's published CLIP files) without running its code.

A TorchScript archive is a zip: `<name>/data.pkl` pickles the module tree (objects of classes
`__torch__.*`, each a dict of attributes: submodules, parameters, buffers, flags) and each tensor's
bytes live in `<name>/data/<key>`. A restricted unpickler rebuilds only plain containers and tensors;
any other global is refused, so nothing from the archive is executed. A module whose state is not a
plain attribute dict (a scripted `__setstate__`, which torch.jit.load would run) is refused too: its
tensors could only be found by running that code. The archive's code listing
declares each class's `__parameters__` and `__buffers__`; only those tensors are kept, so the result
has the keys of the state_dict() that torch.jit.load would give.
"""

from __future__ import annotations

import pickle
import re
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

_STORAGE_DTYPES = {
    "HalfStorage": torch.float16,
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


# TorchScript tags typed lists and dicts (a scripted module's List[int] attribute) with these functions;
# each returns its argument, so our own identity functions stand in for torch's.
_PLAIN_LIST_BUILDERS = {
    "build_intlist": lambda data: data,
    "build_doublelist": lambda data: data,
    "build_boollist": lambda data: data,
    "build_tensorlist": lambda data: data,
    "restore_type_tag": lambda value, type_str: value,
}


def is_torchscript_archive(path: str | Path) -> bool:
    """A zip holding `<name>/data.pkl` and `<name>/constants.pkl` (plain torch.save zips lack the latter)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any(n.endswith("/data.pkl") for n in names)


class _ScriptObject:
    """Stand-in for a `__torch__.*` module: keeps its attribute dict, runs nothing."""

    qualified_name = ""
    custom_state = False  # True: the state was meant for a scripted __setstate__, not an attribute dict

    def __init__(self) -> None:  # pickle's NEWOBJ skips __init__: readers use getattr defaults
        self.attrs: dict = {}

    def __setstate__(self, state: object) -> None:
        self.attrs = state if isinstance(state, dict) else {}
        self.custom_state = not isinstance(state, dict)


class _Refused:
    """Stand-in for a global this reader does not rebuild: accepts anything, runs nothing; the names
    are reported together once the pickle is read."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass


class _StorageType:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _rebuild_tensor(
    storage: torch.Tensor, offset: int, size, stride, requires_grad=False, hooks=None, metadata=None
):
    return storage.as_strided(tuple(size), tuple(stride), offset)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, zf: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(file)
        self.zf, self.prefix = zf, prefix
        self.storages: dict[str, torch.Tensor] = {}
        self.refused: list[str] = []

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__"):
            return type(name, (_ScriptObject,), {"qualified_name": f"{module}.{name}"})
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch.jit._pickle" and name in _PLAIN_LIST_BUILDERS:
            return _PLAIN_LIST_BUILDERS[name]
        if f"{module}.{name}" not in self.refused:
            self.refused.append(f"{module}.{name}")
        return _Refused

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        if key not in self.storages:
            data = bytearray(self.zf.read(f"{self.prefix}/data/{key}"))
            dtype = storage_type.dtype
            t = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
            self.storages[key] = t[:numel]
        return self.storages[key]


def read_torchscript_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensor attributes of the archive's module tree, keyed by dotted path (as `module.state_dict()`),
    in the archive's dtypes. Raises `pickle.UnpicklingError` for archives this reader cannot handle."""
    if sys.byteorder != "little":
        raise pickle.UnpicklingError("reading TorchScript archives needs a little-endian machine")
    with zipfile.ZipFile(path) as zf:
        data_pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(data_pkl) != 1:
            raise pickle.UnpicklingError(f"expected one '<name>/data.pkl' in the archive, found {data_pkl}")
        prefix = data_pkl[0].rsplit("/", 1)[0]
        with zf.open(data_pkl[0]) as f:
            unpickler = _Unpickler(f, zf, prefix)
            try:
                root = unpickler.load()
            except Exception:
                if not unpickler.refused:
                    raise
                root = None  # the refused globals (below) are the reason it failed
        state_names = _declared_state(zf, prefix)
    if unpickler.refused:
        raise pickle.UnpicklingError(
            f"data.pkl references {', '.join(unpickler.refused[:8])}"
            + (f" and {len(unpickler.refused) - 8} more" if len(unpickler.refused) > 8 else "")
            + ", which only torch.jit.load / pickle would rebuild (by running code)"
        )
    if not isinstance(root, _ScriptObject):
        raise pickle.UnpicklingError(f"data.pkl holds a {type(root).__name__}, not a TorchScript module")
    custom = sorted(_custom_state_classes(root))
    if custom:
        raise pickle.UnpicklingError(
            f"module class(es) {', '.join(custom)} keep their state through a scripted __setstate__, "
            "code that torch.jit.load would run"
        )
    out: dict[str, torch.Tensor] = {}
    _collect(root, "", out, state_names)
    return out


_CLASS_RE = re.compile(
    r"^class (\w+)\(Module\):\n  __parameters__ = \[(.*?)\]\n  __buffers__ = \[(.*?)\]", re.MULTILINE
)


def _declared_state(zf: zipfile.ZipFile, prefix: str) -> dict[str, set[str]]:
    """{qualified class name: names of its parameters and buffers} from the archive's code listing."""
    out = {}
    for name in zf.namelist():
        if not (name.startswith(f"{prefix}/code/") and name.endswith(".py")):
            continue
        module = name[len(prefix) + len("/code/") : -len(".py")].replace("/", ".")
        for cls, params, buffers in _CLASS_RE.findall(zf.read(name).decode("utf-8", "replace")):
            out[f"{module}.{cls}"] = set(re.findall(r'"([^"]+)"', params + buffers))
    return out


def _custom_state_classes(obj: _ScriptObject, seen: set[int] | None = None) -> set[str]:
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return set()
    seen.add(id(obj))
    found = {obj.qualified_name} if obj.custom_state else set()
    for value in getattr(obj, "attrs", {}).values():
        if isinstance(value, _ScriptObject):
            found |= _custom_state_classes(value, seen)
    return found


def _collect(
    obj: _ScriptObject, prefix: str, out: dict[str, torch.Tensor], state: dict[str, set[str]]
) -> None:
    declared = state.get(obj.qualified_name)  # None: class not in the listing, keep every tensor
    for name, value in getattr(obj, "attrs", {}).items():
        if isinstance(value, torch.Tensor):
            if declared is None or name in declared:
                out[prefix + name] = value.clone()  # own the memory: storages are views of the zip bytes
        elif isinstance(value, _ScriptObject):
            _collect(value, f"{prefix}{name}.", out, state)
