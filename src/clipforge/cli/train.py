"""`clipforge train --config run.yaml [key=value ...] [--resume]`.

data.kind: synthetic (no files), manifest (CSV/TSV/JSONL), folder (images + sidecar .txt), webdataset
(tar shards); see examples/train_manifest.yaml.
"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a CLIP model from an experiment config (YAML/JSON)")
    p.add_argument("--config", help="experiment YAML/JSON (default: the built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.lr=1e-3")
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint of run.output_dir"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train.dist import leave_process
    from ..train.experiment import load_experiment

    exp = load_experiment(args.config, args.overrides)
    code = _train(exp, args)
    leave_process(code)  # torchrun: a finished rank ends here, whatever interpreter shutdown would wait on
    return code


def _train(exp, args: argparse.Namespace) -> int:
    from ..data import UnreadableDataError
    from ..train.build import run_experiment
    from ..train.dist import LaunchError, is_main, lost_peer
    from ..train.trainer import NonFiniteLossError, TrainingInterrupted

    try:
        result = run_experiment(exp, resume=args.resume, progress=not args.no_progress)
    except TrainingInterrupted as e:
        print(f"clipforge train: {e}")
        return 130
    except NonFiniteLossError as e:
        print(f"clipforge train: error: {e}", file=sys.stderr)
        return 1
    except UnreadableDataError as e:  # also when raised in a DataLoader worker (then torch wraps its message)
        print(f"clipforge train: error: {e.reason}", file=sys.stderr)
        return 1
    except LaunchError as e:  # e.g. WORLD_SIZE set without torchrun: one line, not a traceback
        print(f"clipforge train: error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # torchrun: another rank died (kill -9, a crash) while this one waited on it
        msg = lost_peer(e)
        if msg is None:
            raise
        print(f"clipforge train: error: {msg}", file=sys.stderr)
        return 1
    out = exp.run.output_dir
    if not is_main():  # torchrun: the other ranks stay quiet
        return 0
    ran = len(result.losses)  # a resumed run trains only the steps after its checkpoint
    done = f"{result.step} steps"
    if ran != result.step:
        done = f"to step {result.step} ({ran} step{'' if ran == 1 else 's'} this run)"
    print(f"trained {done} in {result.seconds:.0f} s; run directory: {out}")
    print(f"  model: {out}/model (clipforge.load), metrics: {out}/metrics.jsonl, plots: {out}/plots/")
    for k, v in result.eval.items():
        print(f"  {k}: {v:.4f}")
    return 0
