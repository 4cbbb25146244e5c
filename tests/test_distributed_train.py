"""`clipforge train` under 2 gloo ranks (what torchrun starts): the same losses as one process with the same
global batch, rank 0 alone writes, and a 1-process --resume continues the 2-rank run."""

from __future__ import annotations

import json
import os
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch
import torch.multiprocessing as mp

from clipforge.tokenizer import train_bpe
from clipforge.train.build import open_data, run_experiment
from clipforge.train.experiment import load_experiment
from clipforge.train.runs import load_checkpoint
from helpers import free_port, set_rank_env


def _overrides(out, steps, tokenizer):
    return [
        "model.preset=tiny-vit",
        f"model.tokenizer={tokenizer}",  # one saved BPE for all runs (its training may differ per process)
        "model.context_length=16",
        "data.synthetic_train=64",
        "data.synthetic_val=32",
        "train.batch_size=16",  # global: 8 per rank with 2 ranks
        f"train.steps={steps}",
        "train.device=cpu",
        "optim.schedule=constant",  # the rate does not depend on train.steps: runs of 3 and 4 steps agree
        "optim.warmup_steps=1",
        "run.log_every=1",
        "run.checkpoint_every=1",
        "run.keep_last=5",
        "run.tensorboard=false",
        f"run.output_dir={out}",
    ]


