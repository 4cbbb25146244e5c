"""One typed experiment config: nested frozen dataclasses, loaded from YAML/JSON plus dotted overrides.

    exp = load_experiment("run.yaml", ["optim.lr=1e-3", "train.steps=2000"])
    exp.optim.lr  # 0.001

Unknown keys and values of the wrong type raise a ValueError naming the key. The resolved config
(`exp.to_dict()`) is written into the run directory and into every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..data.sources import SOURCES
from ..loss import OBJECTIVES
from ..tokenizer import base_symbols


@dataclass(frozen=True)
class ModelSpec:
    """The model to train: a preset name, or a checkpoint to start from (any `clipforge.load` format)."""

    preset: str = "tiny-vit"
    checkpoint: str | None = None  # fine-tune this model (its architecture replaces `preset`)
    # "auto" (the checkpoint's tokenizer with `checkpoint`, else "openai"), "checkpoint", "openai" (the
    # 49408-token OpenAI vocabulary), "bpe" (train a BPE of `vocab_size` ids on the training captions,
    # saved as <output_dir>/tokenizer and reused on --resume) or a directory holding a saved tokenizer.
    # LiT: a checkpoint text_tower uses its own unless this is set explicitly; a HF text_tower always its own.
    tokenizer: str = "auto"
    vocab_size: int | None = None  # with tokenizer "bpe": its size (default: the preset's)
    context_length: int | None = None  # default: the preset's (the checkpoint's)
    # LiT (Zhai et al. 2022): tower policies, image tower first; L pretrained + locked, U pretrained +
    # unlocked, u random init ("Lu", "LU", "Uu", "UU", "uu", "UL", ...). None = plain CLIP.
    lit: str | None = None
    image_tower: str | None = None  # classifier dir (`clipforge pretrain-image`) or a clipforge.load ckpt
    text_tower: str | None = None  # a clipforge.load checkpoint or a local HF BERT-family directory
    image_unlocked_blocks: int = 0  # with an L image tower: train its last N blocks (and head) anyway
    text_unlocked_blocks: int = 0
    pooling: Literal["mean", "cls"] = "mean"  # HF text towers

    def __post_init__(self) -> None:
        if self.context_length is not None and self.context_length < 2:  # SOT + EOT at least
            raise ValueError(
                f"model.context_length must be >= 2 (or null: the preset's), got {self.context_length}"
            )
        for key in ("image_unlocked_blocks", "text_unlocked_blocks"):
            if getattr(self, key) < 0:
                raise ValueError(f"model.{key} must be >= 0, got {getattr(self, key)}")
        smallest = len(base_symbols()) + 2  # the byte symbols + SOT/EOT (else found after reading the data)
        if self.tokenizer == "bpe" and self.vocab_size is not None and self.vocab_size < smallest:
            raise ValueError(
                f"model.vocab_size must be at least {smallest} with model.tokenizer=bpe (byte symbols + "
                f"SOT/EOT), got {self.vocab_size}"
            )


@dataclass(frozen=True)
class DataSpec:
    """Where pairs come from. `synthetic` needs no files; the others read `train` (and `val`)."""

    kind: str = "synthetic"  # a key of clipforge.data.sources.SOURCES
    train: str | None = None  # manifest file, image folder, or shard pattern ("shards/{000..009}.tar")
    val: str | None = None  # held-out pairs -> retrieval recall@1/5/10 (a manifest, a folder or shards)
    # labelled images -> zero-shot top-1 with class-name prompts: a folder of class folders, or a
    # manifest with `image_key` and `label_key` columns
    val_labelled: str | None = None
    classnames: str | None = None  # JSON list / {folder: name} map; default: folder names / labels
    templates: str = "simple"  # prompt templates: "simple", "default" or a JSON file of templates
    image_key: str = "image"  # manifest column names (json key in shards for `caption_key`)
    caption_key: str = "caption"
    label_key: str = "label"
    caption_sep: str | None = "||"  # several captions in one manifest field: "a dog||a puppy"
    root: str | None = None  # base of relative manifest image paths (default: the manifest's folder)
    synthetic_train: int = 20000  # synthetic set sizes (images)
    synthetic_val: int = 512
    augment: Literal["none", "square_crop", "random_resized_crop"] = "random_resized_crop"
    # training crops with less work (transforms.FastTrainTransform): JPEGs decoded at 1/2 or 1/4 scale when
    # the crop allows, only the crop resized, uint8 batches normalised on the device. Same crops, pixels
    # within ~1.5/255 at 224 px. Off by default: a run's pixels stay what they were when it started.
    fast_decode: bool = False
    shuffle: bool = True  # seeded: the same run.seed gives the same order
    shuffle_buffer: int = 1000  # webdataset: samples in the seeded shuffle buffer
    # webdataset over several processes: "epoch" = shards split over ranks and workers, each sample once per
    # epoch (needs shards >= processes); "resampled" = shards drawn with replacement per rank and worker
    split: Literal["epoch", "resampled"] = "epoch"
    workers: int = 0  # DataLoader worker processes
    # LiT with an L image tower: precomputed embeddings (`clipforge cache-embeddings`, same tower and
    # data); training reads them and the captions stored with them, and never runs the image tower. Any
    # data.kind: with data.train (or the synthetic settings) the cache is checked against that data.
    embedding_cache: str | None = None


@dataclass(frozen=True)
class OptimSpec:
    """AdamW (decoupled weight decay), cosine schedule with linear warm-up; OpenCLIP's ViT defaults."""

    lr: float = 5e-4
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 100
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr: float = 0.0
    grad_clip: float | None = 1.0  # max global grad norm; None = no clipping

    def __post_init__(self) -> None:
        # checked here, not first by torch after the data and vocabulary are built, and naming the key
        # (a negative weight decay or a zero clip norm torch would take without a word)
        bad = {
            "optim.lr": (self.lr, self.lr > 0, "> 0"),
            "optim.weight_decay": (self.weight_decay, self.weight_decay >= 0, ">= 0"),
            "optim.beta1": (self.beta1, 0 <= self.beta1 < 1, "in [0, 1)"),
            "optim.beta2": (self.beta2, 0 <= self.beta2 < 1, "in [0, 1)"),
            "optim.eps": (self.eps, self.eps > 0, "> 0"),
            "optim.warmup_steps": (self.warmup_steps, self.warmup_steps >= 0, ">= 0"),
            "optim.min_lr": (self.min_lr, 0 <= self.min_lr <= self.lr, "in [0, optim.lr]"),
            "optim.grad_clip": (self.grad_clip, self.grad_clip is None or self.grad_clip > 0,
                                "> 0 (or null: no clipping)"),
        }  # fmt: skip
        for key, (value, ok, want) in bad.items():
            if not ok or (isinstance(value, float) and not math.isfinite(value)):
                raise ValueError(f"{key} must be {want}, got {value}")


