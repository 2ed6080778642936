"""``run_merge_job``: load → merge (fixed λ or λ search) → evaluate → write atomically → push."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..io_utils import atomic_output_dir, folder_sha256, local_label
from ..merging import AdaMergingResult, MergeReport, SearchResult, get_method, merge, search_coefficients
from ..task_vectors import TaskVector, add_scaled_
from .adaptation import run_adamerging, write_adamerging_outputs
from .evaluation import CachedBatches, TaskEvaluator
from .inputs import (
    BaseModel,
    base_record,
    load_all,
    load_heads,
    load_split,
    recorded_accuracy,
    recorded_validation_accuracy,
    task_names,
)
from .job import MergeJob
from .outputs import copy_heads, push_folder, write_metadata

PROCESSOR_NAME = "preprocessor_config.json"


@dataclass
class MergeOutcome:
    """What a job produced: the output folder, its config and results, and the Hub commit if pushed."""

    output: Path
    merge_config: dict[str, Any]
    results: dict[str, Any]
    search: SearchResult | None = None
    report: MergeReport | None = None
    commit_url: str | None = None
    adamerging: AdaMergingResult | None = None
    notes: list[str] = field(default_factory=list)


def _individual(vectors: list[TaskVector], tasks: list[str]) -> dict[str, float]:
    """Fine-tuned test accuracies recorded in the vectors' configs (to normalise the test report only)."""
    known = {}
    for vector, task in zip(vectors, tasks):
        value = recorded_accuracy(vector)
        if value is not None:
            known[task] = value
    return known


def _selection_reference(
    vectors: list[TaskVector], tasks: list[str], base: BaseModel, evaluate: TaskEvaluator
) -> tuple[dict[str, float], str | None]:
    """``--select normalized``: each fine-tuned model's *validation* accuracy, recorded or measured here.

    A vector that records none (e.g. a FusionBench tower) is applied alone at λ = 1 and evaluated on its own
    task's validation split: one extra validation pass per such task. Test data is never used here.
    """
    reference, measured = {}, []
    for vector, task in zip(vectors, tasks):
        value = recorded_validation_accuracy(vector)
        if value is None:
            add_scaled_(base.model, base.state, vector, 1.0)
            value = evaluate.task_accuracy(base.model, task)
            measured.append(f"{task} {value:.4f}")
        reference[task] = value
    add_scaled_(base.model, base.state, [], [])  # back to θ₀
    if not measured:
        return reference, None
    return reference, (
        f"--select normalized: {len(measured)} task vector(s) record no fine-tuned validation accuracy, so it was "
        f"measured (θ₀ + τ on its own validation split; one validation pass each): {', '.join(measured)}"
    )


def _evaluator(job: MergeJob, heads: dict[str, Any], base: BaseModel, split: str) -> TaskEvaluator:
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(base.directory)
    data = {
        task: CachedBatches(load_split(task, split, job.data_dir, processor, job.max_eval_samples), job.batch_size)
        for task in heads
    }
    return TaskEvaluator(heads, data, job.device, job.progress)


def _repo_record(repo: str, revision: str | None, vector: TaskVector) -> dict[str, Any]:
    """How ``merge_config.json`` and the card name an input: its Hub id, or for a local folder its name and a
    content fingerprint (never the path, which would publish this machine's layout)."""
    if Path(repo).is_dir():
        return {"repo": local_label(repo), "revision": None, "resolved_revision": None, "local": True,
                "sha256": folder_sha256(repo)}  # fmt: skip
    return {"repo": repo, "revision": revision, "resolved_revision": vector.source.rsplit("@", 1)[-1], "local": False}


def _untouched_note(vectors: list[TaskVector], base: BaseModel) -> str | None:
    """Which base parameters no vector changes (a FusionBench tower has no visual_projection): they stay θ₀."""
    covered = set().union(*(set(v.names) for v in vectors))
    missing = sorted(name for name in base.state if name not in covered)
    if not missing:
        return None
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    return f"{len(missing)} base parameter(s) are in no task vector and keep the base's values: {shown}"