def _worker(rank: int, world: int, port: int, out: str, tokenizer: str, extra: tuple = ()) -> None:
    set_rank_env(rank, world, port)
    res = run_experiment(load_experiment(None, [*_overrides(out, 3, tokenizer), *extra]), progress=False)
    torch.save({"losses": res.losses, "step": res.step}, os.path.join(out, f"result{rank}.pt"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_train")
    torch.set_num_threads(1)
    exp = load_experiment(None, [*_overrides(root / "single", 4, "bpe"), "model.vocab_size=600"])
    captions = open_data(exp, 32).captions()
    tok = root / "tokenizer"
    train_bpe(captions, 600, 16).save(tok)
    single = run_experiment(load_experiment(None, _overrides(root / "single", 4, tok)), progress=False)
    mp.spawn(_worker, args=(2, free_port(), str(root / "ddp"), str(tok)), nprocs=2, join=True)
    ranks = [torch.load(root / "ddp" / f"result{r}.pt") for r in range(2)]
    return root, single, ranks


def test_two_ranks_train_like_one_process_with_the_global_batch(runs):
    _root, single, ranks = runs
    for r in ranks:
        assert r["step"] == 3
        assert r["losses"] == pytest.approx(single.losses[:3], rel=1e-4)


def test_rank_zero_alone_writes(runs):
    root, _single, _ranks = runs
    lines = [json.loads(x) for x in (root / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x.get("kind") == "train"] == [1, 2, 3]  # not once per rank
    assert sorted(p.name for p in (root / "ddp" / "checkpoints").iterdir()) == [
        f"step-{s:08d}.safetensors" for s in (1, 2, 3)
    ]
    ckpt = load_checkpoint(root / "ddp" / "checkpoints" / "step-00000003.safetensors")
    assert not any(k.startswith("module.") for k in ckpt["model"])  # loadable without DDP


def test_resume_with_another_world_size(runs):
    """The 2-rank run's checkpoint continues in one process: step 4 as in the uninterrupted 1-process run."""
    root, single, _ranks = runs
    exp = load_experiment(None, _overrides(root / "ddp", 4, root / "tokenizer"))
    res = run_experiment(exp, resume=True, progress=False)
    assert res.step == 4 and len(res.losses) == 1
    assert res.losses[0] == pytest.approx(single.losses[3], rel=1e-4)


# ---------------------------------------------------------------------------------------------- FSDP2
@pytest.fixture(scope="module")
def fsdp_run(runs):
    root, single, _ranks = runs
    out = root / "fsdp"
    extra = ("train.strategy=fsdp", "train.fsdp_unit=block")
    mp.spawn(_worker, args=(2, free_port(), str(out), str(root / "tokenizer"), extra), nprocs=2, join=True)
    return root, single, [torch.load(out / f"result{r}.pt") for r in range(2)]


def test_fsdp_two_ranks_train_like_one_process(fsdp_run):
    _root, single, ranks = fsdp_run
    for r in ranks:
        assert r["step"] == 3
        assert r["losses"] == pytest.approx(single.losses[:3], rel=1e-4)


def test_fsdp_checkpoint_is_consolidated_and_resumes_in_one_process(fsdp_run):
    root, single, _ranks = fsdp_run
    ckpt = load_checkpoint(root / "fsdp" / "checkpoints" / "step-00000003.safetensors")
    plain = load_checkpoint(root / "ddp" / "checkpoints" / "step-00000003.safetensors")
    assert ckpt["model"].keys() == plain["model"].keys()  # the layout of a plain model.state_dict()
    assert all(type(v) is torch.Tensor for v in ckpt["model"].values())  # full tensors, no DTensor shards
    assert ckpt["optimizer"]["state"].keys() == plain["optimizer"]["state"].keys()
    assert (root / "fsdp" / "model" / "model.safetensors").is_file()  # exported from the gathered weights
    res = run_experiment(load_experiment(None, _overrides(root / "fsdp", 4, root / "tokenizer")), resume=True,
                         progress=False)  # fmt: skip
    assert res.step == 4 and len(res.losses) == 1
    assert res.losses[0] == pytest.approx(single.losses[3], rel=1e-4)


# ---------------------------------------------------------------------------------------------- skips
def _skip_worker(rank: int, world: int, port: int, manifest: str, out: str) -> None:
    set_rank_env(rank, world, port)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"output{rank}.txt"), "w") as f, redirect_stdout(f), redirect_stderr(f):
        _run_skip_worker(manifest, out)


def _run_skip_worker(manifest: str, out: str) -> None:
    overrides = [
        "model.preset=tiny-vit",
        "model.tokenizer=openai",
        "model.context_length=16",
        "data.kind=manifest",
        f"data.train={manifest}",
        f"data.val={manifest}",  # retrieval at the end: rank 0 alone evaluates, and reads it
        "data.shuffle=false",  # global batch 1 = rows 0-7: rank 0 loads rows 0-3, rank 1 rows 4-7
        "train.batch_size=8",
        "train.steps=1",
        "train.device=cpu",
        "run.tensorboard=false",
        f"run.output_dir={out}",
    ]
    run_experiment(load_experiment(None, overrides), progress=False)


@pytest.fixture(scope="module")
def skip_run(tmp_path_factory):
    from PIL import Image

    tmp_path = tmp_path_factory.mktemp("skips")
    torch.set_num_threads(1)
    rows = ["image,caption"]
    for i in range(16):
        Image.new("RGB", (32, 32), (i * 15, 0, 0)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,picture {i}")
    for i in (5, 6):  # rank 1's rows of the first global batch
        (tmp_path / f"{i}.png").write_bytes(b"not an image")
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    mp.spawn(_skip_worker, args=(2, free_port(), str(tmp_path / "train.csv"), str(out)), nprocs=2, join=True)
    return out


def test_skips_of_every_rank_are_reported_once(skip_run):
    """Each rank loads (and counts) only its own rows: rank 0 reported 0 skipped samples when the corrupt
    images were in rank 1's rows. The report sums the ranks, and rank 0 alone writes it."""
    out = skip_run
    data = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"data"' in x]
    assert [d["skipped"] for d in data] == [{"corrupt_image": 2}]


def test_only_the_evaluating_rank_reads_the_evaluation_set(skip_run):
    """Every rank loaded data.val (each image decoded to check it) and printed its skip summary, though
    rank 0 alone evaluates under DDP."""
    out = skip_run
    said = [(out / f"output{r}.txt").read_text().count("train.csv: skipped 2") for r in range(2)]
    assert said == [1, 0]


# ---------------------------------------------------------------------------------------------- shards
def _shard_worker(rank: int, world: int, ports: list[int], shards: str, root: str) -> None:
    def run(name: str, steps: int, port: int, resume: bool = False) -> list[float]:
        set_rank_env(rank, world, port)
        overrides = [
            "model.preset=tiny-vit",
            "model.tokenizer=openai",
            "model.context_length=16",
            "data.kind=webdataset",
            f"data.train={shards}",
            "train.batch_size=4",  # 2 per rank
            f"train.steps={steps}",
            "train.device=cpu",
            "optim.schedule=constant",
            "optim.warmup_steps=1",
            "run.log_every=1",
            "run.tensorboard=false",
            f"run.output_dir={os.path.join(root, name)}",
        ]
        return run_experiment(load_experiment(None, overrides), resume=resume, progress=False).losses

    full = run("full", 6, ports[0])
    run("parts", 3, ports[1])  # the rank with 1 shard is in its epoch 1, the other still in epoch 0
    resumed = run("parts", 6, ports[2], resume=True)
    torch.save({"full": full, "resumed": resumed}, os.path.join(root, f"shard_losses{rank}.pt"))


def test_uneven_shard_split_resumes_each_rank_where_it_was(tmp_path):
    """3 shards over 2 ranks: one rank reads 2 shards per epoch, the other 1, so their epochs run apart.
    Checkpoints held rank 0's data position alone and every rank resumed from it: rank 1 then read other
    samples than the uninterrupted run. Each rank now resumes from its own position."""
    from PIL import Image

    from clipforge.data import write_shards

    torch.set_num_threads(1)
    pairs = [(Image.new("RGB", (32, 32), (i * 20, 0, 0)), f"picture {i}") for i in range(12)]
    write_shards(pairs, tmp_path / "shards", max_count=4, progress=False)  # 3 shards of 4
    shards = str(tmp_path / "shards" / "{000000..000002}.tar")
    ports = [free_port() for _ in range(3)]
    mp.spawn(_shard_worker, args=(2, ports, shards, str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "shard_losses0.pt")
    assert len(got["resumed"]) == 3
    assert got["resumed"] == pytest.approx(got["full"][3:], rel=1e-5)
