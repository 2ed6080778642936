"""``saft-merge --select per-task``: the SAFT authors' selection protocol (BAIKLAB/SAFT-Merge ``merging.py``).

Each task gets its own λ (TIES: and its own mask rate) chosen on *its own* validation split, and its test
accuracy is measured at that model. There is no single merged model behind such a table, so nothing but
the choices, the accuracies and a card saying so is written: merge again with ``--scaling λ`` for a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import ModelCard, ModelCardData

from .. import __version__
from ..io_utils import atomic_output_dir, atomic_write_json
from ..merging import MergeReport, get_method, search_coefficients
from ..merging.search import AUTHORS_GRID, AUTHORS_TIES_DENSITIES, evaluate_per_task, select_per_task
from ..task_vectors import TaskVector
from .evaluation import TaskEvaluator
from .inputs import BaseModel, base_record

if TYPE_CHECKING:
    from .job import MergeJob
    from .run import MergeOutcome

NOT_ONE_MODEL = (
    "per-task selection: each task's accuracy comes from its own λ (chosen on that task's validation split), "
    "so these numbers are NOT those of one merged model; no merged weights are written"
)

_CARD = """---
{{ card_data }}
---

# Per-task λ selection ({{ method }}): NOT one merged model

Each task's λ{% if ties %} and TIES density{% endif %} was chosen on **that task's own validation split**, as
the SAFT paper's released code does (BAIKLAB/SAFT-Merge `merging.py`), and its test accuracy measured at
that model. The table is therefore not the accuracy of one merged model, and no merged weights are in this
folder; to build the model for one task, run `saft-merge` with `--scaling` set to that task's λ.

| task | λ | other arguments | validation | test |
|---|---|---|---|---|
{% for row in rows %}| {{ row.task }} | {{ row.scaling }} | {{ row.args }} | {{ row.validation }} | {{ row.test }} |
{% endfor %}
Grid: {{ grid }}{% if densities %}; TIES densities {{ densities }} (the authors' mask rates 0.7/0.8/0.9 keep
the largest 30/20/10%){% endif %}. Task vectors: {{ repos }}. `results.json` records every choice and score.
"""


def per_task_grid(job: MergeJob) -> tuple[float, ...]:
    """--grid, else the authors' λ grid for task arithmetic and TIES, else the method's own."""
    if job.grid is not None:
        return tuple(float(v) for v in job.grid)
    if job.method in ("task_arithmetic", "ties"):
        return AUTHORS_GRID
    return job.grid_values()


def per_task_settings(job: MergeJob) -> list[dict[str, Any]]:
    """The method arguments searched beside λ: TIES over the authors' densities unless --method-arg density."""
    if job.method == "ties" and "density" not in job.method_args:
        return [{**job.method_args, "density": d} for d in AUTHORS_TIES_DENSITIES]
    return [dict(job.method_args)]


def run_per_task_job(
    job: MergeJob,
    vectors: list[TaskVector],
    base: BaseModel,
    tasks: list[str],
    individual: dict[str, float],
    evaluator: Any,
    repos: list[dict[str, Any]],
) -> MergeOutcome:
    """Search each setting once over the grid, choose per task, test each task at its own model, write."""
    from .run import MergeOutcome

    grid = per_task_grid(job)
    validation: TaskEvaluator = evaluator("validation")
    results_per_setting = [
        search_coefficients(base.model, base.state, vectors, job.method, validation, grid=grid,
                            method_args=settings, progress=job.progress)
        for settings in per_task_settings(job)
    ]  # fmt: skip
    choices = select_per_task(results_per_setting)
    report = None
    test_scores: dict[str, float] = {}
    if job.evaluate:
        test: TaskEvaluator = evaluator("test")

        def evaluate(model: Any, subset: Any) -> dict[str, float]:
            return TaskEvaluator({t: test.heads[t] for t in subset}, {t: test.data[t] for t in subset},
                                 test.device, test.progress)(model)  # fmt: skip

        test_scores = evaluate_per_task(base.model, base.state, vectors, job.method, choices, evaluate, job.progress)
        report = MergeReport.from_accuracies(test_scores, individual, job.method, {"selection": "per-task"})
    per_task = {t: {**c.to_dict(), "test": test_scores.get(t)} for t, c in choices.items()}
    merge_config = {
        "saft_hf_version": __version__,
        "method": job.method,
        "paper": get_method(job.method).paper,
        "selection": "per-task",
        "one_merged_model": False,
        "grid": list(grid),
        "settings": per_task_settings(job),
        "repos": repos,
        "tasks": tasks,
        "base_model": base_record(base),
    }
    results = {
        "method": job.method,
        "selection": "per-task",
        "one_merged_model": False,
        "note": NOT_ONE_MODEL,
        "per_task": per_task,
        "searches": [r.to_dict() for r in results_per_setting],
        "evaluation": report.to_dict() if report is not None else None,
        "notes": [NOT_ONE_MODEL],
    }
    output = Path(job.output)
    with atomic_output_dir(output, overwrite=job.overwrite) as tmp:
        atomic_write_json(tmp / "merge_config.json", merge_config)
        atomic_write_json(tmp / "results.json", results)
        _card(job, merge_config, per_task).save(tmp / "README.md")
    return MergeOutcome(output, merge_config, results, None, report, None, None, [NOT_ONE_MODEL])


def _card(job: MergeJob, merge_config: dict[str, Any], per_task: dict[str, dict[str, Any]]) -> ModelCard:
    def pct(value: float | None) -> str:
        return "—" if value is None else f"{100 * value:.2f}"

    rows = [
        {"task": t, "scaling": c["scaling"], "validation": pct(c["validation"]), "test": pct(c["test"]),
         "args": ", ".join(f"{k}={v}" for k, v in c["method_args"].items()) or "—"}
        for t, c in per_task.items()
    ]  # fmt: skip
    densities = [s["density"] for s in merge_config["settings"] if "density" in s] if job.method == "ties" else []
    data = ModelCardData(library_name="saft-hf", tags=["saft", "model-merging", "per-task-selection"])
    return ModelCard.from_template(
        data, template_str=_CARD, method=job.method, ties=job.method == "ties", rows=rows,
        grid=", ".join(f"{v:g}" for v in merge_config["grid"]), densities=", ".join(f"{d:g}" for d in densities),
        repos=", ".join(r["repo"] for r in merge_config["repos"]),
    )  # fmt: skip
