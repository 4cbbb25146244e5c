"""Image-caption data: synthetic shapes, manifests, folders, WebDataset shards, skip accounting.

Datasets yield {"image": FloatTensor (3, S, S), "text": LongTensor (ctx)} given a `transform`
(PIL image -> tensor) and a `tokenizer` (list of str -> LongTensor (N, ctx)).
"""

from .export import class_folder_name, write_class_folders, write_pair_folder, write_robustness_sets
from .memory import SyntheticPairs, TensorPairs
from .pairs import (
    FolderPairs,
    ManifestPairs,
    PairDataset,
    PairRecord,
    UnreadableDataError,
    collate_pairs,
    open_pairs,
    read_folder,
    read_manifest,
)
from .shard_writer import parse_size, write_shards
from .skips import REASONS, SkipCounter, Skipped
from .synthetic import (
    COLOURS,
    SHAPES,
    SHIFTS,
    ShapesConfig,
    all_combos,
    classification_set,
    combo_classnames,
    holdout_combos,
    images_to_tensor,
    make_captions,
    make_pairs,
    make_scenes,
    make_tensors,
    seen_combos,
    split_combos,
)
from .wds import WebDatasetPairs

__all__ = [
    "COLOURS",
    "REASONS",
    "SHAPES",
    "SHIFTS",
    "FolderPairs",
    "ManifestPairs",
    "PairDataset",
    "PairRecord",
    "ShapesConfig",
    "SkipCounter",
    "Skipped",
    "SyntheticPairs",
    "TensorPairs",
    "UnreadableDataError",
    "WebDatasetPairs",
    "all_combos",
    "class_folder_name",
    "classification_set",
    "collate_pairs",
    "combo_classnames",
    "holdout_combos",
    "images_to_tensor",
    "make_captions",
    "make_pairs",
    "make_scenes",
    "make_tensors",
    "open_pairs",
    "parse_size",
    "read_folder",
    "read_manifest",
    "seen_combos",
    "split_combos",
    "write_class_folders",
    "write_pair_folder",
    "write_robustness_sets",
    "write_shards",
]
