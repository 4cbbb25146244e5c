"""LiT tower policies (Zhai et al. 2022): which tower is pretrained, which is locked.

A policy is one line of config, as in big_vision (`('img/.*', None)  # freeze image tower`):

    policy = LiTPolicy.parse("Lu")               # image: pretrained + locked, text: random + trained
    policy = LiTPolicy.parse("Lu", image_unlocked_blocks=2)   # ... but train the image tower's last 2 blocks
    apply_policy(model, policy)

Letters, image tower first: `L` pretrained and locked, `U` pretrained and unlocked, `u` random init and
unlocked (the paper's Table 1 studies Lu, LU, Uu, UU, uu, ...). Loading the pretrained weights is the
builder's job (`clipforge.lit.build_lit_model`); this module only freezes.

A locked tower:
- has requires_grad=False on its parameters, so `train.optim.param_groups` leaves it out of the
  optimizer (weight decay can never move it);
- stays in eval mode when the model is put in train mode (BatchNorm statistics of a ResNet are frozen,
  dropout of a BERT tower is off);
- runs under torch.no_grad() when fully locked (no activations kept), and ignores patch masking: a
  fixed feature extractor must give the same features as its embedding cache.
With `unlocked_blocks=N` only the last N blocks and the head after them (final norm, pooling,
projection) train; the blocks below stay locked and in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..models.towers import Tower

Mode = Literal["L", "U", "u"]
MODES = ("L", "U", "u")


@dataclass(frozen=True)
class TowerPolicy:
    mode: Mode = "u"
    unlocked_blocks: int = 0  # with mode "L": train the last N blocks (and the head) anyway

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(
                f"tower policy must be one of {MODES} "
                f"(L locked, U unlocked, u from scratch), got {self.mode!r}"
            )
        if self.unlocked_blocks < 0:
            raise ValueError(f"unlocked_blocks must be >= 0, got {self.unlocked_blocks}")
        if self.unlocked_blocks and self.mode != "L":
            raise ValueError(
                f"unlocked_blocks={self.unlocked_blocks} only applies to a locked ('L') tower, "
                f"not {self.mode!r}"
            )

    @property
    def pretrained(self) -> bool:
        return self.mode in ("L", "U")

    @property
    def locked(self) -> bool:
        return self.mode == "L"


@dataclass(frozen=True)
class LiTPolicy:
    image: TowerPolicy = TowerPolicy("u")
    text: TowerPolicy = TowerPolicy("u")

    @classmethod
    def parse(cls, spec: str, image_unlocked_blocks: int = 0, text_unlocked_blocks: int = 0) -> LiTPolicy:
        """ "Lu" -> image L, text u. Any two letters of L/U/u, image first."""
        if len(spec) != 2 or any(c not in MODES for c in spec):
            raise ValueError(
                f"LiT policy {spec!r} must be two letters of L/U/u, image tower first (e.g. 'Lu', 'UU', 'uu')"
            )
        return cls(TowerPolicy(spec[0], image_unlocked_blocks), TowerPolicy(spec[1], text_unlocked_blocks))

    def __str__(self) -> str:
        return self.image.mode + self.text.mode


# ------------------------------------------------------------------------------------------ structure
def tower_blocks(tower: nn.Module) -> tuple[list[nn.Module], list[nn.Parameter]]:
    """(blocks in forward order, head parameters after the last block) of a tower, from its tower
    contract (`clipforge.models.towers.Tower`: `blocks()`, `head()`, `set_grad_checkpointing()`)."""
    if not isinstance(tower, Tower):
        raise TypeError(
            f"{type(tower).__name__} is not a tower: give it blocks(), head() and set_grad_checkpointing() "
            "(see clipforge.models.towers)"
        )
    return tower.blocks(), tower.head()


# ------------------------------------------------------------------------------------------ locking
class _Locked:
    """Mixin put in front of a tower's class by `lock_tower` (state-dict keys and isinstance unchanged)."""

    _lit_frozen: tuple[str, ...]  # names of submodules kept in eval mode ("" = the whole tower)
    _lit_full: bool

    def train(self, mode: bool = True):
        super().train(mode and not self._lit_full)  # type: ignore[misc]
        for name in self._lit_frozen:
            if name:
                self.get_submodule(name).train(False)
        return self

    def forward(self, *args, **kwargs):
        if "mask_ratio" in kwargs:
            kwargs["mask_ratio"] = 0.0
        if self._lit_full:
            with torch.no_grad():
                return super().forward(*args, **kwargs)  # type: ignore[misc]
        return super().forward(*args, **kwargs)  # type: ignore[misc]


