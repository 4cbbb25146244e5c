"""Multi-process training with torch.distributed: init from torchrun, the global contrastive loss, DDP/FSDP2.

Launch with `torchrun --nproc_per_node=N -m clipforge train ...`; torchrun sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT, and `init_distributed()` reads them (NCCL on GPUs, gloo on CPU).
Without those variables everything here degrades to a single process: world 1, rank 0, no wrapping.

The global loss (CLIP, Radford et al. 2021: "the similarity matrix is computed over all GPUs"; LiT,
Zhai et al. 2022, Table 5: a global loss beats a per-device one). Every rank r holds n_r pairs of a
global batch of M = sum n_r. It all-gathers the features *with gradients*
(torch.distributed.nn.functional.all_gather, whose backward sums the gradients of every rank into the
owner's rows) and computes its n_r local rows against all M columns, labels offset by the rows of the
ranks before it: n_r x M logits per rank, never M x M. With L_r the mean over rank r's rows,
the global-batch loss is L = sum_r (n_r / M) L_r. DDP averages gradients over W ranks, so each rank
back-propagates w_r L_r with w_r = W n_r / M (1 when the ranks hold equal batches): the averaged gradient
is then exactly the single-process gradient of L. The returned value is L itself on every rank (an
all-reduced number with w_r L_r's gradient), so logs and non-finite checks agree across ranks.

SigLIP (Zhai et al. 2023) covers every (image, text) pair of the global batch once: local images against
all texts, so only text features are gathered; normalised by the global batch, as the 1-process loss.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from ..loss import LossFn, clip_loss, clip_loss_local_vs_global, siglip_loss

MODES = ("global", "local")


# ------------------------------------------------------------------------------------------ process group
@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: a single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def init_distributed(
    device: str | torch.device = "auto", backend: str | None = None, timeout_s: float = 1800.0
) -> DistInfo:
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    device "auto" picks cuda:LOCAL_RANK when GPUs exist, else the CPU; backend defaults to nccl for
    CUDA and gloo for the CPU. Without WORLD_SIZE > 1 nothing is initialised (a single process). Calling
    it again in an initialised process returns the current state.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        if device.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {local_rank} needs GPU {device.index} but this node has "
                f"{torch.cuda.device_count()}: use --nproc_per_node <= the GPU count"
            )
        torch.cuda.set_device(device)
    if world <= 1:
        return DistInfo(0, 1, 0, device, None)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} outside WORLD_SIZE={world}")
    if not dist.is_initialized():
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if missing:
            raise RuntimeError(
                f"WORLD_SIZE={world} but {', '.join(missing)} unset: launch with torchrun (it sets them)"
            )
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
        if device.type == "cuda":
            kwargs["device_id"] = device  # binds NCCL to this GPU (no hangs on the wrong device)
        dist.init_process_group(**kwargs)
    return DistInfo(rank, world, local_rank, device, dist.get_backend())


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """The process group's rank, else torchrun's RANK (before init, after cleanup), else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def get_world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def is_main() -> bool:
    """Rank 0 (or a single process): the one that writes logs, plots and checkpoints."""
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor | float) -> torch.Tensor:
    """The mean over ranks of a number or tensor (detached; for logs and agreement checks)."""
    t = torch.as_tensor(value, dtype=torch.float64).detach().clone()
    if not is_distributed():
        return t
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return (t / dist.get_world_size()).cpu()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on any (e.g. a SIGTERM that reached one rank: all stop together)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


# ------------------------------------------------------------------------------------------ gathering
def gather_sizes(n: int, device: torch.device) -> list[int]:
    """Rows held by every rank (one tiny all_gather)."""
    if not is_distributed():
        return [n]
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.long, device=device))
    return [int(s) for s in sizes]


