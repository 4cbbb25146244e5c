"""Does a model that learned to read fall for the typographic attack? The demo model trained twice.

    python examples/typographic_study.py --out typographic_study [--minutes 3] [--text-rate 0.3]

Trains the demo CLIP (`clipforge demo`'s model and data) once on the plain synthetic set and once with
words written on a share of the training images ("a red circle and a sign that says star", data/synthetic
`text_rate`), then attacks both on single-object images labelled by shape: the name of another shape is
written on each image (clipforge.eval.typographic). Writes results.json, results.md and attack.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from clipforge import load
from clipforge.data.synthetic import ShapesConfig, classification_set
from clipforge.data.text_overlay import TextStyle
from clipforge.demo import DemoConfig, run_demo
from clipforge.eval.typographic import save_examples, typographic_attack
from clipforge.transforms import eval_transform

TEMPLATES = ["a {c}", "a photo of a {c}", "a drawing of a {c}"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="typographic_study")
    p.add_argument("--minutes", type=float, default=3.0, help="demo budget per model")
    p.add_argument("--steps", type=int, default=None, help="fixed steps per model (overrides --minutes)")
    p.add_argument("--text-rate", type=float, default=0.3)
    p.add_argument("--per-class", type=int, default=40, help="attacked images per shape")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not 0.0 < args.text_rate <= 1.0:  # the second model must see some words, at most on every image
        p.error(f"--text-rate must be in (0, 1], got {args.text_rate:g}")
    if args.per_class < 1:
        p.error(f"--per-class must be >= 1, got {args.per_class}")
    if (args.steps is not None and args.steps < 1) or args.minutes <= 0:
        p.error("--steps must be >= 1 and --minutes > 0")
    out = Path(args.out)
    images, labels, classnames = classification_set(
        ShapesConfig(image_size=64, seed=args.seed), args.per_class, "seen_eval", label="shape"
    )
    pil = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in images]
    styles = {"center": TextStyle(position="center"), "bottom": TextStyle(position="bottom", font_size=0.2)}
    rows = []
    for text_rate in (0.0, args.text_rate):
        name = f"text_rate_{text_rate:g}"
        cfg = DemoConfig(
            minutes=args.minutes, steps=args.steps, seed=args.seed, out=str(out / name), text_rate=text_rate
        )
        demo = run_demo(cfg)
        model, _, tokenizer = load(out / name / "model")
        for where, style in styles.items():
            m = typographic_attack(
                model,
                tokenizer,
                pil,
                labels.tolist(),
                classnames,
                eval_transform(64),
                TEMPLATES,
                style,
                args.seed,
            )
            rows.append(
                {
                    "model": name,
                    "text_rate": text_rate,
                    "position": where,
                    **m,
                    "demo_seen_top1": demo["seen_top1"],
                }
            )
            print(json.dumps(rows[-1]))
        save_examples(pil, labels.tolist(), classnames, out / "attack.png", styles["center"], args.seed)
    (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [
        "| training data | text position | clean top-1 (%) | attacked top-1 (%) | follows the word (%) | "
        "flipped to the word (%) | chance (%) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| text_rate {r['text_rate']:g} | {r['position']} | {100 * r['acc1_clean']:.1f} | "
            f"{100 * r['acc1_attacked']:.1f} | {100 * r['follow_word']:.1f} | "
            f"{100 * r['flipped_to_word']:.1f} | {100 * r['chance']:.1f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
