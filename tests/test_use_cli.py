"""The use/ commands end to end through `clipforge.cli.main`: embed -> index -> search, classify, score,
export-onnx and embed/classify --runtime onnx."""

import csv
import json

import pytest

from clipforge.cli import main
from use_helpers import tiny_checkpoint, write_corrupt, write_images


def test_cli_round_trip(tmp_path, capsys):
    ckpt = str(tiny_checkpoint(tmp_path / "ckpt"))
    photos = tmp_path / "photos"
    files = write_images(photos, 8)
    write_corrupt(photos)
    emb = str(tmp_path / "emb")
    assert (
        main(
            ["embed", "--model", ckpt, "--data", str(photos), "--out", emb, "--workers", "0", "--no-progress"]
        )
        == 0
    )
    assert "8 rows" in capsys.readouterr().out
    assert main(["index", emb]) == 0
    assert "flat index of 8" in capsys.readouterr().out
    assert main(["search", emb, "a red picture", "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and {"id", "score", "key", "path", "caption"} <= set(hits[0])
    assert main(["search", emb, "--image", str(files[2]), "-k", "1"]) == 0
    assert "img002.jpg" in capsys.readouterr().out
    assert main(["index", emb, "--delete", "0,1"]) == 0
    assert "deleted 2" in capsys.readouterr().out

    out_csv = tmp_path / "pred.csv"
    rc = main(
        [
            "classify",
            str(photos),
            "--model",
            ckpt,
            "--labels",
            "a cat,a dog,a car",
            "--top-k",
            "2",
            "--format",
            "csv",
            "--output",
            str(out_csv),
        ]
    )
    assert rc == 0
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 16 and rows[0]["rank"] == "1"
    assert "corrupt_image" in capsys.readouterr().err

    pairs = tmp_path / "pairs.csv"
    pairs.write_text("image,caption\n" + "".join(f"{f},a picture\n" for f in files[:3]))
    assert main(["score", "--model", ckpt, "--pairs", str(pairs), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["count"] == 3 and result["w"] == 2.5

    onnx = str(tmp_path / "onnx")
    assert main(["export-onnx", ckpt, onnx]) == 0
    capsys.readouterr()
    assert main(["classify", str(files[0]), "--model", onnx, "--runtime", "onnx", "--labels", "a,b"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["path"] == str(files[0])
    argv = ["classify", str(files[0]), "--model", onnx, "--runtime", "onnx", "--labels", "a,b"]
    assert main([*argv, "--precision", "bf16"]) == 1  # the graph's precision is fixed: said, not ignored
    assert "is for the torch runtime" in capsys.readouterr().err
    # an ONNX run of the same model appends to the torch run's directory (same fingerprint)
    write_images(photos / "more", 2, seed=3)
    rc = main(
        [
            "embed",
            "--model",
            onnx,
            "--runtime",
            "onnx",
            "--data",
            str(photos),
            "--out",
            emb,
            "--append",
            "--no-progress",
            "--workers",
            "0",
        ]
    )
    assert rc == 0 and "10 rows" in capsys.readouterr().out
    assert main(["index", emb]) == 0 and "of 8 image vectors" in capsys.readouterr().out  # 10 - 2 deleted


def test_cli_errors_are_one_line(tmp_path, capsys):
    ckpt = str(tiny_checkpoint(tmp_path / "ckpt"))
    assert main(["search", str(tmp_path / "nothing"), "x"]) == 1
    err = capsys.readouterr().err
    assert "manifest.json not found" in err and "Traceback" not in err
    assert main(["classify", "x.jpg", "--model", ckpt]) == 1
    assert "no labels" in capsys.readouterr().err


def test_cli_embed_fast_decode_is_recorded(tmp_path, capsys):
    ckpt = str(tiny_checkpoint(tmp_path / "ckpt"))
    photos = tmp_path / "photos"
    write_images(photos, 4, size=(90, 70))
    emb = tmp_path / "emb"
    argv = ["embed", "--model", ckpt, "--data", str(photos), "--out", str(emb), "--workers", "0"]
    assert main([*argv, "--no-progress", "--fast-decode"]) == 0
    assert "4 rows" in (out := capsys.readouterr().out) and "fast JPEG decoding" in out
    assert json.loads((emb / "manifest.json").read_text())["fast_decode"] is True


@pytest.mark.parametrize("native", [False, True])
def test_cli_warns_in_one_line_where_bf16_is_slow(tmp_path, capsys, monkeypatch, native):
    """--precision bf16 on a CPU without bf16 matrix instructions (5x to 400x slower than fp32 there)
    says so once, as one line, and still embeds; on a bf16-capable CPU, or a GPU, nothing is said."""
    from clipforge.models import hardware

    monkeypatch.setattr(hardware, "native_bf16_cpu", lambda: native)
    assert hardware.slow_bf16_reason("cuda") is None
    ckpt = str(tiny_checkpoint(tmp_path / "ckpt"))
    write_images(tmp_path / "photos", 2)
    argv = ["embed", "--model", ckpt, "--data", str(tmp_path / "photos"), "--out", str(tmp_path / "emb")]
    assert main([*argv, "--workers", "0", "--no-progress", "--precision", "bf16"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "bf16" in line]
    if native:
        assert err == []
    else:
        assert len(err) == 1 and err[0].startswith("clipforge embed: warning: this CPU has no bf16 matrix")
        assert err[0].endswith("slower than fp32 here; use fp32")
    assert json.loads((tmp_path / "emb" / "manifest.json").read_text())["count"] == 2
