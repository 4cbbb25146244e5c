"""clipforge.use.embed: folder / manifest / shards / captions in, fp16 unit vectors + parquet out; skips
counted and named; resume after a crash and --append give the rows of one uninterrupted run."""

import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch.nn.functional as F

from clipforge.use import EmbeddingStore, EmbedOptions, embed, open_encoder
from clipforge.use import embedder as embed_module
from use_helpers import tiny_checkpoint, write_corrupt, write_images


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture()
def photos(tmp_path):
    folder = tmp_path / "photos"
    write_images(folder, 14)
    write_corrupt(folder)
    return folder


def rows_by_key(out, modality="image"):
    store = EmbeddingStore(out)
    keys = store.metadata(["key"]).column("key").to_pylist()
    vecs = store.vectors(np.arange(store.count), modality)
    return dict(zip(keys, vecs))


def test_folder_embeddings_match_the_model_and_skips_are_named(ckpt, photos, tmp_path):
    out = tmp_path / "emb"
    opts = EmbedOptions(modality="both", batch_size=4, part_size=8, workers=0, progress=False)
    manifest = embed(photos, out, ckpt, options=opts)
    assert manifest["count"] == 14 and manifest["complete"]
    assert manifest["skipped"] == {"corrupt_image": 1}
    assert "broken.jpg" in (out / "skipped.log").read_text()
    assert [p["rows"] for p in manifest["parts"]] == [7, 7]  # 15 inputs, 8 per part, 1 skipped
    # readable with numpy + pyarrow alone; float16, unit norm
    arr = np.load(out / "img_emb" / "part-00000.npy")
    assert arr.dtype == np.float16 and arr.shape == (7, 32)
    np.testing.assert_allclose(np.linalg.norm(arr.astype(np.float32), axis=1), 1, atol=2e-3)
    meta = pq.read_table(out / "metadata" / "part-00001.parquet").to_pylist()
    assert [m["id"] for m in meta] == list(range(7, 14))
    assert meta[0]["width"] == 40 and meta[0]["height"] == 48 and meta[0]["caption"].startswith("a ")
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["model"]["fingerprint"] == open_encoder(ckpt).fingerprint
    assert on_disk["dim"] == 32 and on_disk["preprocess"]["image_size"] == 32

    # the stored vectors are the model's normalised features (fp16-rounded)
    enc = open_encoder(ckpt)
    rows = rows_by_key(out)
    key = "sub/img002.jpg"
    from clipforge import load_image

    ref = enc.encode_pixels(enc.preprocess(load_image(photos / key))[None])[0]
    np.testing.assert_allclose(rows[key], ref.numpy(), atol=2e-3)
    texts = rows_by_key(out, "text")
    ref_t = enc.encode_texts(["a blue picture number 2"])[0]
    np.testing.assert_allclose(texts[key], ref_t.numpy(), atol=2e-3)


def test_crash_then_rerun_equals_one_run_and_append_adds_only_new(ckpt, photos, tmp_path, monkeypatch):
    opts = EmbedOptions(batch_size=3, part_size=4, workers=2, progress=False)
    once = embed(photos, tmp_path / "once", ckpt, options=opts)

    real_write, calls = embed_module.write_part, []

    def crash_on_third_part(*args, **kwargs):  # dies after writing a part's files, before the manifest
        calls.append(1)
        real_write(*args, **kwargs)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(embed_module, "write_part", crash_on_third_part)
    with pytest.raises(KeyboardInterrupt):
        embed(photos, tmp_path / "resumed", ckpt, options=opts)
    monkeypatch.setattr(embed_module, "write_part", real_write)
    half = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert not half["complete"] and len(half["parts"]) == 2
    again = embed(photos, tmp_path / "resumed", ckpt, options=opts)
    assert again["count"] == once["count"] == 14 and again["skipped"] == once["skipped"]
    a, b = rows_by_key(tmp_path / "once"), rows_by_key(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])

    # a finished directory refuses a plain rerun; --append embeds only the new files
    with pytest.raises(ValueError, match="--append"):
        embed(photos, tmp_path / "once", ckpt, options=opts)
    write_images(photos / "new", 3, seed=5)
    opts_append = EmbedOptions(batch_size=3, part_size=4, append=True, progress=False)
    grown = embed(photos, tmp_path / "once", ckpt, options=opts_append)
    assert grown["count"] == 17 and grown["skipped"] == {"corrupt_image": 1}
    assert sorted(rows_by_key(tmp_path / "once"))[:3] == ["img000.jpg", "img001.png", "img003.png"]
    ids = EmbeddingStore(tmp_path / "once").metadata(["id"]).column("id").to_pylist()
    assert ids == list(range(17))


def test_another_model_is_refused(ckpt, photos, tmp_path):
    opts = EmbedOptions(progress=False)
    embed(photos, tmp_path / "e", ckpt, options=opts)
    other = tiny_checkpoint(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="another model"):
        embed(photos, tmp_path / "e", other, options=EmbedOptions(progress=False, append=True))


def test_manifest_shards_and_captions_sources(ckpt, photos, tmp_path):
    files = sorted(p for p in photos.rglob("*") if p.suffix in (".png", ".jpg"))
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "image,caption\n" + "".join(f"{p},cap {i}\n" for i, p in enumerate(files)) + "missing.jpg,gone\n"
    )
    m = embed(manifest, tmp_path / "m", ckpt, options=EmbedOptions(progress=False))
    assert m["data"]["kind"] == "manifest" and m["count"] == 14
    assert m["skipped"] == {"corrupt_image": 1, "missing_image": 1}

    shard = tmp_path / "shards" / "000000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for i, p in enumerate(files):
            tar.add(p, arcname=f"s{i:03d}{p.suffix}")
            tar.add(p.with_suffix(".txt"), arcname=f"s{i:03d}.txt")
    s = embed(str(shard), tmp_path / "s", ckpt, options=EmbedOptions(progress=False, modality="both"))
    assert s["data"]["kind"] == "shards" and s["count"] == 14 and s["skipped"] == {"corrupt_image": 1}
    by_key = rows_by_key(tmp_path / "m")
    shard_rows = rows_by_key(tmp_path / "s")
    np.testing.assert_array_equal(shard_rows["000000.tar/s001"], by_key[str(files[1])])

    captions = tmp_path / "caps.txt"
    captions.write_text("a dog\n\na cat on a mat\n")
    c = embed(captions, tmp_path / "c", ckpt, options=EmbedOptions(progress=False, dtype="float32"))
    assert c["modality"] == "text" and c["count"] == 2
    vec = np.load(tmp_path / "c" / "text_emb" / "part-00000.npy")
    enc = open_encoder(ckpt)
    ref = F.normalize(enc.encode_texts(["a dog", "a cat on a mat"]), dim=-1)
    assert vec.dtype == np.float32
    np.testing.assert_allclose(vec, ref.numpy(), atol=1e-6)