@dataclass(frozen=True)
class TrainSpec:
    steps: int = 1000
    batch_size: int = 64  # the contrastive batch (after accumulation)
    accum_steps: int = 1  # micro-batches per step; exact: the loss still sees the whole batch
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile the towers (in place); eager with a message where unavailable
    mask_ratio: float = 0.0  # FLIP: share of image patches dropped while training
    unmasked_steps: int = 0  # FLIP's unmasked tuning: the last N steps run with mask_ratio 0
    loss: str = "clip"  # a key of clipforge.loss.OBJECTIVES ("clip", "siglip")
    lam: float = 0.5  # ConVIRT weighting of image->text vs text->image (CLIP: 0.5)
    # several processes (torchrun): "global" = every rank's pairs against the whole gathered batch (the
    # single-process loss of train.batch_size); "local" = within each rank's share only (LiT's comparison)
    loss_mode: Literal["global", "local"] = "global"
    # several processes: "ddp" = a full model copy per rank; "fsdp" = FSDP2 shards parameters, gradients and
    # optimizer state over the ranks (fsdp_unit "block": each transformer block / ResNet stage is a unit,
    # "tower": each tower). Checkpoints are consolidated either way: they resume with any strategy/world.
    strategy: Literal["ddp", "fsdp"] = "ddp"
    fsdp_unit: Literal["block", "tower"] = "block"
    max_nonfinite: int = 5  # stop after this many consecutive non-finite losses
    device: str = "auto"  # "auto" = cuda when available

    def __post_init__(self) -> None:
        # the allowed losses are the registry's keys, so a new objective needs no edit here
        if self.loss not in OBJECTIVES:
            raise ValueError(f"train.loss must be one of {sorted(OBJECTIVES)}, got {self.loss!r}")


@dataclass(frozen=True)
class RunSpec:
    output_dir: str = "runs/default"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    checkpoint_every: int = 500
    keep_last: int = 3
    tensorboard: bool = True  # when the package is installed

    def __post_init__(self) -> None:
        for key in ("eval_every", "checkpoint_every"):  # 0: only at the end; < 0 was every step
            if getattr(self, key) < 0:
                raise ValueError(f"run.{key} must be >= 0 (0: only at the end), got {getattr(self, key)}")


