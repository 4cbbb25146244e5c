"""Embedding cache: equals the live tower, K views, resumable, refuses another tower; training from the
cache never runs the image tower and gives the same loss as running it live."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch.utils.data import Dataset

from clipforge.config import CLIPConfig, TextConfig, VisionConfig
from clipforge.lit import (
    CachedPairs,
    CacheMismatchError,
    EmbeddingCache,
    apply_policy,
    cache_embeddings,
)
from clipforge.models import create_model
from clipforge.train.lit_step import make_lit_step_fn

CFG = CLIPConfig(
    embed_dim=16,
    vision=VisionConfig(kind="vit", image_size=16, width=32, layers=1, heads=2, patch_size=8),
    text=TextConfig(context_length=12, vocab_size=64, width=32, heads=2, layers=1),
)
PRE = {"image_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3}


class Images(Dataset):
    """n fixed images; with `jitter`, a random offset drawn from torch's global RNG (an augmentation)."""

    def __init__(self, n: int, jitter: bool = False) -> None:
        self.x = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        self.jitter = jitter

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i] + (torch.rand(()) if self.jitter else 0.0)
        return {"image": x, "text": torch.zeros(12, dtype=torch.long)}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model(CFG)


def test_cache_equals_live_tower(model, tmp_path):
    data = Images(10)
    cache = cache_embeddings(
        model.visual, data, tmp_path, preprocess=PRE, batch_size=4, shard_size=4, progress=False
    )
    assert (len(cache), cache.views, cache.dim) == (10, 1, 16) and len(
        list(tmp_path.glob("shard_*.npy"))
    ) == 3
    with torch.no_grad():
        live = model.visual(data.x)
    got = torch.stack([cache.get(i) for i in range(10)])
    torch.testing.assert_close(got, live, atol=1e-6, rtol=1e-6)
    # float16 storage: same embeddings to half precision
    half = cache_embeddings(
        model.visual, data, tmp_path / "h", preprocess=PRE, dtype="float16", progress=False
    )
    torch.testing.assert_close(torch.stack([half.get(i) for i in range(10)]), live, atol=2e-3, rtol=2e-3)


def test_views_are_seeded_augmentations(model, tmp_path):
    data = Images(6, jitter=True)
    cache = cache_embeddings(
        model.visual, data, tmp_path, preprocess=PRE, views=3, batch_size=4, progress=False
    )
    e = torch.stack([cache[i] for i in range(6)])  # (6, 3, D)
    assert not torch.allclose(e[:, 0], e[:, 1])  # different augmentations
    again = cache_embeddings(model.visual, data, tmp_path / "again", preprocess=PRE, views=3, progress=False)
    torch.testing.assert_close(torch.stack([again[i] for i in range(6)]), e)  # same seed, same views
    plain = cache_embeddings(
        model.visual, Images(6), tmp_path / "plain", preprocess=PRE, views=2, progress=False
    )
    assert torch.equal(plain[0][0], plain[0][1])  # no augmentation: equal views


def test_resume_skips_finished_shards(model, tmp_path):
    data = Images(10)
    cache_embeddings(model.visual, data, tmp_path, preprocess=PRE, batch_size=4, shard_size=4, progress=False)
    full = [EmbeddingCache(tmp_path)[i] for i in range(10)]
    (tmp_path / "shard_00001.npy").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        EmbeddingCache(tmp_path)
    calls = []
    hook = model.visual.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    cache = cache_embeddings(
        model.visual, data, tmp_path, preprocess=PRE, batch_size=4, shard_size=4, progress=False
    )
    hook.remove()
    assert sum(calls) == 4  # only the missing shard ran
    for i in range(10):
        torch.testing.assert_close(cache[i], full[i])


def test_refuses_another_tower_or_preprocessing(model, tmp_path):
    data = Images(4)
    cache_embeddings(model.visual, data, tmp_path, preprocess=PRE, progress=False)
    other = copy.deepcopy(model.visual)
    with torch.no_grad():
        other.proj[0, 0] += 1e-3
    with pytest.raises(CacheMismatchError, match="tower weights"):
        EmbeddingCache(tmp_path, tower=other, preprocess=PRE)
    with pytest.raises(CacheMismatchError, match="preprocess"):
        EmbeddingCache(tmp_path, tower=model.visual, preprocess={**PRE, "image_size": 32})
    with pytest.raises(CacheMismatchError, match="fingerprint"):
        cache_embeddings(other, data, tmp_path, preprocess=PRE, progress=False)
    with pytest.raises(CacheMismatchError, match="views"):
        cache_embeddings(model.visual, data, tmp_path, preprocess=PRE, views=2, progress=False)
    EmbeddingCache(tmp_path, tower=model.visual, preprocess=PRE)  # the right tower is accepted
    assert json.loads((tmp_path / "index.json").read_text())["fingerprint"]["preprocess"]["image_size"] == 16


def _tokens(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    t = torch.randint(1, 60, (n, 12), generator=g)
    t[:, 0], t[:, 8], t[:, 9:] = 62, 63, 0
    return t


def test_a_refused_cache_names_the_differing_fields_briefly(model, tmp_path):
    data = Images(4)
    cache_embeddings(model.visual, data, tmp_path, preprocess=PRE, progress=False)
    other = copy.deepcopy(model.visual)
    with torch.no_grad():
        other.proj[0, 0] += 1e-3
    with pytest.raises(CacheMismatchError) as e:
        cache_embeddings(other, data, tmp_path, preprocess={**PRE, "image_size": 32}, progress=False)
    msg = str(e.value)
    # it printed both whole fingerprints (two 64-hex hashes and every preprocessing field), ~600 characters
    assert "fingerprint.weights: cache has '" in msg and "fingerprint.preprocess.image_size: cache has" in msg
    assert "mean" not in msg and len(msg.replace(str(tmp_path), "")) < 250


def test_training_from_cache_never_runs_the_tower(model, tmp_path):
    from clipforge.data.streams import BatchStream
    from clipforge.train.optim import build_optimizer
    from clipforge.train.trainer import Trainer

    data = Images(16)
    apply_policy(model, "Lu")
    cache = cache_embeddings(model.visual, data, tmp_path, preprocess=PRE, progress=False)
    tokens = _tokens(16)
    live = copy.deepcopy(model)
    step_fn = make_lit_step_fn("clip")

    # Same batch, same model: the cached step's loss and text gradients equal the live step's.
    batch_c = {"image_embedding": torch.stack([cache.get(i) for i in range(8)]), "text": tokens[:8]}
    batch_l = {"image": data.x[:8], "text": tokens[:8]}
    loss_c, loss_l = step_fn(model, batch_c), step_fn(live, batch_l)
    torch.testing.assert_close(loss_c, loss_l, atol=1e-5, rtol=1e-5)
    for (n, p), q in zip(model.text.named_parameters(), live.text.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=n)

    def boom(*a, **k):
        raise AssertionError("the locked image tower ran although its embeddings are cached")

    model.visual.forward = boom
    model.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in model.visual.state_dict().items()}
    text_before = model.text.proj.clone()
    trainer = Trainer(
        model, make_lit_step_fn("clip", accum_steps=2), build_optimizer(model, 1e-3, 0.2), None,
        BatchStream(CachedPairs(cache, tokens), 8, seed=0), steps=4, batch_size=8, progress=False,
        handle_signals=False, after_step=lambda m: m.clamp_logit_scale(),
    )  # fmt: skip
    result = trainer.fit()
    assert result.step == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    assert all(torch.equal(before[k], v) for k, v in model.visual.state_dict().items())
    assert not torch.equal(text_before, model.text.proj)
