"""Load a merge job's inputs from names: the task vectors, the base vision tower, heads and task data."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..base_model import BaseCheckpoint, load_base_clip, load_base_vision_tower, resolve_base
from ..io_utils import folder_sha256, local_label
from ..task_vectors import TaskVector, check_compatible, load_task_vector, load_task_vectors
from ..tasks import TASKS
from .job import MergeJob, MergeJobError, MergeUsageError


@dataclass
class BaseModel:
    """The pre-trained vision tower, a CPU copy of its weights θ₀, and the checkpoint it was read from."""

    model: nn.Module
    state: dict[str, Tensor]
    checkpoint: BaseCheckpoint

    @property
    def id(self) -> str:
        return self.checkpoint.id

    @property
    def directory(self) -> Path:
        return self.checkpoint.directory


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
    """The base CLIP vision tower, read as transformers reads it (:func:`saft_hf.base_model.resolve_base`)."""
    checkpoint = resolve_base(base, revision=revision, token=token)
    model = load_base_vision_tower(checkpoint).to(device).eval()
    state = {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters()}
    return BaseModel(model, state, checkpoint)


def base_record(base: BaseModel) -> dict[str, Any]:
    """What ``merge_config.json`` records of the base: file, branch and commits; a local one by name and hash."""
    record = base.checkpoint.record()
    if base.checkpoint.local and Path(record["id"]).is_dir():
        record.update(id=local_label(record["id"]), sha256=folder_sha256(base.directory))
    return record


def load_all(job: MergeJob) -> tuple[list[TaskVector], BaseModel]:
    """Task vectors and base, with names, shapes and recorded base ids checked against each other."""
    vectors, base_id, revision = load_vectors(job)
    base = load_base(base_id, revision, job.token, job.device)
    if vectors:
        vectors = [vector.to_base_layout(base.state) for vector in vectors]  # e.g. a LoRA made on CLIPVisionModel
        check_compatible(vectors, base.state, base_id=base.id)
    else:
        revisions = [r or None for r in job.revisions] if job.revisions else None
        vectors = load_task_vectors(job.repos, base=base.state, base_id=base.id, revisions=revisions, token=job.token)
    assign_tasks(vectors, job.repos, job.tasks, required=job.needs_data)
    return pad_untouched(vectors), base


def pad_untouched(vectors: Sequence[TaskVector]) -> list[TaskVector]:
    """Vectors that change different parameter sets (LoRA beside full fine-tunes) get zero deltas where they
    changed nothing, so every method sees one parameter set; the names were checked against the base."""
    shapes: dict[str, tuple[int, ...]] = {}
    for vector in vectors:
        for name, shape in vector.shapes.items():
            shapes.setdefault(name, tuple(shape))
    return [vector.padded(shapes) for vector in vectors]


def _normalised(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def task_from_repo_name(repo: str) -> str | None:
    """The task a FusionBench-style repo names (``…/clip-vit-base-patch32_stanford-cars`` → ``Cars``), or None.

    The part after the last ``_`` is compared with each task's name and Hub dataset name, ignoring case,
    ``-``, ``_`` and spaces.
    """
    suffix = _normalised(Path(str(repo).rstrip("/")).name.rsplit("_", 1)[-1])
    for name, spec in TASKS.items():
        if suffix in {_normalised(name), _normalised(spec.dataset_id.split("/")[-1])}:
            return name
    return None


def assign_tasks(
    vectors: Sequence[TaskVector], repos: Sequence[str], tasks: Sequence[str] | None, required: bool = True
) -> None:
    """Give each vector its task: ``--tasks``, else the one it records, else the one its repo name says.

    A vector left without one is an error when ``required`` (evaluation, search and AdaMerging need the data).
    """
    for index, (vector, repo) in enumerate(zip(vectors, repos)):
        recorded = vector.config.get("task")
        given = tasks[index] if tasks else None
        if given and recorded and _normalised(str(recorded)) != _normalised(given):
            raise MergeUsageError(
                f"--tasks names {given!r} for {repo!r}, but that task vector records task {recorded!r}; fix --tasks "
                "(one task per repo, in the order of --repos)."
            )
        task = given or recorded or task_from_repo_name(repo)
        if not task and not required:
            continue
        if not task:
            raise MergeUsageError(
                f"{repo!r} records no task and its name does not name one (FusionBench style, e.g. "
                f"…_stanford-cars); pass --tasks T1,T2,… with one of {', '.join(TASKS)} per repo, in the order of --repos."
            )
        vector.config["task"] = TASKS[task].name if task in TASKS else task


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


def load_heads(
    vectors: Sequence[TaskVector], data_dir: str | os.PathLike | None, base: BaseModel | None = None
) -> dict[str, Any]:
    """One ``ZeroShotHead`` per task: each vector's ``head.safetensors``, checked against the task; for a vector
    without one (e.g. a FusionBench tower), the zero-shot head built from ``base``'s text tower."""
    from ..clip import load_task_vector_head

    heads = {}
    built: dict[str, Any] = {}
    for vector in vectors:
        task = vector.config.get("task")
        if not task:
            raise MergeJobError(
                f"task vector {vector.source} records no 'task' in its config, so its data cannot be found; "
                "re-create it with config={'task': ...}."
            )
        if task in heads:
            raise MergeJobError(f"two task vectors are for task {task!r}; evaluation needs one vector per task.")
        if vector.head_dir is None and base is not None:
            heads[str(task)] = base_zero_shot_head(base, str(task), data_dir, built)
        else:
            heads[str(task)] = load_task_vector_head(vector, str(task), data_dir)
    return heads


def base_zero_shot_head(base: BaseModel, task: str, data_dir: str | os.PathLike | None, cache: dict[str, Any]) -> Any:
    """The head ``train_saft.py`` builds for ``task``: the base CLIP's text tower on the task's prompts."""
    from transformers import AutoTokenizer

    from ..clip import build_zero_shot_head
    from ..tasks import resolve_task

    if "clip" not in cache:  # the text tower is loaded once per job
        cache["clip"] = load_base_clip(base.checkpoint).eval()
        cache["tokenizer"] = AutoTokenizer.from_pretrained(base.directory)
    spec = resolve_task(task, data_dir)
    return build_zero_shot_head(cache["clip"], cache["tokenizer"], spec.classnames, spec.templates, task=spec.name).eval()


def load_split(
    task: str, split: str, data_dir: str | os.PathLike | None, processor: Any, max_samples: int | None
) -> Any:
    """One split of a task, preprocessed lazily with the base model's image processor, cut to ``max_samples``."""
    from ..tasks import load_task

    dataset = load_task(task, data_dir, image_processor=processor, uint8=True)[split]  # normalised on the device
    if len(dataset) == 0:
        raise MergeJobError(f"the {split} split of task {task!r} is empty; nothing to evaluate on.")
    return dataset.select(range(min(max_samples, len(dataset)))) if max_samples else dataset
