"""Figure 2 of the CLIP paper on the synthetic shapes: captioning vs bag-of-words prediction vs contrastive.

    python examples/objectives_study.py --out objectives_study [--images 32768] [--seeds 0 1 2]
        [--contrastive-text bow|transformer] [--image-size 32] [--batch-size 128] [--evals 8]

Trains the three objectives with the same image tower, batch, schedule, images and number of images
processed, evaluates zero-shot top-1 on the held-out colour-shape combinations at regular intervals, and
writes results.json, results.md (final accuracies, images-to-accuracy ratios beside the paper's 3x / 4x)
and figure2.png (clipforge.train.objectives_study).
"""

from __future__ import annotations

import argparse

from clipforge.train.objectives_study import StudyConfig, run_study, study_markdown


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="objectives_study")
    p.add_argument("--images", type=int, default=32768, help="images processed per run")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--evals", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--contrastive-text", default="bow", choices=["bow", "transformer"])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--train-images", type=int, default=20000)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CPUs with native bf16)")
    args = p.parse_args()
    try:
        cfg = StudyConfig(
            images=args.images,
            batch_size=args.batch_size,
            evals=args.evals,
            seeds=tuple(args.seeds),
            contrastive_text=args.contrastive_text,
            image_size=args.image_size,
            train_images=args.train_images,
            bf16=args.bf16,
        )
    except ValueError as e:
        p.error(str(e))  # one line and exit status 2, as for any other bad argument
    result = run_study(cfg, args.out)
    print(study_markdown(result))
    print(f"{result['seconds']:.0f} s; written: {args.out}/results.json, results.md, figure2.png")


if __name__ == "__main__":
    main()
