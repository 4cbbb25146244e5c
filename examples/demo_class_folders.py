"""Write the demo's evaluation sets as class folders, for every `clipforge eval` command.

    python examples/demo_class_folders.py --out demo_sets [--per-class 10] [--image-size 64] [--seed 0]

out/seen and out/unseen: single-object images of the seen / held-out colour-shape combinations, one
folder per class for all 64 combinations (chance 1/64); out/shapes: images labelled by shape only (8
classes; the typographic attack writes shape names). Same seed and size as `clipforge demo`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from clipforge.data.export import write_class_folders
from clipforge.data.synthetic import ShapesConfig, classification_set


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_sets")
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    cfg = ShapesConfig(image_size=args.image_size, seed=args.seed)
    for name, split, label in (("seen", "seen_eval", "combo"), ("unseen", "unseen", "combo")):
        images, labels, classnames = classification_set(cfg, args.per_class, split, label=label)
        print(write_class_folders(images, labels, classnames, Path(args.out) / name), len(labels), "images")
    images, labels, classnames = classification_set(cfg, args.per_class * 4, "seen_eval", label="shape")
    print(write_class_folders(images, labels, classnames, Path(args.out) / "shapes"), len(labels), "images")


if __name__ == "__main__":
    main()
