"""Accuracy of one (merged) vision tower on several tasks: image features once per batch, then each task's head."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

DEFAULT_CACHE_BYTES = 1 << 30


class CachedBatches:
    """Batches of ``pixel_values``/``labels`` from a lazily preprocessed dataset, kept after the first pass.

    A λ search evaluates the same samples 20 times; preprocessing them once saves most of the time.
    Batches beyond ``cache_bytes`` are re-read on every pass so memory stays bounded.
    """

    def __init__(self, dataset: Any, batch_size: int, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.cache_bytes = cache_bytes
        self._cached: list[tuple[Tensor, Tensor]] = []
        self._complete = False

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self._complete:
            yield from self._cached
            return
        from ..clip import collate_image_batch

        loader = DataLoader(self.dataset, batch_size=self.batch_size, collate_fn=collate_image_batch)
        used, cache = 0, not self._cached
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
            image_embeds = model(pixel_values=pixel_values.to(device)).image_embeds
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
