import json
import math
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.eval.datasets import ImageFolderDataset, ManifestClassificationDataset, RetrievalSet
from clipforge.eval.features import cached_image_features, encode_images, model_fingerprint
from clipforge.eval.report import markdown_table, plot_confusion, result_record
from clipforge.eval.robustness import effective_robustness, fit_logit_line, plot_robustness
from clipforge.eval.zeroshot import confusion_matrix
from eval_helpers import tiny_model


def to_tensor(img):
    return torch.from_numpy(np.asarray(img.resize((32, 32)), dtype=np.float32) / 255).permute(2, 0, 1)


def _img(path, color):
    Image.new("RGB", (40, 36), color).save(path)


def test_image_folder_and_manifest(tmp_path):
    for cls, color in [("red_square", (255, 0, 0)), ("blue", (0, 0, 255))]:
        (tmp_path / cls).mkdir()
        for i in range(2):
            _img(tmp_path / cls / f"{i}.png", color)
    ds = ImageFolderDataset(tmp_path, to_tensor)
    assert ds.classnames == ["blue", "red square"] and len(ds) == 4
    assert ds[0]["image"].shape == (3, 32, 32) and ds[0]["label"] == 0 and ds[3]["label"] == 1
    (tmp_path / "names.json").write_text(json.dumps({"blue": "sky", "red_square": "brick"}))
    assert ImageFolderDataset(tmp_path, to_tensor, tmp_path / "names.json").classnames == ["sky", "brick"]
    (tmp_path / "m.csv").write_text("image,label\nblue/0.png,blue\nred_square/1.png,red_square\n")
    m = ManifestClassificationDataset(tmp_path / "m.csv", to_tensor)
    assert m.classnames == ["blue", "red square"] and [m[i]["label"] for i in range(2)] == [0, 1]
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageFolderDataset(tmp_path / "nope", to_tensor)


