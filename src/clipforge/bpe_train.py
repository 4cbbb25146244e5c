"""Train a new byte-level BPE vocabulary on a caption corpus, in the layout `Tokenizer` reads.

    tok = train_bpe(captions, vocab_size=2048)   # also `clipforge.tokenizer.train_bpe`

HF `tokenizers` does the counting and merging; the words it sees are cut exactly as `Tokenizer` cuts
them, so the merges apply the same way at encoding time.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable

from clipforge.tokenizer import (
    EOT,
    EOW,
    SOT,
    Tokenizer,
    base_symbols,
    byte_encode,
    clean_text,
    word_pattern,
)


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    context_length: int = 77,
    min_frequency: int = 2,
    clean: str = "openai",
) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` ids on captions (HF `tokenizers` as the engine).

    The words are cut exactly as the tokenizer will cut them (cleaning, OpenAI's regex, byte map,
    `</w>` ends), so the merges load into `Tokenizer`; the layout is OpenAI's (512 byte symbols, merged
    symbols, SOT, EOT last). A corpus too small to support `vocab_size` gives a smaller vocabulary.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    base = base_symbols()
    num_new = vocab_size - len(base) - 2
    if num_new < 0:
        raise ValueError(
            f"vocab_size must be at least {len(base) + 2} (byte symbols + SOT/EOT), got {vocab_size}"
        )
    pattern = word_pattern((SOT, EOT))

    def words() -> Iterable[str]:
        for text in texts:
            # byte-map characters contain no whitespace, so a space-joined line splits back into the words
            yield " ".join(
                byte_encode(w) for w in pattern.findall(clean_text(text, clean)) if w not in (SOT, EOT)
            )

    engine = HFTokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix=EOW))
    engine.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=len(base) + num_new + 256,  # slack: a merge may repeat a symbol; we take what we need
        min_frequency=min_frequency,
        show_progress=False,
        initial_alphabet=base[:256],  # the 256 byte characters
        end_of_word_suffix=EOW,
        continuing_subword_prefix="",
    )
    engine.train_from_iterator(words(), trainer=trainer)
    model = json.loads(engine.to_str())["model"]
    trained = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]

    # Merges in creation order until `num_new` new symbols exist (a merge making an existing symbol is kept).
    vocab = {s: i for i, s in enumerate(base)}
    merges = []
    for a, b in trained:
        if a + b not in vocab:
            if len(vocab) == len(base) + num_new:
                break
            vocab[a + b] = len(vocab)
        merges.append((a, b))
    if len(vocab) < len(base) + num_new:
        warnings.warn(
            f"the corpus supports only {len(vocab) + 2} of the {vocab_size} ids asked for "
            f"(no pair occurs {min_frequency}+ times any more); the vocabulary is smaller",
            stacklevel=2,
        )
    vocab[SOT] = len(vocab)
    vocab[EOT] = len(vocab)
    return Tokenizer(vocab, merges, context_length=context_length, clean=clean)