_LOCKED_CLASSES: dict[type, type] = {}


def _locked_class(cls: type) -> type:
    if issubclass(cls, _Locked):
        return cls
    if cls not in _LOCKED_CLASSES:
        _LOCKED_CLASSES[cls] = type(f"Locked{cls.__name__}", (_Locked, cls), {"__module__": cls.__module__})
    return _LOCKED_CLASSES[cls]


def is_locked(tower: nn.Module) -> bool:
    return isinstance(tower, _Locked)


def is_fully_locked(tower: nn.Module) -> bool:
    return isinstance(tower, _Locked) and tower._lit_full


def lock_tower(tower: nn.Module, unlocked_blocks: int = 0, keep_trainable: tuple[str, ...] = ()) -> nn.Module:
    """Lock a tower in place (see the module docstring) and return it.

    unlocked_blocks: train the last N blocks and the head after them. keep_trainable: names of
    parameters that stay trainable anyway (e.g. a freshly initialised projection on a pretrained BERT).
    """
    blocks, head = tower_blocks(tower)
    if unlocked_blocks > len(blocks):
        raise ValueError(
            f"unlocked_blocks={unlocked_blocks} but {type(tower).__name__} has {len(blocks)} blocks"
        )
    for p in tower.parameters():
        p.requires_grad_(False)
    if unlocked_blocks:
        for m in blocks[len(blocks) - unlocked_blocks :]:
            m.requires_grad_(True)
        # Exactly the last N blocks and the head: the embeddings before the first block (ViT's class
        # token and position embedding, the text tower's) stay locked, so no gradient flows back through
        # the locked lower blocks to reach them.
        for p in head:
            p.requires_grad_(True)
    named = dict(tower.named_parameters())
    for name in keep_trainable:
        if name not in named:
            raise KeyError(f"keep_trainable: {type(tower).__name__} has no parameter {name!r}")
        named[name].requires_grad_(True)
    full = not any(p.requires_grad for p in tower.parameters())
    if full:
        frozen: tuple[str, ...] = ("",)
    else:
        # Keep in eval mode every maximal subtree without a trainable parameter (locked blocks, stem, BN).
        dead = {name for name, m in tower.named_modules() if not any(p.requires_grad for p in m.parameters())}
        frozen = tuple(n for n in dead if n and n.rpartition(".")[0] not in dead)
    tower.__class__ = _locked_class(type(tower))
    tower._lit_frozen, tower._lit_full = frozen, full
    tower.train(tower.training)
    return tower


def unlock_tower(tower: nn.Module) -> nn.Module:
    """Undo `lock_tower`: every parameter trainable, ordinary train/eval behaviour."""
    if isinstance(tower, _Locked):
        tower.__class__ = next(
            c for c in type(tower).__mro__[1:] if c is not _Locked and not issubclass(c, _Locked)
        )
        del tower._lit_frozen, tower._lit_full
    for p in tower.parameters():
        p.requires_grad_(True)
    return tower


def apply_policy(
    model: nn.Module, policy: LiTPolicy | str, text_keep_trainable: tuple[str, ...] = ()
) -> nn.Module:
    """Freeze `model.visual` / `model.text` as the policy says (weights must already be loaded)."""
    if isinstance(policy, str):
        policy = LiTPolicy.parse(policy)
    for tower, pol, keep in (
        (model.visual, policy.image, ()),
        (model.text, policy.text, text_keep_trainable),
    ):
        if pol.locked:
            lock_tower(tower, pol.unlocked_blocks, keep)
        else:
            unlock_tower(tower)
    return model


def trainable_summary(model: nn.Module) -> dict[str, int]:
    """Trainable / total parameter counts per top-level child (for logs and the design study)."""
    out: dict[str, int] = {}
    for name, child in model.named_children():
        out[f"{name}_trainable"] = sum(p.numel() for p in child.parameters() if p.requires_grad)
        out[f"{name}_total"] = sum(p.numel() for p in child.parameters())
    return out
