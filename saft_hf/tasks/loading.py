"""Load a task as ``DatasetDict(train, validation, test)`` from the Hub or a local copy, lazily preprocessed.

Splits follow Ilharco et al. (ICLR 2023, ``src/datasets/registry.py``): validation is a seeded random
10% of the train split (at most 5,000 examples), the rest is train, test is the dataset's test split.
Only the train and test splits' files are downloaded: the corruption splits of Cars, EuroSAT, GTSRB and
RESISC45 and SVHN's ``extra`` are never fetched.

The input path for a GPU: with ``uint8=True`` items are decoded, resized and centre-cropped by the image
processor (in the DataLoader's workers when it has some) and cross the worker boundary as uint8;
``PixelNormalizer`` then rescales and normalises them on the device, with a per-channel lookup table taken
from the same processor, so the result equals the processor's own float output bit for bit.
"""

from __future__ import annotations

import math
import os
import re
from io import BytesIO
from pathlib import Path
from typing import Any

import torch
from datasets import (
    ClassLabel,
    Dataset,
    DatasetDict,
    Image,
    load_dataset,
    load_dataset_builder,
    load_from_disk,
)
from torch import Tensor, nn

from .registry import TASK_SPEC_FILE, TASKS, TaskSpec, get_task

__all__ = [
    "DATA_DIR_ENV",
    "load_task",
    "resolve_task",
    "split_train_validation",
    "with_image_transform",
    "ImageTransform",
    "PixelNormalizer",
    "decode_image",
    "default_num_workers",
]

DATA_DIR_ENV = "SAFT_DATA_DIR"
MAX_WORKERS = 16  # the authors' loaders use 16 workers per GPU


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


def _load_splits(spec: TaskSpec, path: str, cache_dir: str | os.PathLike | None) -> DatasetDict:
    """``load_dataset`` restricted to the train and test splits' data files: nothing else is downloaded.

    ``load_dataset(split=...)`` would still download and prepare every split, so the builder's resolved
    ``data_files`` (``data/train-*``, ``data/test-*``, ...) are cut to the two splits a run reads.
    """
    builder = load_dataset_builder(path, spec.config, cache_dir=cache_dir)
    files = builder.config.data_files
    if not files:  # no per-split data files to choose from: load what the builder defines
        return load_dataset(path, spec.config, cache_dir=cache_dir)
    wanted = (spec.train_split, spec.test_split)
    missing = [split for split in wanted if split not in files]
    if missing:
        raise ValueError(
            f"task {spec.name!r}: {path} lacks split(s) {missing}; it has {list(files)}. Set "
            f"train_split/test_split in the task spec to the right names."
        )
    return load_dataset(path, spec.config, data_files={split: list(files[split]) for split in wanted}, cache_dir=cache_dir)


def _load_raw(spec: TaskSpec, source: Path | None, cache_dir: str | os.PathLike | None) -> DatasetDict:
    if source is not None and (source / "dataset_dict.json").is_file():
        loaded = load_from_disk(str(source))  # already on disk: nothing to download
    else:
        loaded = _load_splits(spec, spec.dataset_id if source is None else str(source), cache_dir)
    if not isinstance(loaded, DatasetDict):
        raise ValueError(
            f"task {spec.name!r}: {source or spec.dataset_id} holds a single split, expected a DatasetDict with "
            f"'{spec.train_split}' and '{spec.test_split}'; save one with DatasetDict(...).save_to_disk(path)."
        )
    return loaded


def _normalised(name: str) -> str:
    """A class name compared ignoring case and ``_``/``-``/space differences ("Annual_Crop" ~ "annual crop")."""
    return re.sub(r"[\s_\-]+", " ", name).strip().lower()


def _check_label_names(spec: TaskSpec, label: ClassLabel, origin: str) -> None:
    """A ``ClassLabel``'s names must be the task's class names in the same order, or the head's rows mislabel.

    A ``ClassLabel`` made from a count only (names "0", "1", ...) carries no order to check.
    """
    if label.names == [str(i) for i in range(label.num_classes)]:
        return
    for index, (stored, expected) in enumerate(zip(label.names, spec.classnames)):
        if _normalised(stored) != _normalised(expected):
            raise ValueError(
                f"task {spec.name!r}: label {index} of {origin} is {stored!r} in its {spec.label_column!r} ClassLabel "
                f"but {expected!r} in the task's class names (compared ignoring case, '_', '-' and spaces), so "
                "images would be trained and scored against another class's prompts. Give the task its class "
                "names in the dataset's order (task_spec.json or register_task), or relabel the dataset."
            )


