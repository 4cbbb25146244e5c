"""OpenAI-compatible byte-level BPE tokenizer (CLIP's "simple tokenizer"), its loaders, and BPE training.

    tok = Tokenizer.from_openai_vocab()          # finds bpe_simple_vocab_16e6.txt.gz in an installed package
    tok(["a photo of a dog."])                   # LongTensor (1, 77): [49406, 320, 1125, ..., 49407, 0, ...]
    tok = train_bpe(captions, vocab_size=2048)   # a new vocabulary for training from scratch
    tok.save("out/"); Tokenizer.load("out/")     # vocab.json + merges.txt + tokenizer_config.json

The ids equal OpenAI's `clip.simple_tokenizer.SimpleTokenizer` for any Unicode text: the text is cleaned
(ftfy, HTML unescaped twice, whitespace collapsed, lowercased), split with OpenAI's regex, each piece
mapped byte-wise to printable characters (GPT-2's byte map), its last symbol marked with `</w>`, and
merged by BPE rank. Sequences are `[SOT] ids [EOT]` zero-padded to the context length. The EOT id is
always the largest id of the vocabulary, because the text tower pools at `argmax(token id)`.

Reading the vocabulary files is `tokenizer_files.py`; learning merges is `bpe_train.py`.
"""

from __future__ import annotations

import html
import itertools
import json
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import ftfy
import regex
import torch

from .bpe_train import EOW, learn_merges
from .tokenizer_files import OPENAI_VOCAB_FILE as OPENAI_VOCAB_FILE  # re-exported; the readers live there
from .tokenizer_files import (
    _read_json,
    _read_openai_merges,
    _read_tokenizer_json,
    _read_vocab_merges,
    _token_str,
    find_openai_vocab,
)

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
OPENAI_NUM_MERGES = 49152 - 256 - 2  # lines 1..48894 of the file; line 0 is a header
CLEAN_MODES = ("openai", "whitespace")  # "whitespace": collapse + lowercase only (no ftfy / HTML unescape)
_CACHE_MAX = 131_072  # words kept in the per-instance BPE cache before it is cleared
# After the specials, OpenAI's pattern: contractions, letter runs, single digits, other non-space runs.
_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_WHITESPACE = regex.compile(r"\s+")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte map: every byte to a printable character (printable Latin-1 bytes map to themselves)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_BYTE_ENCODER = bytes_to_unicode()
_BYTE_DECODER = {c: b for b, c in _BYTE_ENCODER.items()}
# str.translate table: a latin-1 decoded byte string -> its byte-map characters
_BYTE_TRANSLATE = {b: c for b, c in _BYTE_ENCODER.items()}


def base_symbols() -> list[str]:
    """The 512 symbols every vocabulary starts with: the 256 byte characters, then the same with `</w>`."""
    chars = list(_BYTE_ENCODER.values())
    return chars + [c + EOW for c in chars]


def clean_text(text: str, mode: str = "openai") -> str:
    """OpenAI's cleaning: ftfy.fix_text, html.unescape twice, strip, collapse whitespace, lowercase."""
    if mode == "openai":
        # ftfy leaves printable ASCII without HTML entities untouched (tested against the reference),
        # and it is the slowest step, so skip it there.
        if not (text.isascii() and text.isprintable() and "&" not in text):
            text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text)).strip()
    elif mode != "whitespace":
        raise ValueError(f"unknown cleaning mode {mode!r}; expected one of {CLEAN_MODES}")
    return _WHITESPACE.sub(" ", text).strip().lower()


def word_pattern(specials: Sequence[str] = (SOT, EOT)) -> regex.Pattern:
    """OpenAI's split of cleaned text into BPE words; `pattern.findall(text)` (specials stay whole)."""
    alternatives = [regex.escape(s) for s in specials] + [_WORD_PATTERN]
    return regex.compile("|".join(alternatives), regex.IGNORECASE)


