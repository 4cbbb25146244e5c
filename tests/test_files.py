"""Atomic writes (clipforge.files): a failed write leaves the old file and no temporary sibling; what is
written gets the umask's permissions (mkstemp alone gives 0600); .npy files keep their exact name."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from clipforge.files import (
    atomic_directory,
    atomic_file,
    is_leftover,
    write_json_atomic,
    write_npy_atomic,
    write_text_atomic,
)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    dst = tmp_path / "x.json"
    write_json_atomic(dst, {"a": 1})

    def half_then_fail(tmp):
        tmp.write_text('{"a": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_file(dst, half_then_fail)
    assert dst.read_text() == '{\n  "a": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_written_files_and_directories_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "t.txt", "hi")
        with atomic_directory(tmp_path / "d") as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "f.bin").write_bytes(b"1")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "t.txt") == 0o640
    assert _mode(tmp_path / "d") == 0o750
    assert _mode(tmp_path / "d" / "sub") == 0o750
    assert _mode(tmp_path / "d" / "sub" / "f.bin") == 0o640


def test_npy_keeps_its_exact_name_and_leftovers_are_recognised(tmp_path):
    arr = np.arange(6, dtype=np.float16).reshape(2, 3)
    write_npy_atomic(tmp_path / "deleted.npy", arr)
    write_npy_atomic(tmp_path / "plain", arr)  # np.save(name) would have written plain.npy
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deleted.npy", "plain"]
    np.testing.assert_array_equal(np.load(tmp_path / "plain"), arr)

    def interrupted(tmp):
        assert is_leftover(tmp)  # the temporary sibling a killed writer would leave behind
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_file(tmp_path / "deleted.npy", interrupted)
    assert not is_leftover(tmp_path / "deleted.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "deleted.npy"), arr)


def test_replacing_a_directory_swaps_it_whole(tmp_path):
    dst = tmp_path / "model"
    with atomic_directory(dst) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(dst) as tmp:
        (tmp / "a").write_text("new, half")
        raise RuntimeError("interrupted")
    assert (dst / "a").read_text() == "old"
    with atomic_directory(dst) as tmp:
        (tmp / "b").write_text("new")
    assert sorted(p.name for p in dst.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
