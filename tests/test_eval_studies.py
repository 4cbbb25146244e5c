"""The prompt study against the plain zero-shot path, the typographic attack's parts and both CLI tasks."""

import json

import pytest
import torch
from PIL import Image

from clipforge.data.text_overlay import TextStyle, draw_word
from clipforge.eval.features import encode_images
from clipforge.eval.prompts import prompt_study
from clipforge.eval.typographic import WrittenOn, attack_metrics, attack_targets
from clipforge.eval.zeroshot import zero_shot_classifier, zero_shot_metrics
from eval_helpers import WordTokenizer, tiny_model
from test_eval_tasks import folders, run_cli, to_tensor  # noqa: F401  (the fixture and the stubbed CLI)

TEMPLATES = ["a photo of a {c}.", "a drawing of a {c}.", "itap of a {c}.", "a {c} thing"]


def test_prompt_study_matches_zero_shot_classifiers():
    torch.manual_seed(0)
    model, tok = tiny_model(), WordTokenizer()
    classnames = ["red", "blue", "green", "cat"]
    images, labels = torch.randn(24, 3, 32, 32), torch.arange(24) % 4
    feats, _ = encode_images(model, torch.utils.data.TensorDataset(images, labels))
    study = prompt_study(model, tok, feats, labels, classnames, TEMPLATES)

    def reference(templates):
        return zero_shot_metrics(feats, labels, zero_shot_classifier(model, tok, classnames, templates))[
            "acc1"
        ]

    assert study["acc1_ensemble"] == pytest.approx(reference(TEMPLATES))
    assert study["acc1_single"] == pytest.approx(reference(["a photo of a {c}."]))
    assert study["acc1_bare"] == pytest.approx(reference(["{c}"]))
    assert [r["template"] for r in study["templates"]] == TEMPLATES
    for r in study["templates"]:
        assert r["acc1"] == pytest.approx(reference([r["template"]]))
        rest = [t for t in TEMPLATES if t != r["template"]]
        assert r["ensemble_without"] == pytest.approx(reference(rest))
        assert r["loo_gain"] == pytest.approx(study["acc1_ensemble"] - reference(rest))


def test_attack_targets_and_metrics():
    labels = [0, 1, 2, 3] * 25
    targets = attack_targets(labels, 4, seed=1)
    assert all(t != y for t, y in zip(targets, labels))
    assert set(targets) == {0, 1, 2, 3} and targets == attack_targets(labels, 4, seed=1)
    with pytest.raises(ValueError, match="at least 2 classes"):
        attack_targets([0], 1)
    y = torch.tensor([0, 1, 2, 3])
    m = attack_metrics(torch.tensor([0, 1, 2, 0]), torch.tensor([1, 1, 3, 0]), y, [1, 2, 3, 0], 4)
    assert m["acc1_clean"] == 0.75 and m["acc1_attacked"] == 0.25
    assert m["follow_word"] == 0.75  # samples 0, 2 and 3 follow the word
    assert m["flipped_to_word"] == pytest.approx(2 / 3)  # of the 3 right when clean, 0 and 2 flipped


def test_written_on_draws_only_where_asked():
    img = Image.new("RGB", (64, 64), (90, 120, 30))
    ds = WrittenOn([img, img], [0, 1], to_tensor, [None, "star"], TextStyle(font_size=0.3))
    assert torch.equal(ds[0]["image"], to_tensor(img)) and not torch.equal(ds[1]["image"], to_tensor(img))
    for contrast in ("box", "high", "low"):
        out = draw_word(img, "a long word that must shrink", TextStyle(contrast=contrast, position="random"))
        assert out.size == img.size and out.tobytes() != img.tobytes()
    with pytest.raises(ValueError, match="position"):
        TextStyle(position="left")
    with pytest.raises(FileNotFoundError, match="font"):
        draw_word(img, "x", TextStyle(font="no-such-font.ttf"))


def test_cli_prompts_and_typographic(folders, monkeypatch, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    test = str(folders / "test")
    assert (
        run_cli(["eval", "zeroshot", "--dataset", test, "--model", "m", "--output", str(out)], monkeypatch)
        == 0
    )
    zs = json.loads((out / "test_zeroshot.json").read_text())["metrics"]
    assert (
        run_cli(["eval", "prompts", "--dataset", test, "--model", "m", "--output", str(out)], monkeypatch)
        == 0
    )
    rec = json.loads((out / "test_prompts.json").read_text())
    assert rec["task"] == "prompt_study" and rec["metrics"]["acc1_ensemble"] == pytest.approx(zs["acc1"])
    assert len(rec["metrics"]["templates"]) == 12
    assert (out / "test_prompts.png").exists() and "bare class name" in (
        out / "test_prompt_templates.md"
    ).read_text()
    argv = [
        "eval",
        "typographic",
        "--dataset",
        test,
        "--model",
        "m",
        "--output",
        str(out),
        "--position",
        "top",
    ]
    assert run_cli(argv, monkeypatch) == 0
    m = json.loads((out / "test_typographic.json").read_text())["metrics"]
    assert m["acc1_clean"] == pytest.approx(zs["acc1"]) and m["num_images"] == 9
    assert 0 <= m["follow_word"] <= 1 - m["acc1_attacked"] + 1e-9
    assert (out / "test_typographic.png").exists()