def byte_encode(word: str) -> str:
    """UTF-8 bytes of `word` as byte-map characters (lone surrogates pass through as their bytes)."""
    return word.encode("utf-8", "surrogatepass").decode("latin-1").translate(_BYTE_TRANSLATE)


class Tokenizer:
    """Byte-level BPE with `</w>` word ends; `tokenizer(texts)` -> LongTensor (N, context_length)."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        context_length: int = 77,
        sot_token: str = SOT,
        eot_token: str = EOT,
        clean: str = "openai",
    ):
        if clean not in CLEAN_MODES:
            raise ValueError(f"unknown cleaning mode {clean!r}; expected one of {CLEAN_MODES}")
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (SOT and EOT), got {context_length}")
        for name, tok in (("SOT", sot_token), ("EOT", eot_token)):
            if tok not in vocab:
                raise ValueError(f"{name} token {tok!r} is not in the vocabulary")
        missing = [s for s in base_symbols() if s not in vocab]
        if missing:
            raise ValueError(
                f"vocabulary lacks {len(missing)} of the 512 byte symbols (e.g. {missing[:3]}); "
                "it is not a byte-level BPE vocabulary with '</w>' word ends"
            )
        merges = [tuple(m) for m in merges]
        unknown = [m for m in merges if len(m) != 2 or m[0] + m[1] not in vocab]
        if unknown:
            raise ValueError(
                f"{len(unknown)} merges produce symbols missing from the vocabulary: {unknown[:3]}"
            )
        self.vocab_size = max(vocab.values()) + 1
        if vocab[eot_token] != self.vocab_size - 1:
            raise ValueError(
                f"the EOT token {eot_token!r} has id {vocab[eot_token]}, but it must be the largest id "
                f"({self.vocab_size - 1}): the text tower pools at argmax(token id)"
            )
        self.encoder = dict(vocab)
        self.decoder = {i: s for s, i in vocab.items()}
        self.merges = merges
        self.bpe_ranks = {m: r for r, m in enumerate(merges)}
        self.context_length = context_length
        self.sot_token, self.eot_token = sot_token, eot_token
        self.sot_token_id, self.eot_token_id = vocab[sot_token], vocab[eot_token]
        self.clean = clean
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._pattern = word_pattern((self.sot_token, self.eot_token))
        self._specials = {self.sot_token: self.sot_token_id, self.eot_token: self.eot_token_id}
        self._cache: dict[str, list[int]] = {}

    def __getstate__(self) -> dict:  # picklable for DataLoader workers; the cache stays behind
        return {k: v for k, v in self.__dict__.items() if k not in ("_pattern", "_specials", "_cache")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
            f"context_length={self.context_length}, clean={self.clean!r})"
        )

    # ---- encoding -------------------------------------------------------------------------------------

    def bpe(self, word: str) -> list[str]:
        """BPE symbols of one byte-encoded word: repeatedly merge the adjacent pair of lowest rank."""
        symbols = [*word[:-1], word[-1] + EOW]
        ranks = self.bpe_ranks
        while len(symbols) > 1:
            best, best_rank = None, len(ranks)
            for pair in itertools.pairwise(symbols):
                r = ranks.get(pair, best_rank)
                if r < best_rank:
                    best, best_rank = pair, r
            if best is None:
                break
            first, second = best
            merged, i, n = [], 0, len(symbols)
            while i < n:  # every non-overlapping occurrence, left to right
                if i < n - 1 and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _word_ids(self, word: str) -> list[int]:
        ids = self._cache.get(word)
        if ids is None:
            special = self._specials.get(word)
            ids = [special] if special is not None else [self.encoder[s] for s in self.bpe(byte_encode(word))]
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without SOT/EOT."""
        ids: list[int] = []
        cache = self._cache
        for word in self._pattern.findall(clean_text(text, self.clean)):
            hit = cache.get(word)
            ids.extend(hit if hit is not None else self._word_ids(word))
        return ids

    def __call__(
        self, texts: str | Sequence[str], context_length: int | None = None, truncate: bool = False
    ) -> torch.Tensor:
        """LongTensor (N, context_length): `[SOT] ids [EOT]` then zeros.

        Too long a text raises a ValueError unless `truncate`, which (like OpenAI) keeps the first
        `context_length` tokens and makes the last one EOT.
        """
        if isinstance(texts, str):
            texts = [texts]
        ctx = self.context_length if context_length is None else context_length
        if ctx < 2:
            raise ValueError(f"context_length must be >= 2 (SOT and EOT), got {ctx}")
        sot, eot = self.sot_token_id, self.eot_token_id
        rows = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {i} is a {type(text).__name__}, not a str")
            tokens = [sot, *self.encode(text), eot]
            if len(tokens) > ctx:
                if not truncate:
                    short = text if len(text) <= 60 else text[:57] + "..."
                    raise ValueError(
                        f"text {i} ({short!r}) has {len(tokens)} tokens with SOT/EOT, more than "
                        f"context_length={ctx}; shorten it or pass truncate=True"
                    )
                tokens = tokens[:ctx]
                tokens[-1] = eot
            else:
                tokens.extend([0] * (ctx - len(tokens)))
            rows.append(tokens)
        if not rows:
            return torch.zeros(0, ctx, dtype=torch.long)
        return torch.tensor(rows, dtype=torch.long)

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (words separated by spaces, as OpenAI's decode).

        With `skip_special_tokens`, SOT/EOT are dropped, and so are the zeros (padding) after the last EOT.
        """
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if skip_special_tokens:
            if self.eot_token_id in ids:  # drop the zero padding after the last EOT
                last = len(ids) - 1 - ids[::-1].index(self.eot_token_id)
                if not any(ids[last + 1 :]):
                    ids = ids[:last]
            ids = [i for i in ids if i not in (self.sot_token_id, self.eot_token_id)]
        try:
            text = "".join(self.decoder[i] for i in ids)
        except KeyError as e:
            raise ValueError(
                f"token id {e.args[0]} is not in the vocabulary (size {self.vocab_size})"
            ) from None
        data = bytearray(_BYTE_DECODER[c] for c in text)
        return data.decode("utf-8", errors="replace").replace(EOW, " ")

    # ---- loading and saving ---------------------------------------------------------------------------

    @classmethod
    def from_merges(cls, merges: Sequence[tuple[str, str]], **kwargs) -> Tokenizer:
        """OpenAI's vocabulary layout: 512 byte symbols, one symbol per merge, then SOT and EOT."""
        vocab_list = base_symbols() + ["".join(m) for m in merges] + [SOT, EOT]
        vocab = {s: i for i, s in enumerate(vocab_list)}  # a repeated symbol keeps its last id, as OpenAI's
        return cls(vocab, merges, **kwargs)

    @classmethod
    def from_openai_vocab(
        cls, path: str | Path | None = None, context_length: int = 77, num_merges: int = OPENAI_NUM_MERGES
    ) -> Tokenizer:
        """From OpenAI's `bpe_simple_vocab_16e6.txt.gz`: the path given, or the copy a package ships."""
        merges = _read_openai_merges(Path(path) if path is not None else find_openai_vocab(), num_merges)
        return cls.from_merges(merges, context_length=context_length)

    @classmethod
    def from_hf(cls, path: str | Path, context_length: int | None = None) -> Tokenizer:
        """From a HF tokenizer: a directory or file path (vocab.json + merges.txt, or tokenizer.json)."""
        path = Path(path)
        d = path if path.is_dir() else path.parent
        config = _read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else {}
        if path.is_dir():
            if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
                vocab, merges = _read_vocab_merges(d / "vocab.json", d / "merges.txt")
            elif (d / "tokenizer.json").is_file():
                vocab, merges = _read_tokenizer_json(d / "tokenizer.json")
            else:
                raise FileNotFoundError(f"no vocab.json + merges.txt or tokenizer.json in {d}")
        elif path.name == "merges.txt" or path.name == "vocab.json":
            vocab, merges = _read_vocab_merges(d / "vocab.json", d / "merges.txt")
        elif path.is_file():
            vocab, merges = _read_tokenizer_json(path)
        else:
            raise FileNotFoundError(f"tokenizer path not found: {path}")
        if context_length is None:
            context_length = config.get("context_length")
        if context_length is None:
            max_len = config.get("model_max_length")
            context_length = int(max_len) if isinstance(max_len, (int, float)) and max_len < 100_000 else 77
        return cls(
            vocab,
            merges,
            context_length=context_length,
            sot_token=config.get("sot_token") or _token_str(config.get("bos_token")) or SOT,
            eot_token=config.get("eot_token") or _token_str(config.get("eos_token")) or EOT,
            clean=config.get("clean", "openai"),
        )

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Load what `save` wrote (vocab.json, merges.txt, tokenizer_config.json)."""
        d = Path(directory)
        missing = [n for n in ("vocab.json", "merges.txt", "tokenizer_config.json") if not (d / n).is_file()]
        if missing:
            raise FileNotFoundError(f"not a saved clipforge tokenizer: {d} lacks {', '.join(missing)}")
        return cls.from_hf(d)

    def save(self, directory: str | Path) -> None:
        """Write vocab.json, merges.txt, tokenizer_config.json (HF CLIPTokenizer reads them too)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        vocab = dict(sorted(self.encoder.items(), key=lambda kv: kv[1]))
        (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        merges = "\n".join(f"{a} {b}" for a, b in self.merges)
        (d / "merges.txt").write_text("#version: 0.2\n" + merges + "\n", encoding="utf-8")
        config = {
            "tokenizer_class": "CLIPTokenizer",  # the HF class that reads these files
            "context_length": self.context_length,
            "model_max_length": self.context_length,
            "sot_token": self.sot_token,
            "eot_token": self.eot_token,
            "bos_token": self.sot_token,
            "eos_token": self.eot_token,
            "unk_token": self.eot_token,
            "pad_token": self.eot_token,  # HF pads with EOT; clipforge pads with id 0, as OpenAI
            "pad_id": 0,
            "clean": self.clean,
        }
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def count_words(texts: Iterable[str], clean: str = "openai") -> Counter[str]:
    """{byte-mapped word: count} over captions, words cut exactly as `Tokenizer` cuts them."""
    pattern = word_pattern((SOT, EOT))
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(byte_encode(w) for w in pattern.findall(clean_text(text, clean)) if w not in (SOT, EOT))
    return counts


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    context_length: int = 77,
    min_frequency: int = 2,
    clean: str = "openai",
) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` ids on captions (merges: `bpe_train.learn_merges`).

    The layout is OpenAI's (512 byte symbols, merged symbols, SOT, EOT last), so the result loads into
    `Tokenizer` and the text tower pools at the largest id. A corpus too small to support `vocab_size`
    gives a smaller vocabulary, with a warning.
    """
    base = base_symbols()
    num_new = vocab_size - len(base) - 2
    if num_new < 0:
        raise ValueError(
            f"vocab_size must be at least {len(base) + 2} (byte symbols + SOT/EOT), got {vocab_size}"
        )
    merges = learn_merges(count_words(texts, clean), num_new, min_frequency)
    vocab = {s: i for i, s in enumerate(base)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    if len(vocab) < len(base) + num_new:
        warnings.warn(
            f"the corpus supports only {len(vocab) + 2} of the {vocab_size} ids asked for "
            f"(no pair occurs {min_frequency}+ times any more); the vocabulary is smaller",
            stacklevel=2,
        )
    vocab[SOT] = len(vocab)
    vocab[EOT] = len(vocab)
    return Tokenizer(vocab, merges, context_length=context_length, clean=clean)
