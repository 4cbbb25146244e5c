"""TEMPORARY stand-ins for modules other helpers are writing (loss, optim, tokenizer, synthetic data).

Each is replaced by the real module once it lands; nothing outside clipforge.train/demo imports this.
"""

from __future__ import annotations

import math
import random
import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw


def clip_loss(img, txt, logit_scale, lam: float = 0.5):
    logits = logit_scale * img @ txt.T
    labels = torch.arange(len(img), device=img.device)
    return lam * F.cross_entropy(logits, labels) + (1 - lam) * F.cross_entropy(logits.T, labels)


def siglip_loss(img, txt, logit_scale, logit_bias):
    logits = logit_scale * img @ txt.T + logit_bias
    z = 2 * torch.eye(len(img), device=img.device) - 1
    return -F.logsigmoid(z * logits).sum() / len(img)


def build_optimizer(model, lr, weight_decay, betas, eps):
    no_wd = model.no_weight_decay()
    decay = [p for n, p in model.named_parameters() if p.requires_grad and n not in no_wd]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and n in no_wd]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def cosine_schedule(optimizer, warmup: int, total: int, min_lr_ratio: float = 0.0):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


class WordTokenizer:
    """Word-level stand-in for train_bpe: ids 1..V-2 words, SOT = V-2, EOT = V-1 (largest)."""

    def __init__(self, words, context_length=32):
        self.words = sorted(words)
        self.ids = {w: i + 1 for i, w in enumerate(self.words)}
        self.sot_token_id = len(self.words) + 1
        self.eot_token_id = len(self.words) + 2
        self.vocab_size = len(self.words) + 3
        self.context_length = context_length

    def encode(self, text):
        return [self.ids.get(w, 1) for w in re.findall(r"[a-z]+", text.lower())]

    def __call__(self, texts, context_length=None, truncate=False):
        if isinstance(texts, str):
            texts = [texts]
        ctx = context_length or self.context_length
        out = torch.zeros(len(texts), ctx, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(t)][: ctx - 1] + [self.eot_token_id]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


def train_bpe(texts, vocab_size, context_length=77):
    words = {w for t in texts for w in re.findall(r"[a-z]+", t.lower())}
    return WordTokenizer(words, context_length)


COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 215, 40),
    "purple": (140, 50, 190), "orange": (245, 140, 30), "pink": (245, 130, 190), "cyan": (40, 210, 220),
}  # fmt: skip
SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond"]
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}
SIZES = {"small": 0.22, "medium": 0.32, "large": 0.42}


def held_out_combos():
    cols = list(COLOURS)
    return {(cols[i], SHAPES[i % len(SHAPES)]) for i in range(len(cols))}


def _draw(d, shape, cx, cy, r, fill):
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)], fill=fill)
    elif shape == "cross":
        w = r * 0.35
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    elif shape == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rr = r if k % 2 == 0 else r * 0.45
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        d.polygon(pts, fill=fill)


TEMPLATES = [
    "a {size} {colour} {shape} on a {bg} background",
    "a {colour} {shape}",
    "a picture of a {colour} {shape}",
    "there is a {size} {colour} {shape} in the {pos}",
    "{colour} {shape} on {bg}",
    "a drawing of one {colour} {shape} in the {pos}",
]


def render(colour, shape, rng, size=64):
    bg = rng.choice(list(BACKGROUNDS))
    sz = rng.choice(list(SIZES))
    img = Image.new("RGB", (size, size), BACKGROUNDS[bg])
    d = ImageDraw.Draw(img)
    r = SIZES[sz] * size
    cx = rng.uniform(r, size - r)
    cy = rng.uniform(r, size - r)
    _draw(d, shape, cx, cy, r, COLOURS[colour])
    pos = ("top" if cy < size / 2 else "bottom") + " " + ("left" if cx < size / 2 else "right")
    return img, {"colour": colour, "shape": shape, "bg": bg, "size": sz, "pos": pos}


def make_split(n, seed, combos, size=64, captions=True):
    rng = random.Random(seed)
    imgs, caps, labels = [], [], []
    combos = sorted(combos)
    for _ in range(n):
        c = rng.randrange(len(combos))
        img, a = render(*combos[c], rng, size)
        imgs.append(np.asarray(img))
        labels.append(c)
        if captions:
            caps.append(rng.choice(TEMPLATES).format(**a))
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()  # uint8 (N, 3, S, S)
    return x, caps, torch.tensor(labels), combos