def test_class_name_and_template_files(tmp_path):
    """Text files (one entry a line) as well as JSON; blank, empty, missing and invalid entries are one-line
    errors naming the file; duplicates are said but allowed (ImageNet has two 'crane's)."""
    from clipforge.eval.templates import load_templates

    for cls in ("a", "b", "c"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        _img(tmp_path / "imgs" / cls / "0.png", (9, 9, 9))

    def names(text, name="names.txt"):
        (tmp_path / name).write_text(text)
        return ImageFolderDataset(tmp_path / "imgs", to_tensor, tmp_path / name).classnames

    assert names("cat\ndog\nsea lion\n\n") == ["cat", "dog", "sea lion"]
    with pytest.raises(ValueError, match=r"names\.txt: line 2 is empty"):
        names("cat\n\ndog\nsea lion\n")
    with pytest.raises(ValueError, match=r"names\.json: class 1 \('b'\) has no name"):
        names('["cat", " ", "dog"]', "names.json")
    with pytest.raises(ValueError, match=r"names\.json: not valid JSON"):
        names('["cat", "dog"', "names.json")
    with pytest.raises(ValueError, match=r"names\.json: no class name for 'c'"):
        names('{"a": "cat", "b": "dog"}', "names.json")
    with pytest.warns(UserWarning, match=r"duplicate class names 'cat'"):
        assert names("cat\ncat\ndog\n") == ["cat", "cat", "dog"]
    (tmp_path / "t.txt").write_text("a photo of a {}.\n{c} in the wild\n")
    assert load_templates(tmp_path / "t.txt") == ["a photo of a {}.", "{c} in the wild"]
    (tmp_path / "t.txt").write_text("a photo of a {}.\na photo.\n")
    with pytest.raises(ValueError, match=r"t\.txt', template 2: .*'a photo\.'"):
        load_templates(tmp_path / "t.txt")


def test_retrieval_sets(tmp_path):
    for i in range(3):
        _img(tmp_path / f"{i}.png", (i * 80, 0, 0))
    rows = [{"image": "0.png", "caption": ["a", "b"]}, {"image": "1.png", "caption": "c"}]
    rows.append({"image": "0.png", "caption": "d"})
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    rs = RetrievalSet.from_manifest(tmp_path / "r.jsonl", to_tensor)
    assert rs.captions == ["a", "b", "d", "c"] and rs.text_to_image.tolist() == [0, 0, 0, 1]
    assert len(rs.images) == 2
    (tmp_path / "0.txt").write_text("x\ny\n")
    (tmp_path / "1.json").write_text(json.dumps(["z"]))
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name in ["0.png", "0.txt", "1.png", "1.json", "2.png"]:  # 2 has no caption: dropped
            tar.add(tmp_path / name, arcname=name)
    rs = RetrievalSet.from_tars([tmp_path / "s.tar"], to_tensor)
    assert rs.captions == ["x", "y", "z"] and rs.text_to_image.tolist() == [0, 0, 1]
    assert rs.images[1]["image"].shape == (3, 32, 32)


def test_feature_cache(tmp_path):
    model = tiny_model()
    x = torch.randn(5, 3, 32, 32)
    fp = model_fingerprint(model)
    f1, _ = cached_image_features(model, x, tmp_path, key=("set-a",), batch_size=2)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    f2, _ = cached_image_features(model, x * 0, tmp_path, key=("set-a",))  # served from the cache
    torch.testing.assert_close(f1, f2)
    torch.testing.assert_close(f1, encode_images(model, x)[0])
    with torch.no_grad():
        model.visual.proj.add_(0.1 * torch.randn_like(model.visual.proj))
    assert model_fingerprint(model) != fp
    f3, _ = cached_image_features(model, x, tmp_path, key=("set-a",))
    assert len(list(tmp_path.glob("*.safetensors"))) == 2 and not torch.allclose(f1, f3)


def test_effective_robustness_and_plots(tmp_path):
    acc_in = [0.3, 0.5, 0.7, 0.9]
    # points on an exact logit-linear trend: logit(y) = 0.8 logit(x) - 0.5
    acc_shift = [1 / (1 + math.exp(-(0.8 * math.log(a / (1 - a)) - 0.5))) for a in acc_in]
    slope, intercept = fit_logit_line(acc_in, acc_shift)
    assert slope == pytest.approx(0.8) and intercept == pytest.approx(-0.5)
    assert effective_robustness(acc_in, acc_shift, (slope, intercept)) == pytest.approx(
        [0, 0, 0, 0], abs=1e-9
    )
    pred = 1 / (1 + math.exp(-(0.8 * math.log(0.6 / 0.4) - 0.5)))
    assert effective_robustness(0.6, pred + 0.1, (slope, intercept)) == pytest.approx(0.1)
    pts = {f"m{i}": (a, s) for i, (a, s) in enumerate(zip(acc_in, acc_shift))}
    assert plot_robustness(pts, tmp_path / "r.png", (slope, intercept)).read_bytes()[:4] == b"\x89PNG"
    cm = confusion_matrix(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), 3)
    assert cm.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert plot_confusion(cm, ["a", "b", "c"], tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"


def test_report_shape():
    r = result_record("cifar10", "ViT-B-32", "zeroshot_classification", {"acc1": 0.5, "acc5": 0.9}, "openai")
    assert set(r) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
    table = markdown_table(
        [r, result_record("flickr", "m", "zeroshot_retrieval", {"text_retrieval_recall@1": 0.25})]
    )
    lines = table.strip().splitlines()
    assert lines[0].split("|")[5:8] == [" acc1 ", " acc5 ", " text_retrieval_recall@1 "]
    assert "| 50.00 | 90.00 |  |" in lines[2] and lines[3].endswith("|  |  | 25.00 |")
    # a non-fraction metric (the probe's chosen regularisation) is printed as it is, not as a percentage
    probe = markdown_table([result_record("digits", "m", "linear_probe", {"acc1": 0.9, "lambda": 3.6e-4})])
    assert probe.strip().splitlines()[2].endswith("| 90.00 | 0.00036 |")