def run_merge_job(job: MergeJob) -> MergeOutcome:
    """Run a validated-on-entry merge job; nothing is written unless every step succeeds."""
    job.validate()
    spec = get_method(job.method)
    vectors, base = load_all(job)
    tasks = task_names(vectors)
    individual = _individual(vectors, tasks)
    notes: list[str] = [base.checkpoint.describe()]
    notes += [note for note in [_untouched_note(vectors, base)] if note]
    heads = load_heads(vectors, job.data_dir, base) if job.needs_data else {}  # built once for every stage
    if job.select == "per-task":  # the SAFT authors' protocol: a λ per task, not one merged model
        from .per_task import run_per_task_job

        revisions = job.revisions or [None] * len(vectors)
        repos = [_repo_record(r, rev, v) for r, rev, v in zip(job.repos, revisions, vectors)]
        return run_per_task_job(job, vectors, base, tasks, individual,
                                lambda split: _evaluator(job, heads, base, split), repos)  # fmt: skip

    search: SearchResult | None = None
    adaptation: AdaMergingResult | None = None
    if job.learns_coefficients:
        adaptation = run_adamerging(job, vectors, base, heads)
        method_args = adaptation.method_args
    elif job.search:
        normalize_by = None
        evaluate = _evaluator(job, heads, base, "validation")
        if job.select == "normalized":
            normalize_by, note = _selection_reference(vectors, tasks, base, evaluate)
            notes += [note] if note else []
        search = search_coefficients(
            base.model, base.state, vectors, job.method, evaluate, grid=job.grid_values(),
            method_args=job.method_args, normalize_by=normalize_by, progress=job.progress,
        )  # fmt: skip
        method_args = {**search.method_args, "scaling": search.best_scaling}
    else:
        method_args = spec.resolve(job.merge_args())
        merged = merge(vectors, job.method, progress=job.progress, **method_args)
        add_scaled_(base.model, base.state, merged, 1.0)

    report: MergeReport | None = None
    if job.evaluate:
        accuracies = _evaluator(job, heads, base, "test")(base.model)
        report = MergeReport.from_accuracies(accuracies, individual, job.method, method_args)

    revisions = job.revisions or [None] * len(vectors)
    merge_config = {
        "saft_hf_version": __version__,
        "method": job.method,
        "paper": spec.paper,
        "method_args": method_args,
        "scaling": method_args.get("scaling"),
        "repos": [_repo_record(r, rev, v) for r, rev, v in zip(job.repos, revisions, vectors)],
        "tasks": tasks,
        "base_model": base_record(base),
        "search": None
        if search is None
        else {
            "grid": list(job.grid_values()),
            "selection": "normalized" if search.normalized else "absolute",
            "selection_requested": job.select,
            "table": search.table,
        },
        "evaluation": {"split": "test", "max_eval_samples": job.max_eval_samples} if job.evaluate else None,
    }
    if adaptation is not None:  # labels of this split are never read
        merge_config["adaptation"] = {"split": job.adapt_split_or_default, "labels_read": False}
    results = {
        "method": job.method,
        "method_args": method_args,
        "scaling": method_args.get("scaling"),
        "search": search.to_dict() if search is not None else None,
        "evaluation": report.to_dict() if report is not None else None,
        "notes": notes,
    }
    if adaptation is not None:
        results["adamerging"] = adaptation.to_dict()
    output = Path(job.output)
    with atomic_output_dir(output, overwrite=job.overwrite) as tmp:
        base.model.save_pretrained(tmp)
        if (base.directory / PROCESSOR_NAME).is_file():  # so the folder loads with AutoImageProcessor too
            shutil.copyfile(base.directory / PROCESSOR_NAME, tmp / PROCESSOR_NAME)
        copy_heads(vectors, tasks, tmp, heads)
        if adaptation is not None:
            write_adamerging_outputs(adaptation, tmp)
        write_metadata(tmp, merge_config, results, report.format_table() if report is not None else None)
    commit_url = None
    if job.push_to_hub:
        message = f"saft-merge: {job.method} of {len(vectors)} task vectors"
        commit_url = push_folder(output, job.push_to_hub, job.private, job.token, message)
    return MergeOutcome(output, merge_config, results, search, report, commit_url, adaptation, notes)
