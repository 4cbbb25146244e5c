"""`clipforge demo [--minutes M] [--seed S] [--out DIR]`: a tiny CLIP trained on synthetic shapes."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="train a tiny CLIP from scratch on synthetic shapes and test it zero-shot"
    )
    p.add_argument(
        "--minutes", type=float, default=5.0, help="time budget on 2 CPU cores (sets the step count)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="demo_out", help="output folder (results.json, metrics, plots)")
    p.add_argument("--steps", type=int, default=None, help="fixed number of steps (overrides --minutes)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads (default 0: the usable cores, at most 4; use 1 on a machine shared with other "
        "jobs; the numbers depend on it)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import DemoConfig, format_results, run_demo

    results = run_demo(
        DemoConfig(
            minutes=args.minutes,
            seed=args.seed,
            out=args.out,
            steps=args.steps,
            threads=args.threads,
            progress=not args.no_progress,
        )
    )
    print("\nclipforge demo results")
    print(format_results(results))
    print(f"results: {args.out}/results.json, plots: {args.out}/plots/, model: {args.out}/model/")
    return 0