def _check(spec: TaskSpec, raw: DatasetDict, origin: str) -> None:
    """Fail early, naming the problem: missing splits or columns, wrong image type, wrong class count or order."""
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
        if isinstance(label, ClassLabel):
            _check_label_names(spec, label, origin)


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


def default_num_workers() -> int:
    """DataLoader workers per process: this process's cores shared among the node's processes, one left for
    the process driving the GPU, at least 1 and at most 16 (the authors' setting)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))  # set by torchrun / accelerate launch
    return max(1, min(MAX_WORKERS, cores // processes - 1))


def decode_image(value: dict[str, Any], feature: Image, draft_size: int | None = None) -> Any:
    """Decode one stored image exactly as ``datasets`` does, or, with ``draft_size``, a JPEG in draft mode.

    Draft mode lets libjpeg decode at 1/2, 1/4 or 1/8 scale while the short side stays ≥ ``draft_size``:
    a 4,000-px photo resized to 224 decodes several times faster. It changes pixels, so only training
    uses it; evaluation decodes in full, as the processor always did.
    """
    if draft_size is None or value.get("bytes") is None:
        return feature.decode_example(value)
    import PIL.Image
    import PIL.ImageOps

    image = PIL.Image.open(BytesIO(value["bytes"]))
    scale = draft_size / min(image.size)
    if image.format == "JPEG" and scale < 1:
        image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))
    image.load()
    if image.getexif().get(PIL.Image.ExifTags.Base.Orientation) is not None:  # as datasets.Image does
        image = PIL.ImageOps.exif_transpose(image)
    return image.convert(feature.mode) if feature.mode and feature.mode != image.mode else image


def _processor_size(image_processor: Any) -> int:
    """The short side the processor resizes to (``size["shortest_edge"]``, else the crop's smaller side)."""
    size, crop = dict(image_processor.size or {}), dict(getattr(image_processor, "crop_size", None) or {})
    if size.get("shortest_edge"):
        return int(size["shortest_edge"])
    sides = [v for v in (crop.get("height"), crop.get("width"), size.get("height"), size.get("width")) if v]
    return min(int(v) for v in sides) if sides else 224


class ImageTransform:
    """Batch transform: images → RGB → ``pixel_values`` with a CLIP image processor; labels → ``labels``.

    By default ``pixel_values`` are the processor's float output. With ``uint8=True`` the column must be
    undecoded (``with_image_transform`` arranges it): images are decoded here (``decode_image``, in draft
    mode for large JPEGs when ``draft=True``), resized and cropped by the processor, and kept as uint8
    for ``PixelNormalizer`` to finish on the device.
    """

    def __init__(
        self,
        image_processor: Any,
        image_column: str = "image",
        label_column: str = "label",
        *,
        uint8: bool = False,
        draft: bool = False,
        image_feature: Image | None = None,
    ) -> None:
        if draft and not uint8:
            raise ValueError("draft=True needs uint8=True: draft decoding is part of the uint8 training path.")
        self.image_processor = image_processor
        self.image_column = image_column
        self.label_column = label_column
        self.uint8 = uint8
        self.draft_size = _processor_size(image_processor) if draft else None
        self.image_feature = image_feature or Image()

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, torch.Tensor]:
        labels = torch.as_tensor(batch[self.label_column], dtype=torch.long)
        if not self.uint8:
            images = [image.convert("RGB") for image in batch[self.image_column]]
            pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
            return {"pixel_values": pixel_values, "labels": labels}
        images = [
            decode_image(value, self.image_feature, self.draft_size).convert("RGB") for value in batch[self.image_column]
        ]
        pixels = self.image_processor(images=images, do_rescale=False, do_normalize=False, return_tensors="pt")
        return {"pixel_values": pixels["pixel_values"].to(torch.uint8), "labels": labels}


