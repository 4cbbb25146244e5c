"""One evaluation task from a plain dict spec -> a CLIP_benchmark-shaped record (used by `clipforge eval`).

Spec keys: task (zeroshot | linear-probe | few-shot | retrieval | robustness | prompts | typographic),
dataset (a folder, a manifest, or tar shards for retrieval), train (probes), classnames, templates,
shifted {name: path} (robustness), output_dir (plots), cache_dir, batch_size, ks / seeds (few-shot),
name (dataset label), font_size / position / contrast / font / seed (typographic).
"""

from __future__ import annotations

from pathlib import Path

from ..data.fingerprint import dataset_fingerprint
from ..data.text_overlay import TextStyle
from .datasets import RetrievalSet, open_labelled, open_retrieval
from .features import cached_image_features, encode_texts, model_fingerprint
from .fewshot import DEFAULT_KS, few_shot_curve, plot_few_shot
from .linear_probe import linear_probe
from .prompts import plot_prompts, prompt_study, prompt_table
from .report import per_class_table, plot_confusion, result_record
from .retrieval import retrieval_metrics
from .robustness import evaluate_shifts, plot_robustness, robustness_summary
from .templates import load_templates
from .typographic import save_examples, typographic_attack
from .zeroshot import (
    classification_metrics,
    confusion_matrix,
    per_class_recall,
    zero_shot_classifier,
    zero_shot_logits,
)

TASK_NAMES = {
    "zeroshot": "zeroshot_classification",
    "linear-probe": "linear_probe",
    "few-shot": "few_shot",
    "retrieval": "zeroshot_retrieval",
    "robustness": "robustness",
    "prompts": "prompt_study",
    "typographic": "typographic_attack",
}


def classification_set(path, transform, classnames=None):
    return open_labelled(path, transform, classnames)


def check_same_classes(test, test_path, other, other_path) -> None:
    """A label is an index into its own set's class list (sorted folders or label names), so a train or
    shifted set with other classes than the test set would be scored against the wrong classes."""
    a, b = list(test.class_keys), list(other.class_keys)
    if a == b:
        return
    missing, extra = [k for k in a if k not in b], [k for k in b if k not in a]

    def few(keys: list[str]) -> str:
        return ", ".join(map(repr, keys[:5])) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")

    parts = ([f"lacks {few(missing)}"] if missing else []) + ([f"adds {few(extra)}"] if extra else [])
    raise ValueError(
        f"{other_path}: {len(b)} classes, the test set {test_path} {len(a)}: it "
        f"{'; '.join(parts)}. Labels index each set's sorted class list, so the sets need the same "
        "classes (an empty class folder keeps a class)"
    )


SPEC_KEYS = frozenset(
    ("task", "dataset", "train", "name", "classnames", "templates", "template_dataset", "batch_size",
     "cache_dir", "output_dir", "ks", "seeds", "zero_shot", "per_class", "shifted", "baseline_fit",
     "font_size", "position", "contrast", "font", "seed", "chunk_size", "language", "pretrained", "device")
)  # fmt: skip
REQUIRED_KEYS = {"linear-probe": ("train",), "few-shot": ("train",), "robustness": ("shifted",)}


def check_spec(spec) -> None:
    """Refuse a spec before any work: an unknown task, a missing dataset / train / shifted entry, or an
    unknown key (a typo such as 'template' would otherwise silently run with the default templates)."""
    if not isinstance(spec, dict):
        raise ValueError(f"a task spec is a mapping (task: ..., dataset: ...), got {type(spec).__name__}")
    task = spec.get("task")
    if task not in TASK_NAMES:
        raise ValueError(f"unknown task {task!r}; one of {', '.join(TASK_NAMES)}")
    missing = [k for k in ("dataset", *REQUIRED_KEYS.get(task, ())) if not spec.get(k)]
    if missing:
        raise ValueError(f"task {task!r} needs {', '.join(map(repr, missing))}")
    bs, ks, seeds = spec.get("batch_size", 1), spec.get("ks", [1]), spec.get("seeds", [0])
    if not (isinstance(bs, int) and bs >= 1):
        raise ValueError(f"task {task!r}: batch_size must be an integer >= 1, got {bs!r}")
    if not (isinstance(ks, list | tuple) and ks and all(isinstance(k, int) and k >= 1 for k in ks)):
        raise ValueError(f"task {task!r}: ks must be a list of integers >= 1, got {ks!r}")
    if not (isinstance(seeds, list | tuple) and seeds and all(isinstance(v, int) for v in seeds)):
        raise ValueError(f"task {task!r}: seeds must be a non-empty list of integers, got {seeds!r}")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        known = ", ".join(sorted(SPEC_KEYS))
        raise ValueError(f"task {task!r}: unknown keys {', '.join(map(repr, unknown))}; known: {known}")


