"""CLIPScore against torchmetrics' CLIPScore (an independent implementation: HF CLIPModel + CLIPProcessor) on
the same weights converted with `clipforge convert --format hf`; zero-shot classify: labels once, softmax /
sigmoid, top-k, skipped files reported."""

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge import create_model, load_image, save_pretrained
from clipforge.cli import main as cli_main
from clipforge.tokenizer import Tokenizer
from clipforge.transforms import OPENAI_MEAN, OPENAI_STD
from clipforge.use import open_encoder
from clipforge.use.classify import Classifier, clip_score
from use_helpers import tiny_checkpoint, write_corrupt, write_images

transformers = pytest.importorskip("transformers")
clip_score_mod = pytest.importorskip("torchmetrics.multimodal.clip_score")


def square_images(folder, n, size=32, seed=0):
    """Images at the model's input size: HF's and our preprocessing then both only normalise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        arr = np.clip(rng.integers(0, 255, 3) + rng.normal(0, 50, (size, size, 3)), 0, 255).astype(np.uint8)
        p = folder / f"{i}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


class FeaturesAsTensors(torch.nn.Module):
    """torchmetrics 1.9 expects get_*_features to return tensors; transformers 5 returns an output object
    whose pooler_output holds the projected features. Only that return type is adapted here."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        out = self.model.get_image_features(*args, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_text_features(self, *args, **kwargs):
        out = self.model.get_text_features(*args, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_clipscore_matches_torchmetrics_on_the_hf_conversion(tmp_path):
    images = square_images(tmp_path / "img", 8)
    captions = [f"a photo of thing number {i}" for i in range(8)]
    # a random model's image-text cosines share one sign; flip the image projection if they are negative
    # so that max(cos, 0) is not zero everywhere
    torch.manual_seed(0)
    model = create_model("tiny-vit").eval()
    first = clip_score(open_encoder(model), images[:2], captions[:2])
    if first["pairs"][0]["cosine"] < 0:
        with torch.no_grad():
            model.visual.proj.neg_()
    ckpt = save_pretrained(model, tmp_path / "ckpt", tokenizer=Tokenizer.from_openai_vocab())
    assert cli_main(["convert", str(ckpt), str(tmp_path / "hf"), "--format", "hf"]) == 0

    def hf_model_and_processor():
        model = FeaturesAsTensors(transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval())
        image_proc = transformers.CLIPImageProcessor(
            size={"shortest_edge": 32},
            crop_size={"height": 32, "width": 32},
            image_mean=list(OPENAI_MEAN),
            image_std=list(OPENAI_STD),
        )
        tok = transformers.CLIPTokenizer.from_pretrained(tmp_path / "hf")
        return model, transformers.CLIPProcessor(image_processor=image_proc, tokenizer=tok)

    metric = clip_score_mod.CLIPScore(model_name_or_path=hf_model_and_processor)
    ours = clip_score(open_encoder(ckpt), images, captions, batch_size=3)
    assert ours["count"] == 8
    positive = 0
    for path, caption, pair in zip(images, captions, ours["pairs"]):
        pixels = torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1)
        metric.reset()
        metric.update(pixels, [caption])
        ref = float(metric.compute())  # 100 * max(cos, 0)
        assert pair["clip_score_100"] == pytest.approx(ref, abs=1e-4 * max(1.0, ref))
        assert pair["clip_score"] == pytest.approx(2.5 * ref / 100, abs=1e-4)
        positive += ref > 0
    assert positive >= 2  # not a comparison of zeros
    assert ours["clip_score_100"] == pytest.approx(np.mean([p["clip_score_100"] for p in ours["pairs"]]))


def test_classify_softmax_sigmoid_topk_and_skips(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    files = write_images(tmp_path / "img", 5)
    bad = write_corrupt(tmp_path / "img")
    enc = open_encoder(ckpt)
    labels = ["cat", "dog", "car", "tree"]
    clf = Classifier(enc, labels, templates=["a photo of a {}.", "a {}."])
    results, skipped = clf.classify([*files, bad], top_k=2, batch_size=2)
    assert [r["path"] for r in results] == [str(f) for f in files]
    assert skipped == [{"path": str(bad), "reason": "corrupt_image", "detail": skipped[0]["detail"]}]
    # the reference: every label re-encoded per image (HF pipeline semantics), one image at a time
    for r, f in zip(results, files):
        img = enc.encode_pixels(enc.preprocess(load_image(f))[None])
        w = []
        for label in labels:
            t = enc.encode_texts([f"a photo of a {label}.", f"a {label}."])
            w.append(torch.nn.functional.normalize(t.mean(0), dim=-1))
        probs = (enc.logit_scale * img @ torch.stack(w).T).softmax(-1)[0]
        top = probs.topk(2)
        assert r["labels"] == [labels[i] for i in top.indices.tolist()]
        np.testing.assert_allclose(r["scores"], top.values.numpy(), atol=1e-5)

    torch.manual_seed(0)
    siglip = create_model(create_model("tiny-vit").config.replace(init_logit_bias=-10.0)).eval()
    save_pretrained(siglip, tmp_path / "sig", tokenizer=Tokenizer.from_openai_vocab())
    enc_s = open_encoder(tmp_path / "sig")
    assert enc_s.sigmoid
    clf_s = Classifier(enc_s, labels)
    res_s, _ = clf_s.classify(files[:1], top_k=4)
    feats = enc_s.encode_pixels(enc_s.preprocess(load_image(files[0]))[None])
    ref = torch.sigmoid(enc_s.logit_scale * feats @ clf_s.weights.T - 10.0)[0]
    np.testing.assert_allclose(
        sorted(res_s[0]["scores"], reverse=True), ref.sort(descending=True).values, atol=1e-6
    )
    assert sum(res_s[0]["scores"]) < 0.99  # independent sigmoids, not a distribution
