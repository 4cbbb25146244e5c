"""Key/shape checks shared by every converter: an error names each missing, unexpected and mis-shaped key."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..config import CLIPConfig
from ..models.clip import CLIP

Shapes = dict[str, tuple[int, ...]]


class StateDictMismatchError(ValueError):
    """A state dict whose keys or shapes do not match what the architecture expects."""

    def __init__(self, what: str, missing: list[str], unexpected: list[str], misshaped: list[str]) -> None:
        self.missing, self.unexpected, self.misshaped = missing, unexpected, misshaped
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected)}")
        if misshaped:
            parts.append(f"mis-shaped keys: {', '.join(misshaped)}")
        super().__init__(f"{what} does not match the architecture; " + "; ".join(parts))


def shapes_of(state_dict: Mapping[str, torch.Tensor]) -> Shapes:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def check_shapes(state_dict: Mapping[str, torch.Tensor], expected: Shapes, what: str) -> None:
    """Raise `StateDictMismatchError` unless `state_dict` has exactly the keys and shapes of `expected`."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [
        f"{k} (got {tuple(v.shape)}, expected {expected[k]})"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    if missing or unexpected or misshaped:
        raise StateDictMismatchError(what, missing, unexpected, misshaped)


def meta_state_dict(cfg: CLIPConfig) -> dict[str, torch.Tensor]:
    """clipforge's state dict for `cfg` on the meta device: every key and shape, no memory, no init cost."""
    with torch.device("meta"):
        return CLIP(cfg).state_dict()
