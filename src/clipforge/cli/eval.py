"""`clipforge eval zeroshot|linear-probe|few-shot|retrieval|robustness|suite` over clipforge.eval."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_ints(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4] (each >= 1)."""
    return [_positive_int(t.strip()) for t in text.split(",")]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint (OpenAI / OpenCLIP / HF / clipforge directory)")
    p.add_argument("--pretrained", default="", help="label for the report's 'pretrained' field")
    p.add_argument("--dataset", help="test set: class folders, a labelled manifest, or a retrieval set")
    p.add_argument("--name", help="dataset label in the report (default: the path's stem)")
    p.add_argument(
        "--classnames", help="file: JSON list, {folder: name}, or one name a line (default: folder names)"
    )
    p.add_argument(
        "--templates",
        default="default",
        help="'default', 'simple', 'clip_benchmark' or a file (JSON, or one a line)",
    )
    p.add_argument("--template-dataset", help="dataset key inside a CLIP_benchmark templates file")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--cache-dir", help="cache image features here, keyed by model and dataset")
    p.add_argument("--output", default="eval_out", help="output folder (JSON, Markdown, plots)")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model: zero-shot, probes, retrieval, robustness, suites")
    tasks = p.add_subparsers(dest="eval_task", metavar="TASK", required=True)
    for task, helptext in [
        ("zeroshot", "zero-shot classification (acc1, acc5, mean per-class recall)"),
        ("linear-probe", "L-BFGS logistic regression on frozen image features"),
        ("few-shot", "k-shot probes (k = 1..16), plot against zero-shot"),
        ("retrieval", "image<->text recall@1/5/10 (manifest or .tar shards)"),
        ("robustness", "zero-shot accuracy on shifted sets, effective robustness plot"),
        ("prompts", "bare name vs one template vs each template vs the ensemble: table and bar plot"),
        ("typographic", "write another class's name on each image: clean vs attacked accuracy"),
    ]:
        t = tasks.add_parser(task, help=helptext)
        _common(t)
        if task in ("linear-probe", "few-shot"):
            t.add_argument("--train", required=True, help="training set (folders or manifest)")
        if task == "few-shot":
            t.add_argument("--ks", type=_positive_ints, default=[1, 2, 4, 8, 16], help="shots per class")
            t.add_argument("--seeds", type=_positive_int, default=3, help="draws of the shots per k")
        if task == "zeroshot":
            t.add_argument("--per-class", action="store_true", help="per-class table and confusion PNG")
        if task == "typographic":
            t.add_argument("--font-size", type=float, default=0.25, help="fraction of image height, or px")
            t.add_argument("--position", default="center", help="center, top, bottom or random")
            t.add_argument("--contrast", default="box", help="box (black on white), high or low")
            t.add_argument("--font", default=None, help="TrueType file or system font (default: Pillow's)")
            t.add_argument("--seed", type=int, default=0, help="picks each image's written class")
        if task == "robustness":
            t.add_argument("--shifted", nargs="+", default=[], metavar="NAME=PATH", help="shifted test sets")
            t.add_argument("--baseline-fit", help="'slope,intercept' of the logit baseline line")
        t.set_defaults(func=run)
    s = tasks.add_parser("suite", help="run tasks from a YAML file into one results table")
    s.add_argument(
        "--tasks", required=True, help="YAML: {model: ..., tasks: [{task: ..., dataset: ...}, ...]}"
    )
    s.add_argument("--model", help="overrides the YAML's model")
    s.add_argument("--output", default=None)
    s.add_argument("--device", default=None)
    s.set_defaults(func=run_suite)


def _load(path: str, device: str | None):
    import torch

    from ..checkpoints import load  # lazy: the heavy loader only when a command runs

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load(path, device=device)


def _spec(args: argparse.Namespace) -> dict:
    spec = {
        "task": args.eval_task,
        "dataset": args.dataset,
        "name": args.name,
        "classnames": args.classnames,
        "templates": args.templates,
        "template_dataset": args.template_dataset,
        "batch_size": args.batch_size,
        "cache_dir": args.cache_dir,
        "output_dir": args.output,
    }
    if getattr(args, "train", None):
        spec["train"] = args.train
    if args.eval_task == "few-shot":
        spec["ks"] = list(args.ks)
        spec["seeds"] = list(range(args.seeds))
    if args.eval_task == "typographic":
        spec.update(
            font_size=args.font_size,
            position=args.position,
            contrast=args.contrast,
            font=args.font,
            seed=args.seed,
        )
    if getattr(args, "per_class", False):
        spec["per_class"] = True
    if args.eval_task == "robustness":
        spec["shifted"] = dict(s.split("=", 1) for s in args.shifted)
        if args.baseline_fit:
            spec["baseline_fit"] = [float(v) for v in args.baseline_fit.split(",")]
    return {k: v for k, v in spec.items() if v is not None}


def _write(records: list[dict], out: Path, stem: str) -> None:
    from ..eval.report import markdown_table, write_json

    write_json(records if len(records) > 1 else records[0], out / f"{stem}.json")
    table = markdown_table(records)
    (out / f"{stem}.md").write_text(table)
    print(table)
    print(f"results: {out / stem}.json, {out / stem}.md")


def run(args: argparse.Namespace) -> int:
    from ..eval.tasks import run_task

    if not args.dataset:
        raise ValueError("--dataset is required")
    model, preprocess, tokenizer = _load(args.model, args.device)
    rec = run_task(_spec(args), model, preprocess, tokenizer, Path(args.model).name, args.pretrained)
    _write([rec], Path(args.output), f"{rec['dataset']}_{args.eval_task}")
    return 0


def run_suite(args: argparse.Namespace) -> int:
    import yaml

    from ..eval.tasks import check_spec, run_task

    cfg = yaml.safe_load(Path(args.tasks).read_text())
    if not isinstance(cfg, dict) or not cfg.get("tasks"):
        raise ValueError(f"{args.tasks}: expected a mapping with a non-empty 'tasks' list")
    model_path = args.model or cfg.get("model")
    if not model_path:
        raise ValueError(f"{args.tasks}: no 'model' (or pass --model)")
    out = Path(args.output or cfg.get("output_dir", "eval_out"))
    specs = []
    for i, spec in enumerate(cfg["tasks"], 1):
        if isinstance(spec, dict):
            spec = {
                "output_dir": str(out),
                **{k: v for k, v in cfg.items() if k not in ("tasks", "model")},
                **spec,
            }
        try:  # every task checked before the first one runs
            check_spec(spec)
        except ValueError as e:
            raise ValueError(f"{args.tasks}, task {i}: {e}") from None
        specs.append(spec)
    model, preprocess, tokenizer = _load(model_path, args.device or cfg.get("device"))
    records = []
    for spec in specs:
        records.append(
            run_task(spec, model, preprocess, tokenizer, Path(model_path).name, cfg.get("pretrained", ""))
        )
        print(json.dumps({k: records[-1][k] for k in ("dataset", "task")}), flush=True)
    _write(records, out, "suite")
    return 0