def run_task(spec: dict, model, preprocess, tokenizer, model_name: str = "", pretrained: str = "") -> dict:
    check_spec(spec)
    task = spec["task"]
    needs_text = task != "linear-probe" and (task != "few-shot" or spec.get("zero_shot", True))
    if tokenizer is None and needs_text:  # clipforge.load warned why (no tokenizer files, no OpenAI vocab)
        raise ValueError(
            f"task {task!r} encodes text, and {model_name or 'the model'} came without a tokenizer"
        )
    bs = int(spec.get("batch_size", 64))
    out_dir = Path(spec.get("output_dir", "eval_out"))
    cache = spec.get("cache_dir")
    fp = model_fingerprint(model) if cache else None
    name = spec.get("name") or Path(str(spec["dataset"])).stem
    tr_spec = repr(getattr(preprocess, "to_dict", lambda: preprocess)())

    def feats(path, ds):
        # keyed by the dataset's content, not just its path: changed files must never bring back old numbers
        key = (str(path), dataset_fingerprint(path) if cache else "", tr_spec)
        return cached_image_features(model, ds, cache, key, fp, batch_size=bs, progress=True)

    metrics: dict = {}
    if task == "retrieval":
        src = spec["dataset"]
        shards = [str(s) for s in (src if isinstance(src, list) else [src])]
        rs = (
            RetrievalSet.from_tars(shards, preprocess)
            if isinstance(src, list)
            else open_retrieval(shards[0], preprocess)
        )
        img, _ = feats(src, rs.images)
        txt = encode_texts(model, tokenizer, rs.captions, bs, progress=True)
        metrics = retrieval_metrics(img, txt, rs.text_to_image, chunk_size=int(spec.get("chunk_size", 4096)))
    else:
        test = classification_set(spec["dataset"], preprocess, spec.get("classnames"))
        classnames = test.classnames
        needs_zs = task in ("zeroshot", "robustness") or (task == "few-shot" and spec.get("zero_shot", True))
        clf = None
        if needs_zs:
            templates = load_templates(spec.get("templates", "default"), spec.get("template_dataset"))
            clf = zero_shot_classifier(model, tokenizer, classnames, templates, bs).cpu()
        if task == "prompts":
            x, y = feats(spec["dataset"], test)
            templates = load_templates(spec.get("templates", "default"), spec.get("template_dataset"))
            metrics = prompt_study(model, tokenizer, x, y, classnames, templates, bs)
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / f"{name}_prompt_templates.md").write_text(prompt_table(metrics))
            plot_prompts(metrics, out_dir / f"{name}_prompts.png", title=f"{model_name} on {name}")
        elif task == "typographic":
            style = TextStyle(
                float(spec.get("font_size", 0.25)),
                spec.get("position", "center"),
                spec.get("contrast", "box"),
                spec.get("font"),
            )
            templates = load_templates(spec.get("templates", "default"), spec.get("template_dataset"))
            paths, labels = [p for p, _ in test.samples], [y for _, y in test.samples]
            seed = int(spec.get("seed", 0))
            metrics = typographic_attack(
                model, tokenizer, paths, labels, classnames, preprocess, templates, style, seed, bs
            )
            save_examples(paths, labels, classnames, out_dir / f"{name}_typographic.png", style, seed)
        elif task == "zeroshot":
            x, y = feats(spec["dataset"], test)
            logits = zero_shot_logits(x, clf)
            metrics = classification_metrics(logits, y)
            if spec.get("per_class"):
                out_dir.mkdir(parents=True, exist_ok=True)
                (out_dir / f"{name}_per_class.md").write_text(
                    per_class_table(classnames, per_class_recall(logits, y))
                )
                cm = confusion_matrix(logits.argmax(1), y, len(classnames))
                plot_confusion(cm, classnames, out_dir / f"{name}_confusion.png")
        elif task in ("linear-probe", "few-shot"):
            train = classification_set(spec["train"], preprocess, spec.get("classnames"))
            check_same_classes(test, spec["dataset"], train, spec["train"])
            xtr, ytr = feats(spec["train"], train)
            x, y = feats(spec["dataset"], test)
            if task == "linear-probe":
                res = linear_probe(xtr, ytr, x, y, num_classes=len(classnames))
                metrics = {**res.metrics, "lambda": res.lam}
            else:
                xs = [xtr.double(), x.double()]
                curve = few_shot_curve(
                    xs[0],
                    ytr,
                    xs[1],
                    y,
                    len(classnames),
                    None if clf is None else clf.double(),
                    ks=spec.get("ks", DEFAULT_KS),
                    seeds=spec.get("seeds", (0, 1, 2)),
                    progress=True,
                )
                plot_few_shot(curve, out_dir / f"{name}_fewshot.png", title=f"{model_name} on {name}")
                metrics = {f"acc1_k{k}": m for k, m in zip(curve["k"], curve["linear_probe"]["mean"])}
                if "zero_shot_prior" in curve:
                    metrics.update(
                        {f"acc1_prior_k{k}": m for k, m in zip(curve["k"], curve["zero_shot_prior"]["mean"])}
                    )
                    metrics["acc1_zeroshot"] = curve["zero_shot"]
                metrics["curve"] = curve
        else:  # robustness
            sets = {name: test} | {
                k: classification_set(v, preprocess, spec.get("classnames"))
                for k, v in spec["shifted"].items()
            }
            for k, v in spec["shifted"].items():
                check_same_classes(test, spec["dataset"], sets[k], v)
            results = evaluate_shifts(
                model,
                tokenizer,
                classnames,
                load_templates(spec.get("templates", "default"), spec.get("template_dataset")),
                sets,
                batch_size=bs,
            )
            line = tuple(spec["baseline_fit"]) if "baseline_fit" in spec else None
            summary = robustness_summary(results, name, line)
            pts = {k: (results[name]["acc1"], v["acc1"]) for k, v in summary.items()}
            plot_robustness(pts, out_dir / f"{name}_robustness.png", line)
            metrics = {"acc1": results[name]["acc1"]}
            metrics.update({f"{k}/acc1": v["acc1"] for k, v in summary.items()})
            metrics["shifts"] = summary
    return result_record(name, model_name, TASK_NAMES[task], metrics, pretrained, spec.get("language", "en"))