class PixelNormalizer(nn.Module):
    """uint8 ``pixel_values`` → the image processor's float output, on whatever device they are.

    Rescaling and normalising act on each channel value alone, so a [3, 256] table of the processor's own
    output for the values 0…255 reproduces it bit for bit. Float input is returned unchanged.
    """

    def __init__(self, table: Tensor) -> None:
        super().__init__()
        if table.ndim != 2 or table.shape[1] != 256:
            raise ValueError(f"the lookup table must be [channels, 256], got shape {tuple(table.shape)}.")
        self.register_buffer("table", table.detach().float().clone(), persistent=False)

    @classmethod
    def from_processor(cls, image_processor: Any) -> PixelNormalizer:
        """The table of ``image_processor``'s rescale + normalise, measured on a 0…255 ramp image."""
        import numpy as np
        import PIL.Image

        ramp = PIL.Image.fromarray(np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2))
        out = image_processor(images=[ramp], do_resize=False, do_center_crop=False, return_tensors="pt")
        return cls(out["pixel_values"][0, :, 0, :])

    def forward(self, pixel_values: Tensor) -> Tensor:
        if pixel_values.dtype != torch.uint8:
            return pixel_values
        channels = self.table.shape[0]
        if pixel_values.ndim < 3 or pixel_values.shape[-3] != channels:
            raise ValueError(f"expected uint8 pixel_values [..., {channels}, H, W], got {tuple(pixel_values.shape)}.")
        table = self.table.to(pixel_values.device)
        out = torch.empty(pixel_values.shape, dtype=table.dtype, device=pixel_values.device)
        for channel in range(channels):  # one channel at a time: 4× less index memory than all at once
            out[..., channel, :, :] = torch.take(table[channel], pixel_values[..., channel, :, :].long())
        return out


def _attach(dataset: Dataset, transform_args: dict[str, Any], image_column: str, label_column: str) -> Dataset:
    feature = dataset.features[image_column]
    if transform_args.get("uint8"):
        if not isinstance(feature, Image):
            raise ValueError(
                f"column {image_column!r} is {feature!r}, not an image; cast it with "
                f"dataset.cast_column({image_column!r}, datasets.Image()) before attaching the uint8 transform."
            )
        # decoded in the transform instead (draft mode needs the bytes, not datasets' decoded image)
        transform_args = {**transform_args, "image_feature": Image(mode=feature.mode)}
        dataset = dataset.cast_column(image_column, Image(mode=feature.mode, decode=False))
    transform = ImageTransform(image_column=image_column, label_column=label_column, **transform_args)
    return dataset.with_transform(transform, columns=[image_column, label_column])


def with_image_transform(
    dataset: Dataset | DatasetDict,
    image_processor: Any,
    image_column: str = "image",
    label_column: str = "label",
    *,
    uint8: bool = False,
    draft: bool = False,
) -> Dataset | DatasetDict:
    """Attach ``ImageTransform`` lazily (``with_transform``): items are preprocessed when read, no full pass.

    ``uint8=True`` gives the GPU input path (normalise with ``PixelNormalizer``); ``draft=True`` adds
    JPEG draft decoding, for training only.
    """
    args = {"image_processor": image_processor, "uint8": uint8, "draft": draft}
    if isinstance(dataset, DatasetDict):
        return DatasetDict({name: _attach(split, args, image_column, label_column) for name, split in dataset.items()})
    return _attach(dataset, args, image_column, label_column)


def load_task(
    task: str | TaskSpec,
    data_dir: str | os.PathLike | None = None,
    image_processor: Any | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
    max_val_samples: int | None = 5000,
    seed: int = 0,
    uint8: bool = False,
    draft: bool = False,
) -> DatasetDict:
    """``DatasetDict(train, validation, test)`` for a task, from the Hub or ``data_dir``/``$SAFT_DATA_DIR``.

    With ``image_processor`` (e.g. the model's ``CLIPImageProcessor``) items come out as
    ``{"pixel_values", "labels"}``, preprocessed lazily; without it the raw columns are kept.
    ``uint8``/``draft``: see ``with_image_transform`` (draft applies to the train split only).
    """
    source = _local_source(task, data_dir)
    spec = _resolve_spec(task, source)
    raw = _load_raw(spec, source, cache_dir)
    _check(spec, raw, str(source) if source is not None else spec.dataset_id)
    train, validation = split_train_validation(raw[spec.train_split], val_fraction, max_val_samples, seed)
    splits = DatasetDict(train=train, validation=validation, test=raw[spec.test_split])
    if image_processor is not None:
        columns = (spec.image_column, spec.label_column)
        splits = DatasetDict(
            {
                name: with_image_transform(split, image_processor, *columns, uint8=uint8, draft=draft and name == "train")
                for name, split in splits.items()
            }
        )
    return splits
