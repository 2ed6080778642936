"""AdaMerging in a merge job: unlabeled inputs of every task, the learning run, and its output files.

The adaptation split's label column is dropped before any row is read, so no label value reaches
the process (AdaMerging, Yang et al. 2024, adapts on unlabeled test inputs).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..merging.adamerging import AdaMergingResult, adamerging_coefficients
from ..task_vectors import TaskVector
from .evaluation import DEFAULT_CACHE_BYTES
from .inputs import BaseModel, load_heads
from .job import ADAPT_SPLITS, MergeJob, MergeJobError

COEFFICIENTS_JSON = "adamerging_coefficients.json"
COEFFICIENTS_PNG = "adamerging_coefficients.png"


class UnlabeledImages:
    """``images[indices]`` → preprocessed ``pixel_values`` of those rows; each row is kept after its first read.

    AdaMerging draws a fresh random batch per task and step, so rows are cached one by one (up to
    ``cache_bytes``; later rows are re-read each time) rather than as ``CachedBatches``' fixed batches.
    """

    def __init__(self, dataset: Any, image_column: str, processor: Any, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.dataset = dataset.select_columns([image_column])  # the label column is gone before any read
        self.image_column = image_column
        self.processor = processor
        self.cache_bytes = cache_bytes
        self._cached: dict[int, Tensor] = {}
        self._used = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: Tensor | Sequence[int]) -> Tensor:
        wanted = [int(i) for i in indices]
        missing = sorted({i for i in wanted if i not in self._cached})
        fresh: dict[int, Tensor] = {}
        if missing:
            images = [image.convert("RGB") for image in self.dataset[missing][self.image_column]]
            pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
            fresh = dict(zip(missing, pixels))
            for index, row in fresh.items():
                size = row.numel() * row.element_size()
                if self._used + size <= self.cache_bytes:
                    self._cached[index], self._used = row, self._used + size
        return torch.stack([self._cached[i] if i in self._cached else fresh[i] for i in wanted])


def load_unlabeled(task: str, split: str, data_dir: str | os.PathLike | None, processor: Any) -> UnlabeledImages:
    """One task's ``split`` as unlabeled images (raw rows, label column dropped, preprocessed when drawn)."""
    from ..tasks import load_task, resolve_task

    if split not in ADAPT_SPLITS:
        raise MergeJobError(f"--adapt-split must be one of {list(ADAPT_SPLITS)}, got {split!r}.")
    dataset = load_task(task, data_dir)[split]
    if len(dataset) == 0:
        raise MergeJobError(f"the {split} split of task {task!r} is empty; AdaMerging needs unlabeled inputs.")
    return UnlabeledImages(dataset, resolve_task(task, data_dir).image_column, processor)


def run_adamerging(
    job: MergeJob, vectors: list[TaskVector], base: BaseModel, heads: dict[str, Any] | None = None
) -> AdaMergingResult:
    """Learn AdaMerging's λ for the job; ``base.model`` is left at the merged weights."""
    from transformers import AutoImageProcessor

    heads = heads if heads is not None else load_heads(vectors, job.data_dir, base)
    processor = AutoImageProcessor.from_pretrained(base.directory)
    inputs = {task: load_unlabeled(task, job.adapt_split_or_default, job.data_dir, processor) for task in heads}
    return adamerging_coefficients(
        base.model, base.state, vectors, heads, inputs, progress=job.progress, **job.method_args
    )


def write_adamerging_outputs(result: AdaMergingResult, directory: Path) -> None:
    """The learned λ as ``adamerging_coefficients.json`` and a task × block heatmap PNG (as in the paper)."""
    from ..analysis.plots import plot_coefficients
    from ..io_utils import atomic_write_json

    atomic_write_json(directory / COEFFICIENTS_JSON, result.to_dict())
    plot_coefficients(result.coefficients, result.tasks, result.blocks, directory / COEFFICIENTS_PNG)
