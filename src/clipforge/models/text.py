"""Causal text Transformer with EOT pooling (Radford et al. 2021, sec. 2.4)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import TextConfig
from .transformer import LayerNorm, Transformer


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig, embed_dim: int) -> None:
        super().__init__()
        self.context_length = cfg.context_length
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.act)
        self.ln_final = LayerNorm(cfg.width)
        self.proj = nn.Parameter(torch.empty(cfg.width, embed_dim))

    def init_weights(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        nn.init.normal_(self.proj, std=self.transformer.width**-0.5)
        self.transformer.init_weights()

    # Tower contract (models/towers.py).
    def blocks(self) -> list[nn.Module]:
        return list(self.transformer.blocks)

    def head(self) -> list[nn.Parameter]:
        return [*self.ln_final.parameters(), self.proj]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, T) token ids -> (N, embed_dim), the projected feature at each row's EOT (largest id).

        Attention is causal, so the EOT feature depends only on positions up to it: the batch is cut
        to its longest EOT position + 1 before the Transformer. Exact, and typical captions use 15-25
        of 77 positions.
        """
        if tokens.dim() != 2:
            raise ValueError(f"token ids must be (N, T), got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.context_length:
            raise ValueError(f"{tokens.shape[1]} tokens exceed the context length {self.context_length}")
        if tokens.numel():  # nn.Embedding's own error is an IndexError with no numbers in it
            lo, hi = (int(v) for v in torch.aminmax(tokens))
            vocab = self.token_embedding.num_embeddings
            if lo < 0 or hi >= vocab:
                raise ValueError(
                    f"token id {lo if lo < 0 else hi} is outside this model's vocabulary (0..{vocab - 1}): "
                    "were the texts tokenized with another model's tokenizer?"
                )
        eot = tokens.argmax(dim=-1)  # (N,)
        T = int(eot.max()) + 1 if tokens.shape[0] else 1
        x = self.token_embedding(tokens[:, :T]) + self.pos_embed[:T].to(self.token_embedding.weight.dtype)
        x = self.transformer(x, causal=True)  # (N, T, w)
        x = self.ln_final(x[torch.arange(x.shape[0], device=x.device), eot])  # (N, w)
        return x @ self.proj.to(x.dtype)
