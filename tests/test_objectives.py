"""Figure 2's predictive objectives: the losses against loop references, the models' zero-shot scores
against their own predictions, the bag-of-words text tower, and a tiny objectives study end to end."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clipforge.config import TextConfig, VisionConfig
from clipforge.loss import PREDICTIVE_OBJECTIVES, bow_loss, bow_targets, caption_loss
from clipforge.models.predictive import BagOfWordsText, BoWPredictor, Captioner
from clipforge.train.objectives_study import (
    StudyConfig,
    build_model,
    efficiency_table,
    images_to_reach,
    run_study,
)
from clipforge.train.step import contrastive_step

V, EOT, SOT = 60, 59, 58
VISION = VisionConfig(kind="resnet", image_size=32, width=8, layers=(1, 1, 1, 1), heads=2)
TEXT = TextConfig(context_length=12, vocab_size=V, width=32, heads=2, layers=1)


def caps(rows):
    """Token rows [SOT, words..., EOT, 0...] of width 10."""
    out = torch.zeros(len(rows), 10, dtype=torch.long)
    for i, words in enumerate(rows):
        ids = [SOT, *words, EOT]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


TOKENS = caps([[5, 7, 5], [3], [1, 2, 3, 4, 0, 6]])  # id 0 as a real word in the last caption


def test_caption_loss_matches_loop_reference():
    torch.manual_seed(0)
    logits = torch.randn(3, 9, V, requires_grad=True)
    loss = caption_loss(logits, TOKENS)
    total, count = 0.0, 0
    for i, row in enumerate(TOKENS.tolist()):
        eot = row.index(EOT)
        for j in range(eot):  # position j predicts token j + 1, up to and including the EOT
            total = total - F.log_softmax(logits[i, j], -1)[row[j + 1]]
            count += 1
    ref = total / count
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    (g,) = torch.autograd.grad(loss, logits)
    (g_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g, g_ref)
    assert g[1, 2:].abs().sum() == 0  # padding after the short caption's EOT gets no gradient


def test_bow_targets_and_loss():
    t = bow_targets(TOKENS, V)
    assert t[0, 5].item() == pytest.approx(2 / 3) and t[0, 7].item() == pytest.approx(1 / 3)
    assert t[0].sum().item() == pytest.approx(1) and t[0, SOT] == 0 and t[0, EOT] == 0
    assert t[1, 3].item() == 1 and t[1, 0] == 0  # padding zeros are not words
    assert t[2, 0].item() == pytest.approx(1 / 6)  # ... but a real id 0 is
    torch.manual_seed(0)
    logits = torch.randn(3, V, requires_grad=True)
    ref = torch.stack([-(t[i] * F.log_softmax(logits[i], -1)).sum() for i in range(3)]).mean()
    assert bow_loss(logits, TOKENS).item() == pytest.approx(ref.item(), rel=1e-6)
    assert set(PREDICTIVE_OBJECTIVES) == {"captioning", "bow"}


def test_captioner_is_causal_conditioned_and_scores_its_likelihood():
    torch.manual_seed(0)
    model = Captioner(VISION, 16, TEXT).eval()
    pixels = torch.randn(2, 3, 32, 32)
    logits = model.predict(pixels, TOKENS[:2])
    assert logits.shape == (2, 4, V)  # the batch is cut after its last EOT (5 positions)
    changed = TOKENS[:2].clone()
    changed[0, 3] = 9  # a later token never changes earlier predictions
    again = model.predict(pixels, changed)
    torch.testing.assert_close(again[0, :3], logits[0, :3])
    other = model.predict(torch.randn(2, 3, 32, 32), TOKENS[:2])
    assert not torch.allclose(other, logits)  # the image conditions every position
    prompts = caps([[5, 7], [3, 3, 3]])
    scores = model.class_scores(pixels, prompts)
    for c in range(2):
        row = prompts[c : c + 1].expand(2, -1)
        n = int(row[0].argmax())
        lp = F.log_softmax(model.predict(pixels, row[:, : n + 1]), -1)
        ref = lp.gather(-1, row[:, 1 : n + 1, None])[..., 0].sum(-1)
        torch.testing.assert_close(scores[:, c], ref, atol=1e-4, rtol=1e-4)
    assert model.loss(pixels, TOKENS[:2]).item() > 0


def test_bow_predictor_scores_and_bow_text_tower():
    torch.manual_seed(0)
    model = BoWPredictor(VISION, 16, V).eval()
    pixels = torch.randn(2, 3, 32, 32)
    lp = F.log_softmax(model.predict(pixels), -1)
    scores = model.class_scores(pixels, caps([[5, 7, 5], [3]]))
    torch.testing.assert_close(scores[:, 0], 2 * lp[:, 5] + lp[:, 7])
    torch.testing.assert_close(scores[:, 1], lp[:, 3])
    text = BagOfWordsText(V, 32, 16)
    text.init_weights()
    torch.testing.assert_close(text(caps([[1, 2, 3]])), text(caps([[3, 1, 2]])))  # a bag: order-free
    assert not torch.allclose(text(caps([[1, 2, 3]])), text(caps([[1, 2, 4]])))
    clip = build_model("contrastive", VISION, TEXT, 16, bow_text=True)
    assert isinstance(clip.text, BagOfWordsText)
    contrastive_step(clip, torch.randn(3, 3, 32, 32), TOKENS, "clip")
    assert clip.text.token_embedding.weight.grad[5].abs().sum() > 0


def test_images_to_reach_and_efficiency_ratios():
    assert images_to_reach([0, 100, 200], [0.0, 0.2, 0.6], 0.4) == pytest.approx(150)
    assert images_to_reach([0, 100], [0.0, 0.1], 0.5) is None
    curve = {"images": [0, 100, 200, 400], "acc1": [0.0, 0.4, 0.8, 0.8]}
    slow = {"images": [0, 100, 200, 400], "acc1": [0.0, 0.1, 0.2, 0.4]}
    rows = efficiency_table({"bow": [slow], "contrastive": [curve]}, chance=0.0)
    assert [r["target_acc1"] for r in rows] == pytest.approx([0.2, 0.4, 0.6])
    assert rows[0]["images"] == {"bow": pytest.approx(200), "contrastive": pytest.approx(50)}
    assert rows[0]["bow/contrastive"] == pytest.approx(4.0)
    assert rows[2]["bow/contrastive"] is None and "captioning/bow" not in rows[0]
    assert rows[2]["bow/contrastive_at_least"] == pytest.approx(400 / 150)  # bow never reaches 0.6


def test_tiny_objectives_study(tmp_path):
    cfg = StudyConfig(
        images=32,
        batch_size=16,
        evals=1,
        seeds=(0, 1),
        train_images=48,
        eval_per_class=1,
        seen_per_class=1,
        image_size=32,
        resnet_width=8,
        width=32,
        text_layers=1,
        vocab_size=520,
    )
    threads = torch.get_num_threads()
    result = run_study(cfg, tmp_path, say=lambda s: None)  # one thread while it runs (the default)
    assert torch.get_num_threads() == threads
    assert set(result["curves"]) == {"captioning", "bow", "contrastive"}
    for curves in result["curves"].values():
        assert len(curves) == 2 and all(c["images"] == [0, 32] for c in curves)
        assert all(0 <= a <= 1 for c in curves for a in c["acc1"] + c["acc1_seen"])
    assert result["num_classes"] == 64 and result["chance"] == pytest.approx(1 / 64)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["paper_ratios"] == {"captioning/bow": 3.0, "bow/contrastive": 4.0}
    assert len(saved["efficiency_seen"]) == 3 and saved["seeds_done"] == [0, 1]
    assert "paper 3x" in (tmp_path / "results.md").read_text() and (tmp_path / "figure2.png").exists()
    with pytest.raises(ValueError, match="unknown objectives"):
        StudyConfig(objectives=("lm",))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--evals", "0"], "evals must be >= 1, got 0"),
        (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
        (["--train-images", "0"], "train_images must be >= 1, got 0"),
        (["--image-size", "3"], "image_size must be >= 16, got 3"),
        (["--images", "10", "--batch-size", "64"], "images (10) must be at least one batch (64)"),
    ],
)
def test_the_example_refuses_bad_arguments_in_one_line(argv, message, monkeypatch, capsys, tmp_path):
    """examples/objectives_study.py: a usage error before any work (these were ZeroDivisionError
    tracebacks, some after generating the data)."""
    path = Path(__file__).parents[1] / "examples" / "objectives_study.py"
    spec = importlib.util.spec_from_file_location("objectives_study_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.setattr(sys, "argv", ["objectives_study.py", "--out", str(tmp_path / "out"), *argv])
    with pytest.raises(SystemExit) as exit_:
        example.main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"error: {message}")
    assert not (tmp_path / "out").exists()
