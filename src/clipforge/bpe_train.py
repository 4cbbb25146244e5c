"""Learn byte-level BPE merges from word counts: the algorithm behind `clipforge.tokenizer.train_bpe`.

    tok = train_bpe(captions, vocab_size=2048)   # clipforge.tokenizer: cuts words, calls learn_merges

A small, deterministic trainer: given words cut exactly as `Tokenizer` cuts them (cleaning, OpenAI's
regex, byte map), each word's last symbol gets `</w>` and the most frequent adjacent pair is merged
until the vocabulary is full. Ties go to the lexicographically smallest pair, so the same corpus always gives
the same vocabulary in every process (HF `tokenizers`' trainer breaks ties by hash order, which made
ranks of a distributed job disagree). Pair counts are updated incrementally, touching only the words
that contain the merged pair.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, defaultdict

# This module imports nothing from clipforge: `tokenizer` uses it, never the other way round.
EOW = "</w>"  # marks the last symbol of a word
Pair = tuple[str, str]


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
