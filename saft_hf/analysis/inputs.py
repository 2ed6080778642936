"""Load what the analyses need from names: a CLIP vision tower, task vectors with heads, task data.

This is the glue behind ``saft-analyze``: Hub ids or directories in, ready-to-use objects out
(model, θ₀, one ``logits_fn`` per vector pair, materialised evaluation batches).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from transformers import AutoImageProcessor

from ..base_model import load_base_vision_tower, resolve_base
from ..clip import load_task_vector_head
from ..task_vectors import TaskVector, check_compatible, load_task_vector
from ..tasks import load_task
from .evaluation import LogitsFn, heads_logits_fn, prepare_eval_data


class VisionTowerHolder(nn.Module):
    """Holds a vision tower as ``.vision_model``, so vectors of a ``CLIPImageClassifier`` match its names."""

    def __init__(self, vision_model: nn.Module) -> None:
        super().__init__()
        self.vision_model = vision_model

    def forward(self, **kwargs: Any) -> Any:
        return self.vision_model(**kwargs)


@dataclass
class AnalysisInputs:
    """Everything ``analyze_pairs`` takes, loaded from names."""

    model: nn.Module
    base_state: dict[str, Tensor]
    tasks: tuple[str, str]
    pairs: dict[str, list[TaskVector]]
    logits_fns: dict[str, LogitsFn]
    data: dict[str, list[dict[str, Tensor]]]
    others: dict[str, list[TaskVector]] = field(default_factory=dict)


def load_analysis_inputs(
    base: str | os.PathLike,
    pairs: Mapping[str, Sequence[str | os.PathLike]],
    *,
    tasks: Sequence[str] | None = None,
    others: Mapping[str, Sequence[str | os.PathLike]] | None = None,
    data_dir: str | os.PathLike | None = None,
    split: str = "test",
    max_samples: int | None = None,
    batch_size: int = 32,
) -> AnalysisInputs:
    """Load the base vision tower, each labelled pair of task vectors (with their heads) and the data.

    Task names default to each vector's ``task`` config entry; heads come from the vectors'
    ``head.safetensors``; images are preprocessed with the base model's image processor.
    """
    loaded = {label: [load_task_vector(repo) for repo in repos] for label, repos in pairs.items()}
    for label, vectors in loaded.items():
        if len(vectors) != 2:
            raise ValueError(f"pair {label!r} has {len(vectors)} task vectors; give exactly two (e.g. a,b).")
    loaded_others = {label: [load_task_vector(repo) for repo in repos] for label, repos in (others or {}).items()}
    first = next(iter(loaded.values()))
    task_names = tuple(tasks) if tasks else tuple(_task_of(vector) for vector in first)
    if len(task_names) != 2:
        raise ValueError(f"give exactly two task names (e.g. --tasks A,B), got {list(task_names)}.")
    checkpoint = resolve_base(base)  # safetensors, else the conversion branch, else transformers' own loader
    model = _model_for(load_base_vision_tower(checkpoint), first[0])
    base_state = {name: value.detach().clone() for name, value in model.state_dict().items()}
    everything = [v for vectors in (*loaded.values(), *loaded_others.values()) for v in vectors]
    for vector in everything:
        check_compatible([vector], base_state)
    processor = AutoImageProcessor.from_pretrained(checkpoint.directory)
    data = {}
    for task in task_names:
        dataset = load_task(task, data_dir, image_processor=processor)
        if split not in dataset:
            raise KeyError(f"task {task!r} has no split {split!r}; choose one of {list(dataset)}.")
        data[task] = prepare_eval_data(dataset[split], max_samples=max_samples, batch_size=batch_size)
    logits_fns = {label: _logits_fn(vectors, task_names, data_dir) for label, vectors in loaded.items()}
    return AnalysisInputs(model, base_state, (task_names[0], task_names[1]), loaded, logits_fns, data, loaded_others)


def _task_of(vector: TaskVector) -> str:
    task = vector.config.get("task")
    if not task:
        raise ValueError(f"task vector {vector.source} records no 'task' in its config; pass the task names (--tasks A,B).")
    return str(task)


def _model_for(tower: nn.Module, vector: Mapping[str, Tensor]) -> nn.Module:
    """The tower itself, or the tower held as ``.vision_model`` when the vector's names carry that prefix."""
    names = set(dict(tower.named_parameters()))
    if all(name in names for name in vector.keys()):
        return tower
    return VisionTowerHolder(tower)  # check_compatible then names any parameter that still does not match


def _logits_fn(vectors: Sequence[TaskVector], tasks: Sequence[str], data_dir: str | os.PathLike | None) -> LogitsFn:
    heads = {task: load_task_vector_head(vector, task, data_dir) for vector, task in zip(vectors, tasks)}
    return heads_logits_fn(heads)
