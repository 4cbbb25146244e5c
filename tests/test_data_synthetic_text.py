"""The synthetic set's opt-in written words: off by default (the set unchanged), on for training pairs."""

import pytest

from clipforge.data.synthetic import ShapesConfig, classification_set, make_captions, make_scenes


def test_text_rate_is_additive():
    plain, text = ShapesConfig(image_size=48), ShapesConfig(image_size=48, text_rate=0.5)
    a, b = make_scenes(plain, 24), make_scenes(text, 24)
    written = [s for s in b if s.meta.get("word")]
    assert 5 <= len(written) <= 19  # about half
    for x, y in zip(a, b):
        if "word" in y.meta:
            word = y.meta["word"]
            assert f" {word}" in y.caption and y.caption != x.caption
            assert y.image.tobytes() != x.image.tobytes()
            assert word in (*plain.colours, *plain.shapes)
        else:  # pairs without a word are exactly the plain set's
            assert (y.caption, y.image.tobytes()) == (x.caption, x.image.tobytes())
        assert y.objects == x.objects
    assert make_captions(text, 24) == [s.caption for s in b]
    # evaluation splits and classification sets never carry words
    assert [s.caption for s in make_scenes(text, 6, "seen_eval")] == [
        s.caption for s in make_scenes(plain, 6, "seen_eval")
    ]
    xa, _, _ = classification_set(plain, 1, "unseen")
    xb, _, _ = classification_set(text, 1, "unseen")
    assert xa.equal(xb)


def test_text_words_and_errors():
    cfg = ShapesConfig(image_size=48, text_rate=1.0, text_words=["apple"])
    assert all(s.meta["word"] == "apple" and "apple" in s.caption for s in make_scenes(cfg, 4))
    with pytest.raises(ValueError, match="text_rate"):
        ShapesConfig(text_rate=1.5)


def test_default_set_bytes_unchanged():
    """sha256 of the default set's first 40 pairs and one unseen classification set, as main wrote them
    before the text option existed (fad45f5c...): the option must leave them bit for bit the same."""
    import hashlib

    from clipforge.data.synthetic import make_pairs

    h = hashlib.sha256()
    for image, caption in make_pairs(ShapesConfig(), 40):
        h.update(image.tobytes())
        h.update(caption.encode())
    h.update(classification_set(ShapesConfig(), 1, "unseen")[0].numpy().tobytes())
    assert h.hexdigest() == "fad45f5c20a12d6be4a02e187447a15cefd2d3c00cb858ab5552dd384ad8babc"