@dataclass(frozen=True)
class Experiment:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    run: RunSpec = field(default_factory=RunSpec)

    def __post_init__(self) -> None:
        t = self.train
        if t.steps < 1:
            raise ValueError(f"train.steps must be >= 1, got {t.steps}")
        if t.batch_size < 1 or t.accum_steps < 1 or t.batch_size % t.accum_steps:
            raise ValueError(
                f"train.batch_size ({t.batch_size}) must be a positive multiple of train.accum_steps "
                f"({t.accum_steps})"
            )
        if not 0.0 <= t.mask_ratio < 1.0:
            raise ValueError(f"train.mask_ratio must be in [0, 1), got {t.mask_ratio}")
        if t.unmasked_steps < 0 or t.unmasked_steps > t.steps:
            raise ValueError(f"train.unmasked_steps must be in [0, train.steps], got {t.unmasked_steps}")
        if self.run.keep_last < 1:
            raise ValueError(f"run.keep_last must be >= 1, got {self.run.keep_last}")
        if self.data.kind not in SOURCES:
            raise ValueError(f"data.kind must be one of {list(SOURCES)}, got {self.data.kind!r}")
        if self.data.kind != "synthetic" and not self.data.train:
            raise ValueError(f"data.kind={self.data.kind!r} needs data.train (a path)")
        if self.data.workers < 0:
            raise ValueError(f"data.workers must be >= 0, got {self.data.workers}")
        if self.model.tokenizer == "checkpoint" and not self.model.checkpoint:
            raise ValueError("model.tokenizer=checkpoint needs model.checkpoint")
        self._check_lit()

    def _check_lit(self) -> None:
        m, d = self.model, self.data
        if m.lit is None:
            lit_only = {
                "model.image_tower": m.image_tower,
                "model.text_tower": m.text_tower,
                "model.image_unlocked_blocks": m.image_unlocked_blocks,
                "model.text_unlocked_blocks": m.text_unlocked_blocks,
                "data.embedding_cache": d.embedding_cache,
            }
            set_ = [k for k, v in lit_only.items() if v]
            if set_:
                raise ValueError(f"{', '.join(set_)} only apply to LiT: set model.lit (e.g. model.lit=Lu)")
            return
        from ..lit.locking import LiTPolicy

        policy = LiTPolicy.parse(m.lit, m.image_unlocked_blocks, m.text_unlocked_blocks)
        if m.checkpoint:
            raise ValueError("model.lit takes its towers from model.image_tower / model.text_tower, "
                             "not model.checkpoint")  # fmt: skip
        if policy.image.pretrained and not m.image_tower:
            raise ValueError(f"model.lit={m.lit}: a pretrained ('{policy.image.mode}') image tower needs "
                             "model.image_tower (a classifier directory or a checkpoint)")  # fmt: skip
        if policy.text.pretrained and not m.text_tower:
            raise ValueError(f"model.lit={m.lit}: a pretrained ('{policy.text.mode}') text tower needs "
                             "model.text_tower (a checkpoint or a HF directory)")  # fmt: skip
        if d.embedding_cache and (not policy.image.locked or policy.image.unlocked_blocks):
            raise ValueError(f"data.embedding_cache needs a fully locked image tower (model.lit=L?, "
                             f"image_unlocked_blocks=0), got lit={m.lit}, "
                             f"image_unlocked_blocks={m.image_unlocked_blocks}")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Experiment:
        return _build(cls, d, "")

    def with_overrides(self, overrides: list[str] | tuple[str, ...]) -> Experiment:
        return Experiment.from_dict(apply_overrides(self.to_dict(), overrides))


# ------------------------------------------------------------------------------------------ loading
def load_experiment(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Experiment:
    """An Experiment from a YAML/JSON file (or the defaults when `path` is None) plus `key=value`s."""
    d: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"experiment config not found: {p}")
        try:
            text = p.read_text(encoding="utf-8")
            d = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
        except UnicodeDecodeError:
            raise ValueError(f"experiment config {p} is not UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{e.lineno}: not valid JSON ({e.msg})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
            raise ValueError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
        if d is None:
            d = {}
        if not isinstance(d, dict):
            raise ValueError(f"experiment config {p} must be a mapping, got {type(d).__name__}")
    return Experiment.from_dict(apply_overrides(d, overrides))


def apply_overrides(d: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply `a.b=value` strings (values parsed as YAML scalars: 1e-3, true, null, [0.9, 0.98])."""
    d = json.loads(json.dumps(d))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-3)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2:
            raise ValueError(f"override key {key!r} must be section.field (e.g. train.steps)")
        section, name = parts
        node = d.setdefault(section, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {key!r}: {section!r} is not a section")
        node[name] = _parse_scalar(raw)
    return d


def _parse_scalar(raw: str) -> Any:
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    # YAML 1.1 reads "1e-3" as a string; accept float-looking strings as floats.
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            return value
    return value


def _build(cls: type, d: Any, where: str) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"{where or 'config'} must be a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        label = f"{where}." if where else ""
        raise ValueError(
            f"unknown config key(s): {', '.join(label + k for k in unknown)}; known: {sorted(names)}"
        )
    kwargs = {}
    for name, value in d.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{key} must be one of {list(args)}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{key} must be a string, got {value!r}")
    raise ValueError(f"{key}: unsupported config type {tp}")
