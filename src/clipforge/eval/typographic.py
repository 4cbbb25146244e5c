"""The typographic attack (Goh et al. 2021, "Multimodal neurons"): write another class's name on the image.

CLIP reads: an apple with a handwritten "iPod" label is classified as an iPod. For every image of a
labelled set, `typographic_attack` writes the name of a different class (drawn per image from a seeded
RNG) onto it and reports:
- acc1_clean: zero-shot top-1 on the untouched images,
- acc1_attacked: top-1 on the written-on images,
- follow_word: the share of attacked images classified as the written class (chance: 1 / C),
- flipped_to_word: of the images classified correctly when clean, the share that follow the word.
Works for any model with `encode_image` / `encode_text` and its preprocess (whatever `clipforge.load`
returns).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..data.text_overlay import TextStyle, draw_word
from ..transforms import load_image
from .features import encode_images
from .zeroshot import zero_shot_classifier, zero_shot_logits

DEFAULT_STYLE = TextStyle()


def attack_targets(labels: Sequence[int], num_classes: int, seed: int = 0) -> list[int]:
    """A class other than the true one for every image, uniformly, from a seeded RNG."""
    if num_classes < 2:
        raise ValueError("a typographic attack needs at least 2 classes")
    rng = random.Random(f"typographic/{seed}")
    return [(int(y) + 1 + rng.randrange(num_classes - 1)) % num_classes for y in labels]


class WrittenOn(Dataset):
    """Items {"image", "label"}: each source (a path or a PIL image) with words[i] written on it (None:
    untouched), then `transform`."""

    def __init__(
        self,
        sources: Sequence[str | Path | Image.Image],
        labels: Sequence[int],
        transform: Callable,
        words: Sequence[str | None] | None = None,
        style: TextStyle = DEFAULT_STYLE,
        seed: int = 0,
    ) -> None:
        self.sources, self.labels, self.transform = list(sources), [int(y) for y in labels], transform
        self.words = list(words) if words is not None else [None] * len(self.sources)
        self.style, self.seed = style, seed
        if not len(self.sources) == len(self.labels) == len(self.words):
            raise ValueError(
                f"{len(self.sources)} images, {len(self.labels)} labels, {len(self.words)} words"
            )

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> dict:
        src = self.sources[i]
        img = src.convert("RGB") if isinstance(src, Image.Image) else load_image(src)
        if self.words[i] is not None:
            img = draw_word(img, self.words[i], self.style, random.Random(f"{self.seed}/{i}"))
        return {"image": self.transform(img), "label": self.labels[i]}


def typographic_attack(
    model: torch.nn.Module,
    tokenizer,
    sources: Sequence[str | Path | Image.Image],
    labels: Sequence[int],
    classnames: Sequence[str],
    transform: Callable,
    templates: Sequence[str] = ("a photo of a {c}.",),
    style: TextStyle = DEFAULT_STYLE,
    seed: int = 0,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    words: Sequence[str] | None = None,
) -> dict:
    """Clean and attacked zero-shot accuracy and how often the prediction follows the written word.

    `words` (default: the class names) are what gets written for each class: the attack writes
    words[target] where target is a class other than the true one (`attack_targets`)."""
    words = list(classnames) if words is None else list(words)
    if len(words) != len(classnames):
        raise ValueError(f"{len(words)} words for {len(classnames)} classes")
    targets = attack_targets(labels, len(classnames), seed)
    clf = zero_shot_classifier(model, tokenizer, classnames, templates, batch_size, device).cpu()

    def predict(written: Sequence[str | None] | None) -> torch.Tensor:
        ds = WrittenOn(sources, labels, transform, written, style, seed)
        feats, _ = encode_images(model, ds, batch_size, device)
        return zero_shot_logits(feats, clf).argmax(dim=1)

    clean = predict(None)
    attacked = predict([words[k] for k in targets])
    return attack_metrics(clean, attacked, labels, targets, len(classnames))


def attack_metrics(
    clean: torch.Tensor,
    attacked: torch.Tensor,
    labels: Sequence[int],
    targets: Sequence[int],
    num_classes: int,
) -> dict[str, float]:
    """The attack's numbers from predicted classes (N,) on clean and attacked images."""
    y, t = torch.as_tensor([int(v) for v in labels]), torch.as_tensor([int(v) for v in targets])
    right = clean == y
    return {
        "acc1_clean": right.double().mean().item(),
        "acc1_attacked": (attacked == y).double().mean().item(),
        "follow_word": (attacked == t).double().mean().item(),
        "flipped_to_word": (attacked[right] == t[right]).double().mean().item() if right.any() else 0.0,
        "chance": 1 / num_classes,
        "num_images": len(y),
    }


def save_examples(
    sources: Sequence[str | Path | Image.Image],
    labels: Sequence[int],
    classnames: Sequence[str],
    path: str | Path,
    style: TextStyle = DEFAULT_STYLE,
    seed: int = 0,
    n: int = 8,
) -> Path:
    """A strip of the first n attacked images (for the report)."""
    targets = attack_targets(labels, len(classnames), seed)
    ds = WrittenOn(sources[:n], labels[:n], lambda im: im, [classnames[k] for k in targets[:n]], style, seed)
    ims = [ds[i]["image"] for i in range(len(ds))]
    if not ims:
        raise ValueError("no images")
    w, h = ims[0].size
    strip = Image.new("RGB", (w * len(ims), h))
    for i, im in enumerate(ims):
        strip.paste(im.resize((w, h)), (i * w, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    strip.save(path)
    return path
