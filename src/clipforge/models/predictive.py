"""The models behind the CLIP paper's Figure 2: a captioner, a bag-of-words predictor, and a bag-of-words
text tower for the contrastive line.

All three use the same image towers as CLIP (`build_image_tower`). The predictive models turn an image
into vocabulary logits (clipforge.loss.PREDICTIVE_OBJECTIVES gives their losses) and classify zero-shot
by scoring each class prompt (`class_scores(pixels, prompt_tokens) -> (N, C)`, higher is better):
- `Captioner`: a causal Transformer decoder whose first position is the projected image feature (a
  prefix, as in ClipCap / SimVLM); the score is the prompt's log-likelihood given the image.
- `BoWPredictor`: a linear head from the image feature to the vocabulary (Joulin et al. 2016); the score
  is the summed log-probability of the prompt's tokens.
- `BagOfWordsText`: the mean of the caption's token embeddings, projected: the text encoder of Figure
  2's "bag of words contrastive (CLIP)" line, used as `CLIP(cfg, text_tower=BagOfWordsText(...))`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig, VisionConfig
from ..loss import bow_loss, bow_targets, caption_loss, next_token_targets
from .towers import build_image_tower
from .transformer import LayerNorm, Transformer


def _trim(tokens: torch.Tensor) -> torch.Tensor:
    """Cut a batch after its longest caption's EOT (the largest id of each row)."""
    return tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]


class BagOfWordsText(nn.Module):
    """(N, T) ids -> (N, embed_dim): LayerNorm(mean of the token embeddings, SOT/EOT/padding excluded) @ proj.
    Order-free by construction. Has the tower contract (no blocks; the head is the norm and projection)."""

    def __init__(self, vocab_size: int, width: int, embed_dim: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.ln_final = LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, embed_dim))

    def init_weights(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.proj, std=self.proj.shape[0] ** -0.5)

    def blocks(self) -> list[nn.Module]:
        return []

    def head(self) -> list[nn.Parameter]:
        return [*self.ln_final.parameters(), self.proj]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        pass  # nothing worth recomputing

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        bag = bow_targets(tokens, self.token_embedding.num_embeddings)  # (N, V) normalised counts
        x = bag @ self.token_embedding.weight  # (N, width): the mean embedding of the caption's tokens
        return self.ln_final(x) @ self.proj


class BoWPredictor(nn.Module):
    """Image tower -> linear head over the vocabulary, trained with `bow_loss`."""

    def __init__(self, vision: VisionConfig, embed_dim: int, vocab_size: int) -> None:
        super().__init__()
        self.visual = build_image_tower(vision, embed_dim)
        self.head = nn.Linear(embed_dim, vocab_size)
        self.init_weights()

    def init_weights(self) -> None:
        self.visual.init_weights()
        nn.init.normal_(self.head.weight, std=self.head.in_features**-0.5)
        nn.init.zeros_(self.head.bias)

    def predict(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, V) logits of the caption's bag of tokens."""
        return self.head(self.visual(pixels))

    def loss(self, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return bow_loss(self.predict(pixels), tokens)

    @torch.no_grad()
    def class_scores(self, pixels: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """(N, C): sum over each prompt's tokens (with multiplicity) of log p(token | image)."""
        logp = F.log_softmax(self.predict(pixels).float(), dim=-1)  # (N, V)
        counts = bow_targets(prompts, logp.shape[-1]) * _word_counts(prompts)[:, None]  # (C, V) raw counts
        return logp @ counts.T


def _word_counts(tokens: torch.Tensor) -> torch.Tensor:
    """(N,) tokens between SOT and EOT per row."""
    return (tokens.argmax(dim=-1) - 1).clamp(min=0).float()


class Captioner(nn.Module):
    """Image tower -> prefix embedding -> causal Transformer decoder -> next-token logits (`caption_loss`).

    The decoder input is [image prefix, SOT, w1, ..., wk] and position j >= 1 predicts token j, so every
    token of the caption, EOT included, is predicted from the image and the tokens before it."""

    def __init__(self, vision: VisionConfig, embed_dim: int, text: TextConfig) -> None:
        super().__init__()
        self.visual = build_image_tower(vision, embed_dim)
        self.prefix = nn.Linear(embed_dim, text.width)
        self.token_embedding = nn.Embedding(text.vocab_size, text.width)
        self.pos_embed = nn.Parameter(torch.empty(text.context_length + 1, text.width))
        self.transformer = Transformer(text.width, text.layers, text.heads, text.mlp_ratio, text.act)
        self.ln_final = LayerNorm(text.width)
        self.lm_head = nn.Linear(text.width, text.vocab_size, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        self.visual.init_weights()
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        nn.init.normal_(self.lm_head.weight, std=self.lm_head.in_features**-0.5)
        self.transformer.init_weights()

    def _decode(self, prefix: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """prefix (B, w), tokens (B, T) -> (B, T-1, V): the logits of tokens[:, 1:]."""
        x = torch.cat([prefix[:, None], self.token_embedding(tokens[:, :-1])], dim=1)  # (B, T, w)
        x = x + self.pos_embed[: x.shape[1]].to(x.dtype)
        h = self.ln_final(self.transformer(x, causal=True))
        return self.lm_head(h[:, 1:])

    def predict(self, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S), (N, T) -> (N, T-1, V) next-token logits (T: the batch cut after its last EOT)."""
        return self._decode(self.prefix(self.visual(pixels)), _trim(tokens))

    def loss(self, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        tokens = _trim(tokens)
        return caption_loss(self.predict(pixels, tokens), tokens)

    @torch.no_grad()
    def class_scores(self, pixels: torch.Tensor, prompts: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """(N, C): log p(prompt | image), summed over the prompt's tokens after SOT (EOT included)."""
        prompts = _trim(prompts)
        prefix = self.prefix(self.visual(pixels))  # (N, w)
        targets, mask = next_token_targets(prompts)  # (C, T-1)
        n, c = prefix.shape[0], prompts.shape[0]
        per = max(1, chunk // c)
        rows = []
        for i in range(0, n, per):
            p = prefix[i : i + per]  # (b, w)
            b = p.shape[0]
            logits = self._decode(p.repeat_interleave(c, dim=0), prompts.repeat(b, 1))  # (b*C, T-1, V)
            logp = F.log_softmax(logits.float(), dim=-1).gather(-1, targets.repeat(b, 1)[..., None])[..., 0]
            rows.append((logp * mask.repeat(b, 1)).sum(dim=-1).view(b, c))
        return torch.cat(rows)
