"""DDP and FSDP2 wrapping, and the state dicts of wrapped models (consolidated and sharded checkpoints).

DDP keeps a full model copy per rank; FSDP2 (`shard_fsdp`) shards parameters, gradients and optimizer
state. Checkpoints are consolidated on rank 0 in a plain model's layout, so they resume with any strategy
and world size. In a single process nothing is wrapped.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .dist import DistInfo, is_distributed


# ------------------------------------------------------------------------------------------ wrapping
def wrap_ddp(model: nn.Module, info: DistInfo | None = None, **kwargs: Any) -> nn.Module:
    """DistributedDataParallel around a model already on its device (unchanged in a single process).
    With exact gradient accumulation, contrastive_step runs several backward passes per step; DDP reduces
    the accumulated gradients on each of them, which is correct (the last reduction averages the sum)."""
    if not is_distributed():
        return model
    device = next(model.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, **kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The CLIP module inside a DDP wrapper (FSDP2 modules are the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def shard_fsdp(
    model: nn.Module,
    unit: str = "block",
    towers: Iterable[str] = ("visual", "text"),
    reshard_after_forward: bool = True,
    mp_dtype: torch.dtype | None = None,
) -> nn.Module:
    """FSDP2: shard parameters (and gradients and optimizer state) over the ranks with `fully_shard`.

    unit "block": every transformer block (ResNet stage) of each tower is its own unit, then each tower,
    then the root (logit scale/bias); only one block's full weights live at a time. unit "tower": each
    tower is one unit. Choose FSDP2 over DDP when the model + optimizer state (16 bytes per parameter with
    AdamW in fp32) does not fit on one device with room for activations, e.g. ViT-L/14 and larger towers
    on 24-40 GB GPUs; DDP is simpler and faster when it fits. mp_dtype (e.g. torch.bfloat16) sets FSDP2's
    mixed-precision parameter dtype; gradients are reduced in fp32. Build the optimizer after sharding.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if unit not in ("block", "tower"):
        raise ValueError(f"FSDP unit must be 'block' or 'tower', got {unit!r}")
    mp = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32) if mp_dtype else None
    kw: dict[str, Any] = {"reshard_after_forward": reshard_after_forward}
    if mp is not None:
        kw["mp_policy"] = mp
    for name in towers:
        tower = getattr(model, name, None)
        if tower is None:
            raise ValueError(f"model has no tower {name!r} to shard")
        if not any(p.requires_grad for p in tower.parameters()):
            continue  # a locked tower (LiT) is not trained: keep it whole and unsharded
        if unit == "block":
            for block in tower.blocks():  # the tower contract (models/towers.py)
                fully_shard(block, **kw)
        fully_shard(tower, **kw)
    # fully_shard rejects 0-d parameters (the temperature and SigLIP bias): they stay replicated, and a
    # hook averages their gradients over the ranks after each accumulation, as DDP would.
    scalars = {p for p in model.parameters(recurse=False) if p.dim() == 0}
    for p in scalars:
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(_average_grad)
    fully_shard(model, ignored_params=scalars or None, **kw)
    return model


def _average_grad(param: torch.Tensor) -> None:
    if is_distributed() and param.grad is not None:
        dist.all_reduce(param.grad)
        param.grad /= dist.get_world_size()


# ------------------------------------------------------------------------------------------ checkpoints
def model_state_dict(model: nn.Module, full: bool = True) -> dict[str, Any]:
    """The model's state dict without wrapper prefixes. full=True: consolidated plain tensors on the CPU
    (all ranks must call it; rank 0 receives the whole model, the others an empty dict; this is what
    clipforge checkpoints store).
    full=False: this rank's shards (DTensors) for torch.distributed.checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=full, cpu_offload=full)
    return get_model_state_dict(model, options=opts)


def load_model_state_dict(
    model: nn.Module, state: dict[str, Any], strict: bool = True, broadcast: bool = False
) -> None:
    """Load a consolidated state dict (saved at any world size) into a plain, DDP or FSDP2 model; each
    rank keeps its shards. Every rank passes the full dict, or with broadcast=True only rank 0 does (the
    others pass {}) and it is broadcast from there (one copy in host memory instead of one per rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    opts = StateDictOptions(
        full_state_dict=True, strict=strict, broadcast_from_rank0=broadcast and is_distributed()
    )
    set_model_state_dict(model, dict(state), options=opts)  # a copy: torch replaces its values in place


def training_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, full: bool = True) -> dict:
    """{"model", "optimizer"} with parameter names as keys (independent of the world size when full)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=full, cpu_offload=full)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
    return {"model": model_sd, "optimizer": optim_sd}


def load_training_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of training_state_dict(full=True); every rank passes the same consolidated dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    opts = StateDictOptions(full_state_dict=True)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=opts
    )


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Each rank writes its shards (torch.distributed.checkpoint): no rank ever holds the whole model.
    A directory readable by load_sharded at any world size."""
    import torch.distributed.checkpoint as dcp

    dcp.save(training_state_dict(model, optimizer, full=False), checkpoint_id=str(path))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = training_state_dict(model, optimizer, full=False)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


# ------------------------------------------------------------------------------------------ FSDP2 in training
def is_fsdp(model: nn.Module) -> bool:
    """True for a model sharded with shard_fsdp (an FSDP2 module)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The optimizer's parameters in its own order (the integer keys of optimizer.state_dict())."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]


def full_training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state) of an FSDP2 model, consolidated on rank 0 in the layout of a plain
    model's model.state_dict() / optimizer.state_dict() (integer parameter keys), so the checkpoint resumes
    with DDP, one process or FSDP2 at any world size. Every rank must call it (it gathers); the other
    ranks get empty dicts."""
    state = training_state_dict(model, optimizer, full=True)
    optim = state["optimizer"]
    if not optim:
        return state["model"], {}
    index = {n: i for i, n in enumerate(_param_names(model, optimizer))}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in optim["param_groups"]]
    return state["model"], {"state": {index[n]: s for n, s in optim["state"].items()}, "param_groups": groups}


def load_full_training_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict
) -> None:
    """Inverse of full_training_state: every rank passes the same consolidated dicts (a checkpoint written
    by any strategy and world size); each keeps its shards."""
    names = _param_names(model, optimizer)
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in optim_state["param_groups"]]
    optim = {"state": {names[int(i)]: s for i, s in optim_state["state"].items()}, "param_groups": groups}
    load_training_state_dict(model, optimizer, {"model": model_state, "optimizer": optim})


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters live on the meta device (no memory; buffers are copied): take it
    before sharding, then `copy.load_state_dict(model_state_dict(sharded), assign=True)` on rank 0 gives a
    plain model to export."""
    import copy

    memo = {id(p): nn.Parameter(p.detach().to("meta"), p.requires_grad) for p in model.parameters()}
    return copy.deepcopy(model, memo)
