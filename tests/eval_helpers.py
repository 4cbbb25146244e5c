"""Shared helpers for the eval tests: a tiny model and a word-hashing tokenizer (no vocab files needed)."""

import torch

from clipforge import create_model


class WordTokenizer:
    """Deterministic stand-in for clipforge.tokenizer.Tokenizer: SOT, one id per word, EOT (largest id)."""

    sot, eot = 49406, 49407

    def __call__(self, texts, context_length=None, truncate=False):
        texts = [texts] if isinstance(texts, str) else list(texts)
        ctx = context_length or 77
        out = torch.zeros(len(texts), ctx, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [sum(ord(ch) * 31**j for j, ch in enumerate(w)) % 49000 + 1 for w in t.split()]
            ids = [self.sot, *ids[: ctx - 2], self.eot]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


def tiny_model():
    torch.manual_seed(0)
    return create_model("tiny-vit").eval()
