import pytest
import torch
import torch.nn.functional as F

from clipforge.eval import RetrievalEvaluator, flatten_captions, retrieval_metrics
from eval_helpers import WordTokenizer, tiny_model


def brute_force(img, txt, t2i, ks):
    """Full similarity matrix and python loops: the obviously-correct reference."""
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    sims = (img @ txt.T).tolist()  # (N, M)
    n, m = len(img), len(txt)
    out = {}
    for k in ks:
        hits = 0
        for i in range(n):
            top = sorted(range(m), key=lambda j: -sims[i][j])[:k]
            hits += any(int(t2i[j]) == i for j in top)
        out[f"text_retrieval_recall@{k}"] = hits / n
        hits = 0
        for j in range(m):
            top = sorted(range(n), key=lambda i: -sims[i][j])[:k]
            hits += int(t2i[j]) in top
        out[f"image_retrieval_recall@{k}"] = hits / m
    return out


@pytest.mark.parametrize("chunk_size", [3, 7, 1000])
def test_recall_matches_brute_force(chunk_size):
    g = torch.Generator().manual_seed(chunk_size)
    n, d = 23, 8
    counts = torch.randint(1, 5, (n,), generator=g)  # 1..4 captions per image
    t2i = torch.repeat_interleave(torch.arange(n), counts)
    t2i = t2i[torch.randperm(len(t2i), generator=g)]  # captions in arbitrary order
    img = torch.randn(n, d, generator=g)
    txt = img[t2i] * 0.3 + torch.randn(len(t2i), d, generator=g)  # weakly matched
    ks = (1, 2, 5, 10)
    got = retrieval_metrics(img, txt, t2i, ks=ks, chunk_size=chunk_size)
    ref = brute_force(img, txt, t2i, ks)
    assert got.keys() == ref.keys()
    for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-9), key
    assert 0 < got["text_retrieval_recall@1"] < 1 and 0 < got["image_retrieval_recall@1"] < 1


def test_image_without_captions_is_a_miss_even_when_k_exceeds_the_captions():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(6, 8, generator=g), torch.randn(3, 8, generator=g)
    t2i = torch.tensor([0, 0, 1])  # images 2..5 have no caption; 3 captions < k = 5
    got = retrieval_metrics(img, txt, t2i, ks=(1, 5), chunk_size=4)
    assert got == pytest.approx(brute_force(img, txt, t2i, (1, 5)), abs=1e-9)
    assert got["text_retrieval_recall@5"] == pytest.approx(2 / 6)


def test_recall_perfect_and_validation():
    img = torch.eye(4)
    txt = torch.cat([torch.eye(4), torch.eye(4)])
    t2i = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    m = retrieval_metrics(img, txt, t2i, ks=(1,), chunk_size=2)
    assert m == {"image_retrieval_recall@1": 1.0, "text_retrieval_recall@1": 1.0}
    with pytest.raises(ValueError, match="text_to_image"):
        retrieval_metrics(img, txt, t2i[:5])
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(img, txt, t2i + 1)


def test_evaluator_runs_model():
    model, tok = tiny_model(), WordTokenizer()
    images = torch.randn(6, 3, 32, 32)
    caps = [[f"photo {i}", f"picture number {i}"] for i in range(6)]
    ev = RetrievalEvaluator(images, caps, ks=(1, 5), batch_size=4, chunk_size=3)
    m = ev.run(model, tok)
    texts, t2i = flatten_captions(caps)
    with torch.no_grad():
        ref = brute_force(model.encode_image(images), model.encode_text(tok(texts)), t2i, (1, 5))
    assert m == pytest.approx(ref)
