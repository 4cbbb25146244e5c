"""Reading tokenizer files: OpenAI's `bpe_simple_vocab_16e6.txt.gz`, HF's vocab.json + merges.txt, and
HF's tokenizer.json, each to a vocabulary and/or merge list that `tokenizer.Tokenizer` checks and loads.

Imports nothing from `tokenizer` (which re-exports `find_openai_vocab` and `OPENAI_VOCAB_FILE` from here).
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
from pathlib import Path

from .bpe_train import EOW

OPENAI_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"


def find_openai_vocab() -> Path:
    """Locate OpenAI's vocabulary inside an installed open_clip_torch or openai-clip, without importing it."""
    for dist_name in ("open_clip_torch", "openai-clip"):
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            continue
        for f in dist.files or ():
            if f.name == OPENAI_VOCAB_FILE:
                p = Path(str(dist.locate_file(f)))
                if p.is_file():
                    return p
    raise FileNotFoundError(
        f"OpenAI's BPE vocabulary ({OPENAI_VOCAB_FILE}) was not found in an installed package; pass its path "
        "(Tokenizer.from_openai_vocab(path)) or `pip install --no-deps open_clip_torch`"
    )


def _read_openai_merges(path: Path, num_merges: int) -> list[tuple[str, str]]:
    """The first `num_merges` merges of OpenAI's file (`path`, or the directory holding it)."""
    if path.is_dir():
        path = path / OPENAI_VOCAB_FILE
    if not path.is_file():
        raise FileNotFoundError(f"OpenAI BPE vocabulary not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : num_merges + 1]]
    bad = [(i + 1, m) for i, m in enumerate(merges) if len(m) != 2]
    if bad:
        raise ValueError(f"{path}: line {bad[0][0]} is not a merge ('a b'): {bad[0][1]!r}")
    return merges


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _token_str(tok) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


def _read_vocab_merges(vocab_path: Path, merges_path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    for p in (vocab_path, merges_path):
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {p}")
    vocab = _read_json(vocab_path)
    merges = []
    for n, line in enumerate(merges_path.read_text(encoding="utf-8").split("\n")):
        if not line.strip() or (n == 0 and line.startswith("#version")):
            continue
        pair = tuple(line.split())
        if len(pair) != 2:
            raise ValueError(f"{merges_path}: line {n + 1} is not a merge ('a b'): {line!r}")
        merges.append(pair)
    return vocab, merges


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    data = _read_json(path)
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("end_of_word_suffix") != EOW:
        raise ValueError(
            f"{path}: not a CLIP-style BPE tokenizer (model type {model.get('type')!r}, "
            f"end_of_word_suffix {model.get('end_of_word_suffix')!r}; expected 'BPE' and {EOW!r})"
        )
    vocab = dict(model["vocab"])
    for tok in data.get("added_tokens") or ():
        vocab.setdefault(tok["content"], tok["id"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", ())]
    return vocab, merges
