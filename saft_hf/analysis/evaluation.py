"""Shared pieces of the analyses: evaluation data, per-task logits, and a model kept at base weights.

The analyses rewrite a model's parameters in place (``add_scaled_``) many times; everything here
exists so that they evaluate the same cached samples at every weight setting and always hand the
model back at θ₀.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset, default_collate

from ..task_vectors import add_scaled_

Batch = Mapping[str, Tensor]
# logits_fn(model, batch, task) -> (batch, num_classes) logits of task ``task``'s classifier.
LogitsFn = Callable[[nn.Module, Batch, str], Tensor]
# features_fn(model, batch) -> one (batch, ...) tensor per layer block.
FeaturesFn = Callable[[nn.Module, Batch], Sequence[Tensor]]

EVAL_KEYS = ("pixel_values", "labels")


def prepare_eval_data(
    dataset: Any, *, max_samples: int | None = None, batch_size: int = 32
) -> list[dict[str, Tensor]]:
    """Materialise the first ``max_samples`` examples of ``dataset`` as batches, once.

    The grid evaluates the same samples at every weight setting, so lazy transforms run only here.
    """
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be a positive integer or None, got {max_samples!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    size = len(dataset)
    if size == 0:
        raise ValueError("the evaluation dataset is empty; pass a split with at least one example.")
    count = size if max_samples is None else min(size, max_samples)
    loader = DataLoader(Subset(dataset, range(count)), batch_size=batch_size, collate_fn=_collate_eval)
    return list(loader)


def _collate_eval(examples: list[Mapping[str, Any]]) -> dict[str, Tensor]:
    missing = [key for key in EVAL_KEYS if key not in examples[0]]
    if missing:
        raise KeyError(
            f"evaluation examples lack {missing} (they have {sorted(examples[0])}); load the task "
            "with saft_hf.tasks.load_task so that examples carry 'pixel_values' and 'labels'."
        )
    return default_collate([{key: example[key] for key in EVAL_KEYS} for example in examples])


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@torch.no_grad()
def evaluate_task(
    model: nn.Module, batches: Sequence[Batch], logits_fn: LogitsFn, task: str
) -> tuple[Tensor, float]:
    """Predicted classes (N,) and mean cross-entropy of task ``task``'s classifier on ``batches``."""
    device = model_device(model)
    predictions, loss_sum, count = [], 0.0, 0
    for batch in batches:
        batch = {key: value.to(device) for key, value in batch.items()}
        logits = logits_fn(model, batch, task).float()
        loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
        predictions.append(logits.argmax(dim=-1).cpu())
        count += len(batch["labels"])
    if count == 0:
        raise ValueError(f"no evaluation samples for task {task!r}; pass at least one batch.")
    return torch.cat(predictions), loss_sum / count


@contextmanager
def at_base_afterwards(model: nn.Module, base_state: Mapping[str, Tensor]) -> Iterator[nn.Module]:
    """Run in eval mode and write θ₀ back on exit (even on error), restoring the training flag."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        add_scaled_(model, base_state, [], [])
        model.train(was_training)


def materialise(task_vector: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Read a (possibly lazy, memory-mapped) task vector into memory once, for repeated writes."""
    return {name: task_vector[name] for name in task_vector.keys()}


def sum_vectors(task_vectors: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Σ_k τ_k over the union of parameter names (a fixed-coefficient block of other tasks)."""
    total: dict[str, Tensor] = {}
    for task_vector in task_vectors:
        for name in task_vector.keys():
            value = task_vector[name].float()
            total[name] = total[name] + value if name in total else value.clone()
    return total


def image_embeds(model: nn.Module, batch: Batch) -> Tensor:
    """Projected image embeddings of a ``CLIPVisionModelWithProjection``-like model."""
    return model(pixel_values=batch["pixel_values"]).image_embeds


def block_outputs(model: nn.Module, batch: Batch) -> tuple[Tensor, ...]:
    """Output of every transformer block (``hidden_states[1:]``; index 0 is the embeddings)."""
    return tuple(model(pixel_values=batch["pixel_values"], output_hidden_states=True).hidden_states[1:])


def heads_logits_fn(
    heads: Mapping[str, Callable[[Tensor], Tensor]],
    embed_fn: Callable[[nn.Module, Batch], Tensor] = image_embeds,
) -> LogitsFn:
    """A ``logits_fn`` that classifies task t with ``heads[t]`` on top of the shared encoder."""

    def logits_fn(model: nn.Module, batch: Batch, task: str) -> Tensor:
        if task not in heads:
            raise KeyError(f"no classification head for task {task!r}; heads exist for {sorted(heads)}.")
        return heads[task](embed_fn(model, batch))

    return logits_fn
