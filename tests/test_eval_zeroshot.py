import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, balanced_accuracy_score, top_k_accuracy_score

from clipforge.eval import (
    ZeroShotEvaluator,
    format_template,
    load_classnames,
    load_templates,
    zero_shot_classifier,
    zero_shot_metrics,
)
from clipforge.eval.templates import DEFAULT_TEMPLATES
from eval_helpers import WordTokenizer, tiny_model


def test_metrics_match_sklearn():
    g = torch.Generator().manual_seed(1)
    n, d, c = 300, 16, 12
    feats = torch.randn(n, d, generator=g)
    clf = F.normalize(torch.randn(d, c, generator=g), dim=0)
    labels = torch.randint(0, c, (n,), generator=g)
    labels[labels == 3] = 4  # one class absent from the labels: balanced accuracy skips it
    m = zero_shot_metrics(feats, labels, clf)
    scores = (F.normalize(feats, dim=-1) @ clf).numpy()
    y = labels.numpy()
    assert m["acc1"] == pytest.approx(accuracy_score(y, scores.argmax(1)), abs=1e-9)
    assert m["acc5"] == pytest.approx(top_k_accuracy_score(y, scores, k=5, labels=np.arange(c)), abs=1e-9)
    with pytest.warns(UserWarning):  # sklearn warns about the predicted-but-absent class
        bal = balanced_accuracy_score(y, scores.argmax(1))
    assert m["mean_per_class_recall"] == pytest.approx(bal, abs=1e-9)
    assert 0.0 < m["acc1"] < m["acc5"] < 1.0


def test_acc5_is_nan_below_five_classes():
    """A top-5 over 4 classes is 100% for any model; CLIP_benchmark reports NaN there, and so do we."""
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(40, 8, generator=g)
    for c in (2, 4):
        m = zero_shot_metrics(feats, torch.arange(40) % c, F.normalize(torch.randn(8, c, generator=g), dim=0))
        assert np.isnan(m["acc5"]) and 0.0 <= m["acc1"] <= 1.0
    clf = F.normalize(torch.randn(8, 7, generator=g), dim=0)
    m = zero_shot_metrics(feats, torch.arange(40) % 7, clf)
    scores = (F.normalize(feats, dim=-1) @ clf).numpy()
    assert m["acc5"] == pytest.approx(top_k_accuracy_score(np.arange(40) % 7, scores, k=5), abs=1e-12)


def test_classifier_is_template_average_of_normalised_features():
    model, tok = tiny_model(), WordTokenizer()
    classes, templates = ["cat", "red square", "dog"], ["a photo of a {c}.", "a {c} drawing", "{c}"]
    w = zero_shot_classifier(model, tok, classes, templates, batch_size=4)
    assert w.shape == (model.config.embed_dim, 3)
    with torch.no_grad():
        for j, c in enumerate(classes):
            acc = torch.zeros(model.config.embed_dim)
            for t in templates:
                f = model.encode_text(tok([t.replace("{c}", c)]))[0]
                acc += f / f.norm()
            ref = acc / len(templates)
            ref = ref / ref.norm()
            torch.testing.assert_close(w[:, j], ref, atol=1e-5, rtol=1e-5)


def test_evaluator_on_planted_classes():
    """Images whose features equal a class's text feature must be classified as that class."""
    model, tok = tiny_model(), WordTokenizer()
    classes = ["cat", "dog", "bird", "fish", "frog", "car"]
    images = torch.randn(18, 3, 32, 32)
    labels = torch.arange(18) % 6
    ev = ZeroShotEvaluator(classes, ["a photo of a {c}."], images, labels, batch_size=5, prefix="zs/")
    m = ev.run(model, tok)
    assert set(m) == {"zs/acc1", "zs/acc5", "zs/mean_per_class_recall"}
    # independent: logits computed with plain encode calls
    with torch.no_grad():
        img = F.normalize(model.encode_image(images), dim=-1)
        txt = F.normalize(model.encode_text(tok([f"a photo of a {c}." for c in classes])), dim=-1)
        ref = accuracy_score(labels.numpy(), (img @ txt.T).argmax(1).numpy())
    assert m["zs/acc1"] == pytest.approx(ref)
    # a Dataset yielding dicts gives the same numbers
    ds = [{"image": images[i], "label": int(labels[i])} for i in range(18)]
    assert ZeroShotEvaluator(classes, ["a photo of a {c}."], _ListDataset(ds), batch_size=7).run(model, tok)[
        "acc1"
    ] == pytest.approx(ref)


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_templates_and_classnames_files(tmp_path):
    assert len(DEFAULT_TEMPLATES) >= 10 and all("{c}" in t for t in DEFAULT_TEMPLATES)
    assert format_template("a photo of a {c}.", "dog") == "a photo of a dog."
    assert format_template("itap of a {}.", "dog") == "itap of a dog."
    with pytest.raises(ValueError, match="placeholder"):
        load_templates(["no placeholder"])
    # CLIP_benchmark-shaped tables
    (tmp_path / "en_classnames.json").write_text(json.dumps({"cifar10": ["airplane", "car"], "mnist": ["0"]}))
    (tmp_path / "en_zeroshot_classification_templates.json").write_text(
        json.dumps({"cifar10": ["a photo of a {c}.", "a blurry photo of a {c}."]})
    )
    assert load_classnames(tmp_path / "en_classnames.json", "cifar10") == ["airplane", "car"]
    assert load_classnames(tmp_path / "en_classnames.json", "wds/cifar10") == ["airplane", "car"]
    with pytest.raises(ValueError, match="2 datasets"):
        load_classnames(tmp_path / "en_classnames.json")
    with pytest.raises(KeyError, match="imagenet1k"):
        load_classnames(tmp_path / "en_classnames.json", "imagenet1k")
    t = load_templates(tmp_path / "en_zeroshot_classification_templates.json", "cifar10")
    assert t == ["a photo of a {c}.", "a blurry photo of a {c}."]
    (tmp_path / "list.json").write_text(json.dumps(["x", "y"]))
    assert load_classnames(tmp_path / "list.json") == ["x", "y"]


def test_clip_benchmark_absent_is_a_clear_error(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="clip_benchmark is not installed"):
        load_templates("clip_benchmark", "cifar10")


def test_clip_benchmark_files_found_through_package_metadata():
    """CLIP_benchmark's own class-name and template files, located without importing the package."""
    import importlib.metadata
    import json

    from clipforge.eval.templates import load_classnames, load_templates

    try:
        dist = importlib.metadata.distribution("clip_benchmark")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("clip_benchmark not installed (make setup installs it with --no-deps)")
    root = dist.locate_file("clip_benchmark/datasets")
    names = json.loads((root / "en_classnames.json").read_text())["flowers"]
    templates = json.loads((root / "en_zeroshot_classification_templates.json").read_text())["cifar10"]
    assert load_classnames("clip_benchmark", "flowers") == names and len(names) == 102
    assert load_templates("clip_benchmark", dataset="cifar10") == templates
