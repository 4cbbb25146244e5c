"""Train a new byte-level BPE vocabulary on a caption corpus, in the layout `Tokenizer` reads.

    tok = train_bpe(captions, vocab_size=2048)   # also `clipforge.tokenizer.train_bpe`

A small, deterministic trainer: words are cut exactly as `Tokenizer` cuts them (cleaning, OpenAI's
regex, byte map, `</w>` on the last symbol), then the most frequent adjacent pair is merged until the
vocabulary is full. Ties go to the lexicographically smallest pair, so the same corpus always gives
the same vocabulary in every process (HF `tokenizers`' trainer breaks ties by hash order, which made
ranks of a distributed job disagree). Pair counts are updated incrementally, touching only the words
that contain the merged pair.
"""

from __future__ import annotations

import heapq
import itertools
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable

from clipforge.tokenizer import EOT, EOW, SOT, Tokenizer, base_symbols, byte_encode, clean_text, word_pattern

Pair = tuple[str, str]


def _count_words(texts: Iterable[str], clean: str) -> Counter[str]:
    pattern = word_pattern((SOT, EOT))
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(byte_encode(w) for w in pattern.findall(clean_text(text, clean)) if w not in (SOT, EOT))
    return counts


def _pairs(symbols: list[str]) -> Counter[Pair]:
    return Counter(itertools.pairwise(symbols))


def _merge(symbols: list[str], pair: Pair) -> list[str]:
    a, b = pair
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def learn_merges(word_counts: Counter[str], num_merges: int, min_frequency: int = 2) -> list[Pair]:
    """BPE merges in creation order over `{byte-mapped word: count}`; at most `num_merges` of them."""
    words = [[*list(w[:-1]), w[-1] + EOW] for w in word_counts]  # symbols of each distinct word
    freqs = list(word_counts.values())
    counts: Counter[Pair] = Counter()
    where: defaultdict[Pair, set[int]] = defaultdict(set)  # pair -> indices of words containing it
    for i, symbols in enumerate(words):
        for pair, n in _pairs(symbols).items():
            counts[pair] += n * freqs[i]
            where[pair].add(i)
    # Max-heap on (count, then smallest pair); stale entries are skipped when popped.
    heap = [(-n, pair) for pair, n in counts.items()]
    heapq.heapify(heap)
    merges: list[Pair] = []
    while heap and len(merges) < num_merges:
        neg, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -neg:
            continue  # stale
        if -neg < min_frequency:
            break
        merges.append(pair)
        touched: set[Pair] = set()
        for i in sorted(where.pop(pair, ())):
            before = _pairs(words[i])
            words[i] = _merge(words[i], pair)
            after = _pairs(words[i])
            for p in before.keys() | after.keys():
                delta = (after.get(p, 0) - before.get(p, 0)) * freqs[i]
                if delta:
                    counts[p] += delta
                    touched.add(p)
                if p in after:
                    where[p].add(i)
                else:
                    where[p].discard(i)
        counts.pop(pair, None)
        for p in touched:
            if counts.get(p, 0) > 0:
                heapq.heappush(heap, (-counts[p], p))
            else:
                counts.pop(p, None)
    return merges


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    context_length: int = 77,
    min_frequency: int = 2,
    clean: str = "openai",
) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` ids on captions.

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
    merges = learn_merges(_count_words(texts, clean), num_new, min_frequency)
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
