"""Accuracy of one (merged) vision tower on several tasks: image features once per batch, then each task's head.

Each image is decoded once per job: ``CachedBatches`` keeps the first pass's uint8 pixels (150 kB per
224-px image, so a 5,000-image validation split takes ≈ 750 MB of the 1 GiB budget) and ``accuracy``
normalises them on the device with the task's ``PixelNormalizer``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

DEFAULT_CACHE_BYTES = 1 << 30
DEVICE_AUTO = "auto"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` (or None) → CUDA when available, else CPU; an explicit device must exist on this machine."""
    if device is None or str(device) == DEVICE_AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"--device {device!r} is not a torch device ({error}); use auto, cpu, cuda or cuda:N.") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r} asks for CUDA but this machine has no usable CUDA device; use auto or cpu.")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(
            f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s); use auto or cuda:0."
        )
    return resolved


def _normalizer_of(dataset: Any) -> Callable[[Tensor], Tensor] | None:
    """The ``PixelNormalizer`` for a dataset whose lazy transform yields uint8 pixels, else None."""
    from ..tasks.loading import ImageTransform, PixelNormalizer

    transform = (getattr(dataset, "format", None) or {}).get("format_kwargs", {}).get("transform")
    if isinstance(transform, ImageTransform) and transform.uint8:
        return PixelNormalizer.from_processor(transform.image_processor)
    return None


class CachedBatches:
    """Batches of ``pixel_values``/``labels`` from a lazily preprocessed dataset, kept after the first pass.

    A λ search evaluates the same samples 20 times; decoding them once saves most of the time.
    Batches beyond ``cache_bytes`` are re-read on every pass so memory stays bounded. The first pass
    decodes in ``num_workers`` DataLoader workers (default: ``default_num_workers()`` for a ``datasets``
    dataset, which decodes on read; 0 for in-memory data). ``normalize`` turns the cached uint8 pixels
    into the model's input on the device; by default it comes from the dataset's uint8 transform.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        num_workers: int | None = None,
        normalize: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        from datasets import Dataset

        from ..tasks.loading import default_num_workers

        self.dataset = dataset
        self.batch_size = batch_size
        self.cache_bytes = cache_bytes
        if num_workers is None:
            num_workers = default_num_workers() if isinstance(dataset, Dataset) else 0
        self.num_workers = num_workers
        self.normalize = normalize or _normalizer_of(dataset) or (lambda pixels: pixels)
        self._cached: list[tuple[Tensor, Tensor]] = []
        self._complete = False

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        yield from self._cached
        if self._complete:
            return
        from ..clip import collate_image_batch

        first_pass, start = not self._cached, len(self._cached) * self.batch_size
        rest = self.dataset if start == 0 else Subset(self.dataset, range(start, len(self.dataset)))
        # not pinned: the cache holds up to cache_bytes per task, too much to lock in RAM
        loader = DataLoader(rest, batch_size=self.batch_size, collate_fn=collate_image_batch, num_workers=self.num_workers)
        used, cache = 0, first_pass
        for batch in loader:
            pair = (batch["pixel_values"], batch["labels"])
            used += pair[0].numel() * pair[0].element_size()
            if cache and used <= self.cache_bytes:
                self._cached.append(pair)
            else:
                cache = False
            yield pair
        self._complete = cache


def accuracy(
    model: nn.Module, head: nn.Module, batches: CachedBatches, device: str | torch.device, desc: str, progress: bool
) -> float:
    """Top-1 accuracy of ``head(model(pixel_values).image_embeds)`` over ``batches`` (no grad)."""
    correct = total = 0
    with torch.no_grad():
        for pixel_values, labels in tqdm(batches, desc=desc, disable=not progress, leave=False):
            pixel_values = batches.normalize(pixel_values.to(device))
            image_embeds = model(pixel_values=pixel_values).image_embeds
            predictions = head(image_embeds).argmax(dim=-1).cpu()
            correct += int((predictions == labels).sum())
            total += labels.numel()
    return correct / total


class TaskEvaluator:
    """``evaluator(model)`` → ``{task: accuracy}`` on fixed per-task data, for ``search_coefficients`` and reports."""

    def __init__(
        self,
        heads: Mapping[str, nn.Module],
        data: Mapping[str, CachedBatches],
        device: str | torch.device = "cpu",
        progress: bool = True,
    ) -> None:
        self.heads = {task: head.to(device).eval() for task, head in heads.items()}
        self.data = dict(data)
        self.device = device
        self.progress = progress

    def task_accuracy(self, model: nn.Module, task: str) -> float:
        """Accuracy on one task only (e.g. a fine-tuned model on its own task)."""
        was_training = model.training
        model.eval()
        try:
            return accuracy(model, self.heads[task], self.data[task], self.device, f"eval {task}", self.progress)
        finally:
            model.train(was_training)

    def __call__(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            return {
                task: accuracy(model, head, self.data[task], self.device, f"eval {task}", self.progress)
                for task, head in self.heads.items()
            }
        finally:
            model.train(was_training)
