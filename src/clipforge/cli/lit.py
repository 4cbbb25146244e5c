"""`clipforge pretrain-image` and `clipforge cache-embeddings`: the two LiT preparation steps."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain-image", help="supervised (cross-entropy) pretraining of an image tower")
    p.add_argument(
        "--data", default="synthetic", help="'synthetic' (labelled shapes) or a folder root/<class>/<image>"
    )
    p.add_argument("--out", required=True, help="output directory of the classifier checkpoint")
    p.add_argument(
        "--preset", default="tiny-vit", help="model preset whose image tower is trained (default tiny-vit)"
    )
    p.add_argument("--embed-dim", type=int, default=None, help="tower output size (default: the preset's)")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the preset's)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument(
        "--label", default="shape", choices=("shape", "colour"), help="synthetic: what to classify"
    )
    p.add_argument("--per-class", type=int, default=200, help="synthetic: images per class")
    p.add_argument("--val", default=None, help="folders: a validation folder of the same classes")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="folders without --val: share of each class held out for validation")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_pretrain)

    c = sub.add_parser(
        "cache-embeddings", help="run a locked image tower once over a dataset; write an embedding cache"
    )
    c.add_argument(
        "--tower", required=True, help="classifier directory or any checkpoint clipforge.load reads"
    )
    c.add_argument(
        "--data",
        default="synthetic",
        help="'synthetic', a manifest (CSV/TSV/JSONL), an image folder with sidecar captions, or "
        "WebDataset shards (a .tar, a brace pattern 'shards/{000..009}.tar', a folder of tars)",
    )
    c.add_argument(
        "--kind",
        default=None,
        choices=("synthetic", "manifest", "folder", "webdataset"),
        help="data kind as in data.kind (default: inferred from --data)",
    )
    c.add_argument("--image-key", default="image", help="manifest image column (data.image_key)")
    c.add_argument("--caption-key", default="caption", help="manifest caption column / shard json key")
    c.add_argument("--caption-sep", default="||", help="several captions in one field ('' = none)")
    c.add_argument("--root", default=None, help="base of relative manifest image paths (data.root)")
    c.add_argument(
        "--out", required=True, help="cache directory (rerun to resume; refuses another tower's cache)"
    )
    c.add_argument("--views", type=int, default=1, help="augmented views per image (default 1)")
    c.add_argument("--augment", default="none", choices=("none", "square_crop", "random_resized_crop"),
                   help="augmentation of the views (default none: eval preprocessing)")  # fmt: skip
    c.add_argument("--synthetic-n", type=int, default=20000, help="synthetic: number of training pairs")
    c.add_argument("--batch-size", type=int, default=256)
    c.add_argument("--shard-size", type=int, default=8192)
    c.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    c.add_argument("--device", default="cpu")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=run_cache)


def run_pretrain(args: argparse.Namespace) -> int:
    from ..checkpoints.classifier import save_classifier
    from ..config import get_config
    from ..models.classifier import ImageClassifier
    from ..train.pretrain_image import accuracy, pretrain_image, synthetic_labelled
    from ..transforms import PreprocessConfig

    cfg = get_config(args.preset)
    vision = (
        cfg.vision
        if args.image_size is None
        else cfg.vision.__class__(**{**cfg.vision.__dict__, "image_size": args.image_size})
    )
    pre = PreprocessConfig(vision.image_size)
    if args.data == "synthetic":
        train, classnames = synthetic_labelled(
            args.per_class, vision.image_size, args.seed, args.label, "train"
        )
        val, _ = synthetic_labelled(
            max(1, args.per_class // 5), vision.image_size, args.seed + 1, args.label, "train"
        )
    else:
        from ..train.pretrain_image import folder_labelled

        train, val, classnames = folder_labelled(args.data, pre, args.val, args.val_fraction, args.seed)
    model = ImageClassifier(vision, args.embed_dim or cfg.embed_dim, len(classnames))
    result = pretrain_image(model, train, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            weight_decay=args.weight_decay, seed=args.seed,
                            progress=not args.quiet)  # fmt: skip
    if val is not None:
        result.val_accuracy = accuracy(model, val)
    save_classifier(model, args.out, classnames, pre)
    print(json.dumps({"out": args.out, "steps": result.steps, "final_loss": result.losses[-1],
                      "train_accuracy": result.train_accuracy, "val_accuracy": result.val_accuracy,
                      "classes": len(classnames), "seconds": round(result.seconds, 1)}))  # fmt: skip
    return 0


def run_cache(args: argparse.Namespace) -> int:
    from ..data.cache_writer import SkipLog, cache_transform, write_cache
    from ..data.embedding_cache import SKIP_LOG
    from ..data.sources import infer_kind, open_source
    from ..lit.build import load_image_tower
    from ..transforms import PreprocessConfig

    src = load_image_tower(args.tower)
    pre = PreprocessConfig.from_dict(src.preprocess)
    kind = args.kind or infer_kind(args.data)
    fields = {"train": args.data, "seed": args.seed, "image_size": pre.image_size,
              "synthetic_train": args.synthetic_n, "image_key": args.image_key,
              "caption_key": args.caption_key, "caption_sep": args.caption_sep or None, "root": args.root,
              "shuffle": False}  # fmt: skip
    listing = SkipLog(args.data)
    source = open_source(kind, fields, skips=listing)
    cache = write_cache(src.tower, source.samples, args.out, transform=cache_transform(pre, args.augment),
                        preprocess={**pre.to_dict(), "augment": args.augment}, source=source.fingerprint(),
                        views=args.views, batch_size=args.batch_size, shard_size=args.shard_size,
                        seed=args.seed, dtype=args.dtype, device=args.device,
                        listed_skips=listing.entries, progress=not args.quiet)  # fmt: skip
    skipped = cache.index.get("skipped", {})
    if skipped:
        parts = ", ".join(f"{reason} {n}" for reason, n in skipped.items())
        print(f"skipped {sum(skipped.values())} samples of {args.data} ({parts}); every one is named in "
              f"{cache.directory / SKIP_LOG}")  # fmt: skip
    print(json.dumps({"out": args.out, "kind": kind, "samples": len(cache), "views": cache.views,
                      "dim": cache.dim, "skipped": skipped}))  # fmt: skip
    return 0
