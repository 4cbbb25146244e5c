"""2 gloo ranks x batch B == 1 process x batch 2B: gradients and the AdamW step, softmax and sigmoid loss,
with and without exact accumulation; per-rank logits bounded by (local x global); local mode; checkpoints.

One torch.multiprocessing.spawn runs every 2-rank scenario (process start-up dominates the cost); the
single-process references run here, with clipforge.loss directly (no distributed code at all).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from clipforge.config import get_config
from clipforge.loss import clip_loss, get_loss, siglip_loss
from clipforge.models import create_model
from clipforge.train.step import contrastive_step
from helpers import free_port, random_batch, set_rank_env

VOCAB = 1000

B = 4  # per rank
WORLD = 2
LR = 1e-3
SCENARIOS = [("clip", 1), ("clip", 2), ("siglip", 1), ("siglip", 2)]
FSDP_SCENARIOS = [("clip", 2), ("siglip", 1)]


def _adamw(model):
    # eps 1e-6 (OpenCLIP's ViT setting): with 1e-8, Adam's first step turns float noise on gradients that
    # are exactly zero in theory (the attention key biases) into full +-lr updates.
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, eps=1e-6)


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t.clone()


def _model(siglip: bool = False):
    cfg = get_config("tiny-vit")
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=VOCAB))
    if siglip:
        cfg = dataclasses.replace(cfg, init_logit_scale=math.log(10.0), init_logit_bias=-10.0)
    torch.manual_seed(0)
    return create_model(cfg)


def _features(n: int, d: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    return img, txt


class _MaxNumel(TorchDispatchMode):
    """Largest tensor any op produces (the logits bound)."""

    def __init__(self):
        super().__init__()
        self.max = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor):
                self.max = max(self.max, t.numel())
        return out


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    set_rank_env(rank, world, port)
    from clipforge.train.dist import cleanup, init_distributed, is_main
    from clipforge.train.fsdp import (
        load_model_state_dict,
        load_sharded,
        model_state_dict,
        save_sharded,
        shard_fsdp,
        unwrap,
        wrap_ddp,
    )
    from clipforge.train.global_loss import DistributedLoss

    info = init_distributed(device="cpu")
    assert info.backend == "gloo" and info.world_size == world and info.rank == rank
    results: dict = {"is_main": is_main()}
    images, texts = random_batch(B * world, 32, VOCAB)
    mine = slice(rank * B, (rank + 1) * B)
    for name, accum in SCENARIOS:
        model = wrap_ddp(_model(siglip=name == "siglip"))
        opt = _adamw(model)
        res = contrastive_step(model, images[mine], texts[mine], DistributedLoss(name), accum_steps=accum)
        grads = {k: p.grad.clone() for k, p in unwrap(model).named_parameters() if p.grad is not None}
        opt.step()
        results[(name, accum)] = {
            "loss": res.loss,
            "grads": grads,
            "params": {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()},
        }
    # FSDP2 (per-block units): same step; consolidated and sharded checkpoints
    for name, accum in FSDP_SCENARIOS:
        model = shard_fsdp(_model(siglip=name == "siglip"))
        opt = _adamw(model)
        res = contrastive_step(model, images[mine], texts[mine], DistributedLoss(name), accum_steps=accum)
        grads = {k: _full(p.grad) for k, p in model.named_parameters() if p.grad is not None}
        opt.step()
        results[("fsdp", name, accum)] = {
            "loss": res.loss,
            "grads": grads,
            "params": model_state_dict(model),
        }
    save_sharded(model, opt, os.path.join(out_dir, "sharded"))
    fresh = shard_fsdp(_model(siglip=True))
    fresh_opt = _adamw(fresh)
    load_sharded(fresh, fresh_opt, os.path.join(out_dir, "sharded"))
    results["sharded_reload"] = model_state_dict(fresh)
    results["sharded_dir"] = os.path.join(out_dir, "sharded")
    fresh = shard_fsdp(_model(siglip=True))
    load_model_state_dict(
        fresh, results[("fsdp", "siglip", 1)]["params"] if rank == 0 else {}, broadcast=True
    )
    results["consolidated_reload"] = model_state_dict(fresh)
    # features only: local mode, uneven batches, the logits bound
    sizes = [8 + (r == 0) for r in range(world)]  # rank 0 holds one more row
    img, txt = _features(sum(sizes))  # D = 4 < batch: the logits are the largest tensors
    lo = sum(sizes[:rank])
    for name in ("clip", "siglip"):
        for mode in ("global", "local"):
            i = img[lo : lo + sizes[rank]].clone().requires_grad_()
            t = txt[lo : lo + sizes[rank]].clone().requires_grad_()
            scale = torch.tensor(7.0, requires_grad=True)
            bias = torch.tensor(-3.0, requires_grad=True)
            counter = _MaxNumel()
            with counter:
                loss = DistributedLoss(name, mode)(i, t, scale, bias)
                loss.backward()
            results[(name, mode, "features")] = {
                "loss": float(loss.detach()),
                "grad_img": i.grad,
                "grad_txt": t.grad,
                "grad_scale": float(scale.grad),
                "grad_bias": float(bias.grad) if bias.grad is not None else None,
                "max_numel": counter.max,
                "d": i.shape[1],
                "n": sizes[rank],
                "m": sum(sizes),
            }
    # consolidated checkpoint round trip through the DDP wrapper
    model = wrap_ddp(_model())
    sd = model_state_dict(model)
    results["state_keys"] = sorted(sd)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    cleanup()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(WORLD, free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@functools.cache
def _reference_step(name: str):
    """One process, batch 2B, the plain loss, one backward, one AdamW step."""
    model = _model(siglip=name == "siglip")
    opt = _adamw(model)
    images, texts = random_batch(B * WORLD, 32, VOCAB)
    out = model(images, texts)
    if name == "clip":
        loss = clip_loss(out.image_features, out.text_features, out.logit_scale)
    else:
        loss = siglip_loss(out.image_features, out.text_features, out.logit_scale, out.logit_bias)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    opt.step()
    return float(loss.detach()), grads, model.state_dict()


@pytest.mark.parametrize(
    "key", [(n, a) for n, a in SCENARIOS] + [("fsdp", n, a) for n, a in FSDP_SCENARIOS], ids=str
)
def test_two_ranks_equal_one_process_with_twice_the_batch(ranks, key):
    name = key[-2]
    ref_loss, ref_grads, ref_params = _reference_step(name)
    for r in ranks[: 1 if key[0] == "fsdp" else None]:  # FSDP: the consolidated state is on rank 0
        got = r[key]
        assert got["loss"] == pytest.approx(ref_loss, rel=1e-5)  # every rank reports the global loss
        assert set(got["grads"]) == set(ref_grads)
        for k, g in ref_grads.items():
            scale = g.abs().max().clamp_min(1e-12)
            assert (got["grads"][k] - g).abs().max() / scale < 1e-4, k
        for k, p in ref_params.items():
            # Adam's first step is ~lr * sign(g): where the true gradient is 0 (attention key biases), float
            # noise decides the sign, so compare the elements whose gradient is above noise (all others
            # were compared as gradients just above).
            g = ref_grads.get(k)
            if g is None:
                keep = torch.ones_like(p, dtype=torch.bool)
            else:  # noise: gradient not reproduced to 3 digits; it must be ~0 (checked) and is then skipped
                noise = (got["grads"][k] - g).abs() > 1e-3 * g.abs()
                assert (g[noise].abs() < 1e-3 * g.abs().max()).all(), k
                assert noise.float().mean() <= 0.34, k  # qkv.bias: the key third
                keep = ~noise
            torch.testing.assert_close(got["params"][k][keep], p[keep], rtol=1e-5, atol=1e-6, msg=k)


def _reference_features(name: str, mode: str, sizes: list[int]):
    img, txt = _features(sum(sizes))
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    scale = torch.tensor(7.0, requires_grad=True)
    bias = torch.tensor(-3.0, requires_grad=True)
    fn = get_loss(name)
    if mode == "global":
        loss = fn(img, txt, scale, bias)
    else:  # each rank's batch alone, weighted by its share of the global batch
        parts = zip(img.split(sizes), txt.split(sizes))
        loss = sum(fn(i, t, scale, bias) * len(i) for i, t in parts) / sum(sizes)
    loss.backward()
    return float(loss.detach()), img.grad, txt.grad, float(scale.grad), bias.grad


@pytest.mark.parametrize("name", ["clip", "siglip"])
@pytest.mark.parametrize("mode", ["global", "local"])
def test_uneven_batches_global_and_local_mode_features(ranks, name, mode):
    """Ranks with 9 and 8 rows: loss value on every rank, the summed feature gradients (what the
    all_gather backward delivers to each owner), and the DDP-averaged scale/bias gradients."""
    sizes = [r[(name, mode, "features")]["n"] for r in ranks]
    loss, g_img, g_txt, g_scale, g_bias = _reference_features(name, mode, sizes)
    got = [r[(name, mode, "features")] for r in ranks]
    for r in got:
        assert r["loss"] == pytest.approx(loss, rel=1e-5)
    torch.testing.assert_close(torch.cat([r["grad_img"] for r in got]) / WORLD, g_img, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.cat([r["grad_txt"] for r in got]) / WORLD, g_txt, rtol=1e-5, atol=1e-7)
    assert sum(r["grad_scale"] for r in got) / WORLD == pytest.approx(g_scale, rel=1e-5)
    if name == "siglip":
        assert sum(r["grad_bias"] for r in got) / WORLD == pytest.approx(float(g_bias), rel=1e-5)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_logits_per_rank_at_most_local_times_global(ranks, name):
    for r in ranks:
        got = r[(name, "global", "features")]
        assert got["m"] * got["d"] < got["n"] * got["m"] < got["m"] ** 2  # the test can tell them apart
        assert got["max_numel"] == got["n"] * got["m"]  # the (local x global) logits, never global x global


def test_rank_helpers_and_unprefixed_state_dict(ranks):
    assert [r["is_main"] for r in ranks] == [True, False]
    ref = sorted(_model().state_dict())
    assert ranks[0]["state_keys"] == ref  # no "module." prefix from DDP
    assert ranks[1]["state_keys"] == []  # consolidated on rank 0 only (it writes checkpoints)


def test_single_process_is_the_plain_loss(monkeypatch):
    from clipforge.train.dist import init_distributed
    from clipforge.train.fsdp import unwrap, wrap_ddp
    from clipforge.train.global_loss import DistributedLoss

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    info = init_distributed(device="cpu")
    assert (info.rank, info.world_size, info.backend, info.is_main) == (0, 1, None, True)
    img, txt = _features(6)
    scale, bias = torch.tensor(5.0), torch.tensor(-2.0)
    for name in ("clip", "siglip"):
        assert float(DistributedLoss(name)(img, txt, scale, bias)) == pytest.approx(
            float(get_loss(name)(img, txt, scale, bias))
        )
    model = _model()
    assert wrap_ddp(model) is model and unwrap(model) is model
    with pytest.raises(ValueError, match="mode"):
        DistributedLoss("clip", "sideways")


def test_gather_bytes_per_step_follows_what_each_loss_gathers():
    from clipforge.train.global_loss import gather_bytes_per_step

    # global 8 over 2 ranks, D = 4: each rank receives 4 rows x 4 floats x 4 bytes per gathered tensor
    clip = {"received_bytes": 2 * 64, "backward_bytes": 2 * 64, "logits_per_rank": 2 * 4 * 8}
    siglip = {"received_bytes": 64, "backward_bytes": 64, "logits_per_rank": 4 * 8}  # texts only
    assert gather_bytes_per_step(8, 4, 2, "clip") == clip
    assert gather_bytes_per_step(8, 4, 2, "siglip") == siglip


def test_missing_master_addr_is_a_clear_error(monkeypatch):
    from clipforge.train.dist import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        init_distributed(device="cpu")


# ------------------------------------------------------------------------------------------ data split
def _shards(tmp_path, n=20, per_shard=3):
    from PIL import Image

    from clipforge.data import write_shards

    pairs = [(Image.new("RGB", (8, 8), (i, 0, 0)), f"sample {i}") for i in range(n)]
    report = write_shards(pairs, tmp_path / "shards", max_count=per_shard, progress=False)
    return sorted(str(tmp_path / "shards" / s) for s in report.shards), [c for _, c in pairs]


def _read_as(monkeypatch, urls, rank, world, split="epoch", epoch=0, workers=2):
    from torch.utils.data import DataLoader

    from clipforge.data.shard_split import DistributedWebDataset

    monkeypatch.setenv("RANK", str(rank))  # what torchrun sets; read by webdataset's pytorch_worker_info
    monkeypatch.setenv("WORLD_SIZE", str(world))
    ds = DistributedWebDataset(urls, split=split, shuffle_buffer=0, seed=3)
    ds.set_epoch(epoch)
    ctx = "fork" if workers else None
    loader = DataLoader(ds, batch_size=None, num_workers=workers, multiprocessing_context=ctx)
    return [item["text"] for item in loader]


def test_shards_split_over_ranks_and_workers_exactly_once(tmp_path, monkeypatch):
    urls, captions = _shards(tmp_path)
    assert len(urls) == 7
    for epoch in (0, 1):
        got = [_read_as(monkeypatch, urls, r, 2, epoch=epoch) for r in (0, 1)]
        assert sorted(got[0] + got[1]) == sorted(captions)  # all samples, each exactly once
        assert not set(got[0]) & set(got[1])


def test_rank_without_shard_is_a_clear_error_or_resampled(tmp_path, monkeypatch):
    from clipforge.data.shard_split import epoch_plan

    urls, captions = _shards(tmp_path, n=5, per_shard=5)  # one shard, two ranks
    with pytest.raises(ValueError, match=r"1 WebDataset shard.*2 ranks.*resampled"):
        _read_as(monkeypatch, urls, 1, 2, workers=0)
    for r in (0, 1):  # resampled: both ranks read (with replacement) a full shard per epoch
        assert sorted(_read_as(monkeypatch, urls, r, 2, split="resampled", workers=0)) == sorted(captions)
    plan = epoch_plan(urls, world_size=2, global_batch=4)
    assert plan["total"] == 5 and plan["per_rank"] == [5, 0] and plan["steps_per_epoch"] == 0


def test_epoch_plan_from_sizes_json(tmp_path):
    from clipforge.data.shard_split import epoch_plan, rank_shards

    urls, _ = _shards(tmp_path)  # 6 shards of 3, one of 2
    plan = epoch_plan(urls, world_size=2, global_batch=4, epoch=0, seed=3)
    counts = {u: (2 if u.endswith("000006.tar") else 3) for u in urls}
    expect = [sum(counts[u] for u in rank_shards(urls, r, 2, 0, 3)) for r in (0, 1)]
    assert plan["total"] == 20 and plan["per_rank"] == expect and sum(expect) == 20
    assert plan["steps_per_epoch"] == min(expect) // 2


def test_fsdp_checkpoints_round_trip(ranks, tmp_path_factory):
    """Sharded (torch.distributed.checkpoint) and consolidated (rank 0's dict broadcast) reloads give the
    trained parameters back; the sharded directory also loads into one plain process (another world size)."""
    import torch.distributed.checkpoint as dcp

    trained = ranks[0][("fsdp", "siglip", 1)]["params"]
    for key in ("sharded_reload", "consolidated_reload"):
        got = ranks[0][key]
        assert set(got) == set(trained)
        for k, v in trained.items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=f"{key}: {k}")
    model = _model(siglip=True)
    state = {"model": model.state_dict()}
    with pytest.warns(UserWarning, match="single process"):
        dcp.load(state, checkpoint_id=str(ranks[0]["sharded_dir"]))
    for k, v in trained.items():
        torch.testing.assert_close(state["model"][k], v, rtol=0, atol=0, msg=k)


def test_cleanup_goes_on_when_the_teardown_hangs(monkeypatch, capsys):
    """Gloo's destroy_process_group hangs once in a while after a finished run (pytorch#75097): cleanup
    waits `timeout_s`, says so, and returns; leave_process does nothing outside torchrun."""
    import threading
    import time

    import torch.distributed as dist

    from clipforge.train import dist as cf_dist

    release = threading.Event()
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: release.wait(30))
    t0 = time.perf_counter()
    cf_dist.cleanup(timeout_s=0.3)
    assert 0.3 <= time.perf_counter() - t0 < 5
    assert "leaving the process group took over 0 s; going on" in capsys.readouterr().out
    release.set()
    for k in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    cf_dist.leave_process(0)  # not under torchrun: returns
