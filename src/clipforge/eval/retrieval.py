"""Image-text retrieval recall@k with several captions per image, computed in tiles.

The rank of the correct item is the number of wrong candidates scoring strictly higher than it, so
recall@k is `rank < k`. Counting in (chunk x chunk) tiles gives exact results with O(chunk^2) memory: 100k
images x 500k captions never needs the full matrix.

- text -> image: a caption is a hit when its image is in the top k images.
- image -> text: an image is a hit when ANY of its captions is in the top k captions, i.e. when the
  best-scoring of its captions ranks below k. An image without captions counts as a miss.
Ties are counted in the item's favour (only strictly higher scores push it down).
Metric names follow CLIP_benchmark: "image_retrieval_recall@k" (text -> image) and
"text_retrieval_recall@k" (image -> text).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .features import encode_images, encode_texts


@torch.no_grad()
def retrieval_ranks(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    chunk_size: int = 4096,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ranks of each caption's image among images (M,), rank of each image's best caption (N,)); 0 = top."""
    device = torch.device(device) if device is not None else image_features.device
    img = F.normalize(image_features.float(), dim=-1).to(device)  # (N, D)
    txt = F.normalize(text_features.float(), dim=-1).to(device)  # (M, D)
    t2i = torch.as_tensor(text_to_image).long().to(device)  # (M,)
    n, m = len(img), len(txt)
    if len(t2i) != m:
        raise ValueError(f"text_to_image has {len(t2i)} entries but there are {m} captions")
    if m and (t2i.min() < 0 or t2i.max() >= n):
        raise ValueError(f"text_to_image holds image indices outside [0, {n})")
    pos = torch.empty(m, device=device)  # score of each caption with its own image
    for s in range(0, m, chunk_size):
        pos[s : s + chunk_size] = (txt[s : s + chunk_size] * img[t2i[s : s + chunk_size]]).sum(-1)
    best = torch.full((n,), -torch.inf, device=device)  # best score among each image's captions
    best.scatter_reduce_(0, t2i, pos, reduce="amax")

    text_rank = torch.zeros(m, dtype=torch.long, device=device)
    image_rank = torch.zeros(n, dtype=torch.long, device=device)
    for ts in range(0, m, chunk_size):
        t = txt[ts : ts + chunk_size]
        p = pos[ts : ts + chunk_size, None]
        for is_ in range(0, n, chunk_size):
            sims = t @ img[is_ : is_ + chunk_size].T  # (tc, ic)
            # only non-matching pairs push an item down (also keeps matmul-vs-dot rounding out of it)
            neg = t2i[ts : ts + chunk_size, None] != torch.arange(is_, is_ + sims.shape[1], device=device)
            text_rank[ts : ts + chunk_size] += ((sims > p) & neg).sum(1)
            image_rank[is_ : is_ + chunk_size] += ((sims > best[None, is_ : is_ + chunk_size]) & neg).sum(0)
    # an image without captions is a miss at every k (counting would give it rank M, a hit for k > M)
    image_rank[best == -torch.inf] = torch.iinfo(torch.long).max
    return text_rank.cpu(), image_rank.cpu()


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 4096,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """{"image_retrieval_recall@k" (text->image), "text_retrieval_recall@k" (image->text)} for k in ks."""
    text_rank, image_rank = retrieval_ranks(image_features, text_features, text_to_image, chunk_size, device)
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = (text_rank < k).double().mean().item()
        out[f"text_retrieval_recall@{k}"] = (image_rank < k).double().mean().item()
    return out


def flatten_captions(captions_per_image: Sequence[Sequence[str]]) -> tuple[list[str], torch.Tensor]:
    """[[caps of image 0], [caps of image 1], ...] -> (flat captions, text_to_image)."""
    texts, t2i = [], []
    for i, caps in enumerate(captions_per_image):
        texts.extend(caps)
        t2i.extend([i] * len(caps))
    return texts, torch.tensor(t2i, dtype=torch.long)


class RetrievalEvaluator:
    """big_vision-style evaluator: `run(model, tokenizer) -> recall@k metrics`.

    `images`: tensor (N, 3, S, S), Dataset or DataLoader (in image-index order); `captions`: flat list of
    strings (or token ids (M, T)) with `text_to_image`, or a list of caption lists (one per image).
    """

    def __init__(
        self,
        images,
        captions: Sequence[str] | Sequence[Sequence[str]] | torch.Tensor,
        text_to_image: torch.Tensor | Sequence[int] | None = None,
        ks: Sequence[int] = (1, 5, 10),
        batch_size: int = 256,
        chunk_size: int = 4096,
        prefix: str = "",
    ) -> None:
        if text_to_image is None:
            captions, text_to_image = flatten_captions(captions)
        self.images, self.captions = images, captions
        self.text_to_image = torch.as_tensor(text_to_image).long()
        self.ks, self.batch_size, self.chunk_size, self.prefix = tuple(ks), batch_size, chunk_size, prefix

    def run(self, model: torch.nn.Module, tokenizer, device=None) -> dict[str, float]:
        img, _ = encode_images(model, self.images, self.batch_size, device)
        txt = encode_texts(model, tokenizer, self.captions, self.batch_size, device)
        metrics = retrieval_metrics(img, txt, self.text_to_image, self.ks, self.chunk_size, device)
        return {f"{self.prefix}{k}": v for k, v in metrics.items()}
