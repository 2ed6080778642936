"""Load a merge job's inputs from names: the task vectors, the base vision tower, heads and task data."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..hub import download_repo
from ..task_vectors import TaskVector, check_compatible, load_task_vector, load_task_vectors
from .job import MergeJob, MergeJobError


@dataclass
class BaseModel:
    """The pre-trained vision tower, a CPU copy of its weights θ₀, and where it came from."""

    model: nn.Module
    state: dict[str, Tensor]
    id: str
    revision: str | None
    resolved_revision: str | None
    directory: Path


def infer_base(vectors: Sequence[TaskVector]) -> tuple[str, str | None]:
    """The ``base_model`` (and revision) every vector records; an error if none does or they disagree."""
    recorded = {(v.config.get("base_model"), v.config.get("base_model_revision")) for v in vectors}
    ids = {base for base, _ in recorded if base}
    if not ids:
        raise MergeJobError(
            "none of the task vectors records its base model ('base_model' in task_vector_config.json); "
            "pass --base MODEL_ID."
        )
    if len(ids) > 1 or any(not base for base, _ in recorded):
        listing = ", ".join(f"{v.source}: {v.config.get('base_model')!r}" for v in vectors)
        raise MergeJobError(
            f"the task vectors record different base models ({listing}); merge only vectors fine-tuned from "
            "one base, or pass --base to check them against one."
        )
    revisions = {rev for _, rev in recorded}
    return ids.pop(), revisions.pop() if len(revisions) == 1 else None


def load_vectors(job: MergeJob) -> tuple[list[TaskVector], str, str | None]:
    """The job's task vectors (lazy) and the base id + revision they are checked against."""
    revisions = [r or None for r in job.revisions] if job.revisions else [None] * len(job.repos)
    if job.base is not None:
        return [], job.base, job.base_revision
    vectors = [load_task_vector(r, revision=rev, token=job.token) for r, rev in zip(job.repos, revisions)]
    base, revision = infer_base(vectors)
    return vectors, base, job.base_revision or revision


def load_base(base: str, revision: str | None, token: str | None, device: str) -> BaseModel:
    """The base CLIP vision tower, from safetensors only (Hub: only *.safetensors/*.json are fetched)."""
    from ..clip import load_vision_tower

    if Path(base).is_dir():
        directory, resolved = Path(base), None
    else:
        directory, label = download_repo(base, revision=revision, token=token)
        resolved = label.rsplit("@", 1)[-1]
    model = load_vision_tower(directory, use_safetensors=True).to(device).eval()
    state = {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters()}
    return BaseModel(model, state, base, revision, resolved, directory)


def load_all(job: MergeJob) -> tuple[list[TaskVector], BaseModel]:
    """Task vectors and base, with names, shapes and recorded base ids checked against each other."""
    vectors, base_id, revision = load_vectors(job)
    base = load_base(base_id, revision, job.token, job.device)
    if vectors:
        vectors = [vector.to_base_layout(base.state) for vector in vectors]  # e.g. a LoRA made on CLIPVisionModel
        check_compatible(vectors, base.state, base_id=base_id)
    else:
        revisions = [r or None for r in job.revisions] if job.revisions else None
        vectors = load_task_vectors(job.repos, base=base.state, base_id=base_id, revisions=revisions, token=job.token)
    return vectors, base


def task_names(vectors: Sequence[TaskVector]) -> list[str]:
    """Each vector's task (its config ``task``, else ``task<i>``), made unique with ``-<i>`` suffixes."""
    names = [str(v.config.get("task") or f"task{i}") for i, v in enumerate(vectors)]
    return [f"{n}-{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def recorded_accuracy(vector: TaskVector) -> float | None:
    """The fine-tuned model's accuracy recorded in the vector's config (``metrics.accuracy`` first)."""
    metrics = vector.config.get("metrics") or {}
    for value in (metrics.get("accuracy"), metrics.get("test_accuracy"), vector.config.get("test_accuracy")):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def recorded_validation_accuracy(vector: TaskVector) -> float | None:
    """The fine-tuned model's validation accuracy recorded in the vector (``metrics.validation_accuracy``).

    λ selection normalises by this one, never by the test accuracy, so test data cannot steer the choice.
    """
    value = (vector.config.get("metrics") or {}).get("validation_accuracy")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    return None


def load_heads(vectors: Sequence[TaskVector], data_dir: str | os.PathLike | None) -> dict[str, Any]:
    """One ``ZeroShotHead`` per task, from each vector's ``head.safetensors``, checked against the task."""
    from ..clip import load_task_vector_head

    heads = {}
    for vector in vectors:
        task = vector.config.get("task")
        if not task:
            raise MergeJobError(
                f"task vector {vector.source} records no 'task' in its config, so its data cannot be found; "
                "re-create it with config={'task': ...}."
            )
        if task in heads:
            raise MergeJobError(f"two task vectors are for task {task!r}; evaluation needs one vector per task.")
        heads[str(task)] = load_task_vector_head(vector, str(task), data_dir)
    return heads


def load_split(
    task: str, split: str, data_dir: str | os.PathLike | None, processor: Any, max_samples: int | None
) -> Any:
    """One split of a task, preprocessed lazily with the base model's image processor, cut to ``max_samples``."""
    from ..tasks import load_task

    dataset = load_task(task, data_dir, image_processor=processor, uint8=True)[split]  # normalised on the device
    if len(dataset) == 0:
        raise MergeJobError(f"the {split} split of task {task!r} is empty; nothing to evaluate on.")
    return dataset.select(range(min(max_samples, len(dataset)))) if max_samples else dataset
