"""Load a task as ``DatasetDict(train, validation, test)`` from the Hub or a local copy, lazily preprocessed.

Splits follow Ilharco et al. (ICLR 2023, ``src/datasets/registry.py``): validation is a seeded random
10% of the train split (at most 5,000 examples), the rest is train, test is the dataset's test split.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from datasets import ClassLabel, Dataset, DatasetDict, Image, load_dataset, load_from_disk

from .registry import TASK_SPEC_FILE, TASKS, TaskSpec, get_task

__all__ = ["DATA_DIR_ENV", "load_task", "resolve_task", "split_train_validation", "with_image_transform", "ImageTransform"]

DATA_DIR_ENV = "SAFT_DATA_DIR"


def _task_name(task: str | TaskSpec) -> str:
    return task.name if isinstance(task, TaskSpec) else task


def _local_source(task: str | TaskSpec, data_dir: str | os.PathLike | None) -> Path | None:
    """The local directory holding the task's data, or None to use the Hub.

    ``data_dir`` (or ``$SAFT_DATA_DIR``) may hold one sub-directory per task (``<dir>/<TaskName>``,
    its lower-case form, or the Hub repo's name such as ``stanford_cars``); an explicit ``data_dir``
    without such a sub-directory is taken to be the task's data itself.
    """
    from_env = data_dir is None
    root = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    if not root:
        return None
    root = Path(root).expanduser()
    if not root.is_dir():
        where = f"${DATA_DIR_ENV}" if from_env else "data_dir"
        raise FileNotFoundError(f"{where}={str(root)!r} is not a directory; point it at a local copy of the data.")
    name = _task_name(task)
    candidates = [name, name.lower()]
    if name in TASKS:
        spec = TASKS[name]
        candidates += [spec.name, spec.name.lower(), spec.dataset_id.split("/")[-1]]
    for candidate in candidates:
        if (root / candidate).is_dir():
            return root / candidate
    if from_env:
        raise FileNotFoundError(
            f"${DATA_DIR_ENV}={str(root)!r} has no sub-directory for task {name!r} (looked for "
            f"{sorted(set(candidates))}); add one, or unset {DATA_DIR_ENV} to load from the Hub."
        )
    return root


def _resolve_spec(task: str | TaskSpec, source: Path | None) -> TaskSpec:
    """A ``task_spec.json`` beside local data defines (or overrides) the task; else the registry's spec."""
    if source is not None and (source / TASK_SPEC_FILE).is_file():
        return TaskSpec.from_json(source / TASK_SPEC_FILE)
    if isinstance(task, TaskSpec):
        return task
    if task not in TASKS:
        raise KeyError(
            f"unknown task {task!r}; known tasks: {', '.join(TASKS)} (case-insensitive). For a custom task, "
            f"call saft_hf.tasks.register_task(...) or put a {TASK_SPEC_FILE} beside its local data."
        )
    return get_task(task)


def resolve_task(task: str | TaskSpec, data_dir: str | os.PathLike | None = None) -> TaskSpec:
    """The spec ``load_task`` would use: a local ``task_spec.json`` if there is one, else the registry's."""
    return _resolve_spec(task, _local_source(task, data_dir))


def _load_raw(spec: TaskSpec, source: Path | None, cache_dir: str | os.PathLike | None) -> DatasetDict:
    if source is None:
        loaded = load_dataset(spec.dataset_id, spec.config, cache_dir=cache_dir)
    elif (source / "dataset_dict.json").is_file():
        loaded = load_from_disk(str(source))
    else:
        loaded = load_dataset(str(source), spec.config, cache_dir=cache_dir)
    if not isinstance(loaded, DatasetDict):
        raise ValueError(
            f"task {spec.name!r}: {source or spec.dataset_id} holds a single split, expected a DatasetDict with "
            f"'{spec.train_split}' and '{spec.test_split}'; save one with DatasetDict(...).save_to_disk(path)."
        )
    return loaded


def _check(spec: TaskSpec, raw: DatasetDict, origin: str) -> None:
    """Fail early, naming the problem: missing splits, missing columns, wrong image type, wrong class count."""
    missing_splits = [s for s in (spec.train_split, spec.test_split) if s not in raw]
    if missing_splits:
        raise ValueError(
            f"task {spec.name!r}: {origin} lacks split(s) {missing_splits}; it has {list(raw)}. Set "
            f"train_split/test_split in the task spec to the right names."
        )
    for split in (spec.train_split, spec.test_split):
        features = raw[split].features
        missing = [c for c in (spec.image_column, spec.label_column) if c not in features]
        if missing:
            raise ValueError(
                f"task {spec.name!r}: split {split!r} of {origin} lacks column(s) {missing}; it has "
                f"{list(features)}. Rename them or set image_column/label_column in the task spec."
            )
        if not isinstance(features[spec.image_column], Image):
            raise ValueError(
                f"task {spec.name!r}: column {spec.image_column!r} is {features[spec.image_column]!r}, not an "
                f"image; cast it with dataset.cast_column({spec.image_column!r}, datasets.Image())."
            )
        label = features[spec.label_column]
        if isinstance(label, ClassLabel) and label.num_classes != spec.num_classes:
            raise ValueError(
                f"task {spec.name!r}: {origin} has {label.num_classes} classes in {spec.label_column!r} but the "
                f"task has {spec.num_classes} class names; the zero-shot head needs one name per class."
            )


def split_train_validation(
    train: Dataset, val_fraction: float = 0.1, max_val_samples: int | None = 5000, seed: int = 0
) -> tuple[Dataset, Dataset]:
    """Hold out ``val_fraction`` of ``train`` (at most ``max_val_samples``) with a seeded permutation.

    Same index draw as ``torch.utils.data.random_split`` with ``manual_seed(seed)`` (task_vectors repo).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}.")
    total = len(train)
    val_size = int(total * val_fraction)
    if max_val_samples is not None:
        val_size = min(val_size, max_val_samples)
    if val_size == 0 or val_size == total:
        raise ValueError(f"train split of {total} examples is too small to hold out {val_fraction:.0%} for validation.")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()
    train_size = total - val_size
    return train.select(order[:train_size]), train.select(order[train_size:])


class ImageTransform:
    """Batch transform: images → RGB → ``pixel_values`` with a CLIP image processor; labels → ``labels``."""

    def __init__(self, image_processor: Any, image_column: str = "image", label_column: str = "label") -> None:
        self.image_processor = image_processor
        self.image_column = image_column
        self.label_column = label_column

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, torch.Tensor]:
        images = [image.convert("RGB") for image in batch[self.image_column]]
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, "labels": torch.as_tensor(batch[self.label_column], dtype=torch.long)}


def with_image_transform(
    dataset: Dataset | DatasetDict, image_processor: Any, image_column: str = "image", label_column: str = "label"
) -> Dataset | DatasetDict:
    """Attach ``ImageTransform`` lazily (``with_transform``): items are preprocessed when read, no full pass."""
    transform = ImageTransform(image_processor, image_column, label_column)
    return dataset.with_transform(transform, columns=[image_column, label_column])


def load_task(
    task: str | TaskSpec,
    data_dir: str | os.PathLike | None = None,
    image_processor: Any | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
    max_val_samples: int | None = 5000,
    seed: int = 0,
) -> DatasetDict:
    """``DatasetDict(train, validation, test)`` for a task, from the Hub or ``data_dir``/``$SAFT_DATA_DIR``.

    With ``image_processor`` (e.g. the model's ``CLIPImageProcessor``) items come out as
    ``{"pixel_values", "labels"}``, preprocessed lazily; without it the raw columns are kept.
    """
    source = _local_source(task, data_dir)
    spec = _resolve_spec(task, source)
    raw = _load_raw(spec, source, cache_dir)
    _check(spec, raw, str(source) if source is not None else spec.dataset_id)
    train, validation = split_train_validation(raw[spec.train_split], val_fraction, max_val_samples, seed)
    splits = DatasetDict(train=train, validation=validation, test=raw[spec.test_split])
    if image_processor is not None:
        splits = with_image_transform(splits, image_processor, spec.image_column, spec.label_column)
    return splits
