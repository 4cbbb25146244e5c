"""Prompt templates and class names: a small built-in set, and CLIP_benchmark's JSON files read as they are.

CLIP_benchmark ships `<lang>_classnames.json` ({dataset: [class, ...]}) and
`<lang>_zeroshot_classification_templates.json` ({dataset: ["a photo of a {c}.", ...]}). We read them
from a path, or locate them inside an installed `clip_benchmark` distribution via its metadata
(never importing it: its import pulls in torchvision).
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

# Our own generic set (in the spirit of the CLIP paper's prompt ensembles, not copied from a dataset list).
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c}.",
    "a picture of a {c}.",
    "an image of a {c}.",
    "a close-up photo of a {c}.",
    "a cropped photo of a {c}.",
    "a good photo of a {c}.",
    "a bad photo of a {c}.",
    "a photo of the {c}.",
    "a drawing of a {c}.",
    "a photo of a small {c}.",
    "a photo of a large {c}.",
    "itap of a {c}.",
)
SIMPLE_TEMPLATES: tuple[str, ...] = ("a photo of a {c}.",)
BUILTIN = {"default": DEFAULT_TEMPLATES, "simple": SIMPLE_TEMPLATES}


def as_texts(texts: str | Iterable[str], what: str = "texts", single: bool = True) -> list[str]:
    """`texts` as a list of str, from any iterable of strings (list, tuple, generator, numpy array).

    One str is one text when `single` (as the tokenizer takes it); otherwise it is refused: iterating it
    would silently give one entry per character (class names "c", "a", "t")."""
    if isinstance(texts, str):
        if single:
            return [texts]
        raise TypeError(f"{what}: expected a list of strings, got the single string {texts!r}: [{texts!r}]")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"{what}[{i}] is a {type(t).__name__}, not a str")
    return out


def format_template(template: str, classname: str) -> str:
    """Fill `{c}` (CLIP_benchmark's placeholder) or a bare `{}` with the class name."""
    if "{c}" in template:
        return template.replace("{c}", classname)
    if "{}" in template:
        return template.replace("{}", classname)
    raise ValueError(f"template has no '{{c}}' or '{{}}' placeholder: {template!r}")


def read_list_file(path: str | Path, what: str) -> list | dict:
    """A JSON file (as it is: a list or a mapping) or a text file with one `what` a line (trailing blank
    lines ignored; a blank line inside would shift every entry after it, so it is an error)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if text.lstrip()[:1] in ("[", "{"):  # JSON under another name (older clipforge read only JSON)
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass  # a line that starts with a bracket, e.g. the template "{c} in the wild"
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if blank:
        raise ValueError(f"{path}: line {blank[0]} is empty (one {what} a line)")
    return [line.strip() for line in lines]


def clip_benchmark_file(name: str) -> Path:
    """Path of a data file shipped inside an installed clip_benchmark (e.g. 'en_classnames.json')."""
    try:
        dist = importlib.metadata.distribution("clip_benchmark")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"{name}: clip_benchmark is not installed; install it with "
            "`pip install --no-deps clip_benchmark` or pass the JSON file's path"
        ) from None
    for f in dist.files or ():
        if Path(str(f)).name == name:
            return Path(dist.locate_file(f))
    raise FileNotFoundError(f"{name} not found in the installed clip_benchmark {dist.version}")


def _read_json_table(path_or_name: str | Path, default_name: str) -> dict:
    p = Path(path_or_name)
    if not p.exists():
        p = clip_benchmark_file(default_name if str(path_or_name) in ("", "clip_benchmark") else p.name)
    with open(p, encoding="utf-8") as f:
        table = json.load(f)
    if not isinstance(table, dict):
        raise ValueError(f"{p}: expected a JSON object {{dataset: [...]}}, got {type(table).__name__}")
    return table


def _pick(table: dict, dataset: str | None, what: str, source) -> list[str]:
    if dataset is None:
        if len(table) != 1:
            raise ValueError(
                f"{source}: holds {len(table)} datasets; name one of: {', '.join(sorted(table))}"
            )
        dataset = next(iter(table))
    if dataset not in table:
        # CLIP_benchmark names some datasets 'wds/<name>' or 'vtab/<name>'; try the last path part too.
        short = dataset.split("/")[-1]
        if short not in table:
            raise KeyError(f"{source}: no {what} for dataset {dataset!r}; known: {', '.join(sorted(table))}")
        dataset = short
    return list(table[dataset])


def load_classnames(path: str | Path = "clip_benchmark", dataset: str | None = None, language: str = "en"):
    """Class names for `dataset` from a CLIP_benchmark-style `*_classnames.json`, or a plain JSON list."""
    p = Path(path)
    if p.exists():
        data = read_list_file(p, "class name")
        if isinstance(data, list):
            return [str(c) for c in data]
        return _pick(data, dataset, "class names", p)
    table = _read_json_table(path, f"{language}_classnames.json")
    return _pick(table, dataset, "class names", path)


def load_templates(
    spec: str | Path | Sequence[str] = "default", dataset: str | None = None, language: str = "en"
) -> list[str]:
    """Templates from a built-in name ('default', 'simple'), a list, a file, or 'clip_benchmark'.

    A .json file may hold a list of templates or CLIP_benchmark's {dataset: [templates]} table; any other
    file holds one template a line.
    """
    if not isinstance(spec, str | Path):
        out = list(spec)
    elif str(spec) in BUILTIN:
        out = list(BUILTIN[str(spec)])
    elif Path(spec).exists():
        data = read_list_file(spec, "template")
        out = [str(t) for t in data] if isinstance(data, list) else _pick(data, dataset, "templates", spec)
    elif str(spec) == "clip_benchmark":
        table = _read_json_table(spec, f"{language}_zeroshot_classification_templates.json")
        out = _pick(table, dataset, "templates", spec)
    else:
        raise FileNotFoundError(f"templates {spec!r}: not a file, nor one of {[*BUILTIN, 'clip_benchmark']}")
    if not out:
        raise ValueError(f"templates {spec!r}: empty template list")
    for i, t in enumerate(out):
        try:
            format_template(t, "x")  # validates the placeholder
        except ValueError as e:
            raise ValueError(f"templates {str(spec)!r}, template {i + 1}: {e}") from None
    return out