def gather_with_grad(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """(n_r, D) on each rank -> (sum n_r, D) in rank order, differentiable: the backward sums every rank's
    gradient of its copy into the owner's rows (torch.distributed.nn.functional.all_gather). Ranks may hold
    different row counts (`sizes`, from gather_sizes): rows are padded to the largest for the collective."""
    if not is_distributed():
        return x
    sizes = sizes if sizes is not None else gather_sizes(x.shape[0], x.device)
    top = max(sizes)
    padded = x if x.shape[0] == top else torch.cat([x, x.new_zeros(top - x.shape[0], *x.shape[1:])])
    # torch 2.13 deprecates this for a private replacement; it is the public, autograd-aware all_gather
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        parts = dist_fn.all_gather(padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


# ------------------------------------------------------------------------------------------ the loss
def _rebase(loss: torch.Tensor, weight: float) -> torch.Tensor:
    """weight * loss as the gradient, the mean over ranks of weight * loss as the value."""
    scaled = loss * weight
    if not is_distributed():
        return scaled
    total = scaled.detach().clone()
    dist.all_reduce(total)
    return scaled + (total / dist.get_world_size() - scaled).detach()


class DistributedLoss:
    """`loss_fn(image_features, text_features, logit_scale, logit_bias)` of a rank's local batch.

    name "clip" (softmax, ConVIRT weight `lam`) or "siglip"; mode "global" (every rank against the
    gathered global batch) or "local" (each rank's batch alone, LiT's comparison). In both modes the DDP-
    averaged gradient is the gradient of the returned value, which is the same on every rank: the global
    batch's loss ("global"), or the batch-weighted mean of the per-rank losses ("local"). A single
    process gives exactly clipforge.loss.get_loss(name). Pass it to contrastive_step / make_step_fn.
    """

    def __init__(self, name: str = "clip", mode: str = "global", lam: float = 0.5) -> None:
        if name not in ("clip", "siglip"):
            raise ValueError(f"unknown loss {name!r}; choose 'clip' or 'siglip'")
        if mode not in MODES:
            raise ValueError(f"unknown loss mode {mode!r}; choose one of {MODES}")
        self.name, self.mode, self.lam = name, mode, lam

    def __repr__(self) -> str:
        return f"DistributedLoss({self.name!r}, mode={self.mode!r}, lam={self.lam})"

    def _local(self, img, txt, scale, bias, labels=None) -> torch.Tensor:
        if self.name == "clip":
            return clip_loss(img, txt, scale, lam=self.lam, labels=labels)
        if bias is None:
            raise ValueError("siglip loss needs a model with a logit_bias (config init_logit_bias, e.g. -10)")
        return siglip_loss(img, txt, scale, bias, labels=labels)

    def __call__(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not is_distributed():
            return self._local(image_features, text_features, logit_scale, logit_bias)
        n, rank, world = image_features.shape[0], dist.get_rank(), dist.get_world_size()
        sizes = gather_sizes(n, image_features.device)
        total = sum(sizes)
        weight = world * n / total  # DDP divides by world; rank r's share of the global mean is n / total
        if self.mode == "local":
            return _rebase(self._local(image_features, text_features, logit_scale, logit_bias), weight)
        offset = sum(sizes[:rank])
        all_txt = gather_with_grad(text_features, sizes)  # (M, D)
        if self.name == "siglip":  # local images x all texts covers each pair of the global batch once
            labels = torch.arange(offset, offset + n, device=image_features.device)
            loss = self._local(image_features, all_txt, logit_scale, logit_bias, labels=labels)
        else:
            all_img = gather_with_grad(image_features, sizes)  # (M, D)
            loss = clip_loss_local_vs_global(
                image_features, text_features, all_img, all_txt, logit_scale, offset, lam=self.lam
            )
        return _rebase(loss, weight)


def make_loss(name: str = "clip", mode: str = "global", lam: float = 0.5) -> LossFn:
    return DistributedLoss(name, mode, lam)


def gather_bytes_per_step(
    global_batch: int, embed_dim: int, world: int, name: str = "clip"
) -> dict[str, int]:
    """All-gather traffic of one step of the global loss, fp32: bytes each rank receives (forward; the
    backward's reduce-scatter moves the same amount again) and the per-rank logits it materialises."""
    local = global_batch // world
    tensors = 2 if name == "clip" else 1
    received = tensors * (global_batch - local) * embed_dim * 4
    logits = (2 if name == "clip" else 1) * local * global_batch
    return {"received_bytes": received, "backward_bytes": received, "logits_per_rank": logits}


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


def _blocks(module: nn.Module) -> list[nn.Module]:
    transformer = getattr(module, "transformer", None)
    if transformer is not None and hasattr(transformer, "blocks"):
        return list(transformer.blocks)
    return [m for name in ("layer1", "layer2", "layer3", "layer4") if (m := getattr(module, name, None))]


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
            for block in _blocks(tower):
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
