"""λ search: merge once at λ = 1, then write base + λ·merged into ONE loaded model per grid point.

All registered methods with a ``scaling`` parameter are linear in λ, so the merged vector is computed
once. Selection is by mean validation accuracy (absolute, or normalised by the fine-tuned
accuracies when ``normalize_by`` is given), as in Ilharco et al. 2023 and Yadav et al. 2023.

``select_per_task`` is the SAFT authors' protocol instead (BAIKLAB/SAFT-Merge ``merging.py``): for each
target task, the λ (and TIES mask rate) best on *that task's* validation split, so every task is reported
from its own merged model — there is no single merged model behind those numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from tqdm.auto import tqdm

from ..task_vectors import add_scaled_
from .api import merge
from .registry import DEFAULT_GRID, METHODS, MergeError, get_method

# The SAFT authors' merging.py: task_arithmetic and ties_merging search λ over this grid per target task.
AUTHORS_GRID = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
# Their ties_merging mask rates 0.7, 0.8, 0.9 zero the int(d * rate) smallest |τ| of each whole vector, i.e.
# keep the largest 30%, 20%, 10%: TIES density = 1 - mask rate. Their threshold rank is floor(d * rate), ours
# d - floor(d * density) = ceil(d * rate), so ours keeps at most one entry fewer per task vector.
AUTHORS_TIES_MASK_RATES = (0.7, 0.8, 0.9)
AUTHORS_TIES_DENSITIES = tuple(round(1.0 - r, 10) for r in AUTHORS_TIES_MASK_RATES)


@dataclass
class SearchResult:
    """Best λ and the per-λ table (accuracies per task and the selection score)."""

    method: str
    method_args: dict[str, Any]
    best_scaling: float
    best_score: float
    normalized: bool
    table: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "method_args": self.method_args,
            "best_scaling": self.best_scaling,
            "best_score": self.best_score,
            "normalized": self.normalized,
            "table": self.table,
        }

    def format_table(self) -> str:
        """One line per λ: the score and each task's accuracy in %; the chosen λ is starred."""
        tasks = list(self.table[0]["accuracies"]) if self.table else []
        score = "norm. mean" if self.normalized else "mean"
        lines = [f"{'λ':>6}  {score:>10}  " + "  ".join(f"{t:>10}" for t in tasks)]
        for row in self.table:
            mark = "*" if row["scaling"] == self.best_scaling else " "
            accs = "  ".join(f"{100 * row['accuracies'][t]:>10.2f}" for t in tasks)
            lines.append(f"{row['scaling']:>5.2f}{mark}  {100 * row['score']:>10.2f}  {accs}")
        return "\n".join(lines)


def _selection_score(accuracies: Mapping[str, float], normalize_by: Mapping[str, float] | None) -> float:
    if not accuracies:
        raise MergeError("evaluate(model) returned no accuracies; return {task: accuracy} for each task.")
    for task, value in accuracies.items():
        if not math.isfinite(float(value)):
            raise MergeError(f"evaluate(model) returned a non-finite accuracy {value!r} for task {task!r}.")
    if normalize_by is None:
        return sum(float(v) for v in accuracies.values()) / len(accuracies)
    missing = [task for task in accuracies if task not in normalize_by]
    if missing:
        raise MergeError(
            f"normalize_by has no fine-tuned accuracy for task {missing[0]!r}; give one for each of "
            f"{sorted(accuracies)}."
        )
    return sum(float(v) / float(normalize_by[t]) for t, v in accuracies.items()) / len(accuracies)


def _checked_grid(grid: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(v) for v in grid)
    if not values:
        raise MergeError("the λ grid is empty; pass e.g. grid=[0.1, 0.2, 0.3].")
    bad = [v for v in values if not math.isfinite(v) or v <= 0]
    if bad:
        raise MergeError(f"λ grid values must be finite and > 0, got {bad[0]!r}.")
    if len(set(values)) < 2:
        raise MergeError(
            f"the λ grid {list(values)!r} has fewer than two distinct values, so there is nothing to search; "
            "pass e.g. grid=[0.1, 0.2, 0.3], or merge with one fixed scaling instead."
        )
    return values


def search_coefficients(
    model: nn.Module,
    base_state: Mapping[str, Tensor],
    vectors: Sequence[Mapping[str, Tensor]],
    method: str,
    evaluate: Callable[[nn.Module], Mapping[str, float]],
    grid: Sequence[float] | None = None,
    method_args: Mapping[str, Any] | None = None,
    normalize_by: Mapping[str, float] | None = None,
    progress: bool = True,
) -> SearchResult:
    """Pick λ on validation accuracy; ``model`` is modified in place and left at base + best λ·merged."""
    spec = get_method(method)
    if not spec.scalable:
        raise MergeError(
            f"method {method!r} has no scaling coefficient λ to search; methods with one: "
            f"{', '.join(sorted(m for m, s in METHODS.items() if s.scalable))}."
        )
    args = dict(method_args or {})
    if "scaling" in args:
        raise MergeError("do not pass 'scaling' in method_args: the search sets λ from the grid.")
    if normalize_by is not None:
        bad = {t: v for t, v in normalize_by.items() if not (math.isfinite(float(v)) and float(v) > 0)}
        if bad:
            task = next(iter(bad))
            raise MergeError(f"normalize_by[{task!r}] must be a finite accuracy > 0, got {bad[task]!r}.")
    lambdas = _checked_grid(grid if grid is not None else (spec.grid or DEFAULT_GRID))
    unit = merge(vectors, method, progress=progress, scaling=1.0, **args)

    table: list[dict[str, Any]] = []
    for scaling in tqdm(lambdas, desc=f"λ search ({method})", disable=not progress):
        add_scaled_(model, base_state, unit, scaling)
        accuracies = {task: float(v) for task, v in evaluate(model).items()}
        table.append(
            {"scaling": scaling, "accuracies": accuracies, "score": _selection_score(accuracies, normalize_by)}
        )
    best = max(table, key=lambda row: row["score"])  # first λ wins a tie
    add_scaled_(model, base_state, unit, best["scaling"])
    return SearchResult(
        method=method,
        method_args={k: v for k, v in spec.resolve(args).items() if k != "scaling"},
        best_scaling=best["scaling"],
        best_score=best["score"],
        normalized=normalize_by is not None,
        table=table,
    )



@dataclass
class TaskChoice:
    """One target task's own setting under per-task selection: its λ, the method's other arguments, its score."""

    scaling: float
    method_args: dict[str, Any]
    validation: float

    def to_dict(self) -> dict[str, Any]:
        return {"scaling": self.scaling, "method_args": self.method_args, "validation": self.validation}


def select_per_task(results: Sequence[SearchResult]) -> dict[str, TaskChoice]:
    """Per task, the (λ, setting) with the best validation accuracy on that task alone (the SAFT authors' protocol).

    ``results``: one ``search_coefficients`` result per setting of the method's other knob (e.g. TIES
    density), over the same tasks. Ties go to the first candidate in the authors' loop order: λ outer
    (grid order), setting inner (``results`` order); their ``if accuracy > best_accuracy`` keeps the first.
    """
    if not results:
        raise MergeError("select_per_task needs at least one search result.")
    tasks = list(results[0].table[0]["accuracies"]) if results[0].table else []
    rows = max(len(r.table) for r in results)
    choices: dict[str, TaskChoice] = {}
    for task in tasks:
        best: TaskChoice | None = None
        for i in range(rows):
            for result in results:
                if i >= len(result.table):
                    continue
                row = result.table[i]
                value = float(row["accuracies"][task])
                if best is None or value > best.validation:
                    best = TaskChoice(float(row["scaling"]), dict(result.method_args), value)
        assert best is not None
        choices[task] = best
    return choices


def evaluate_per_task(
    model: nn.Module,
    base_state: Mapping[str, Tensor],
    vectors: Sequence[Mapping[str, Tensor]],
    method: str,
    choices: Mapping[str, TaskChoice],
    evaluate: Callable[[nn.Module, Sequence[str]], Mapping[str, float]],
    progress: bool = False,
) -> dict[str, float]:
    """Each task's accuracy at its own merged model (one merge per distinct choice); ``model`` ends at base.

    ``evaluate(model, tasks)`` returns ``{task: accuracy}`` for the tasks asked.
    """
    groups: dict[tuple[float, str], list[str]] = {}
    for task, choice in choices.items():
        key = (choice.scaling, repr(sorted(choice.method_args.items())))
        groups.setdefault(key, []).append(task)
    scores: dict[str, float] = {}
    for tasks in groups.values():
        choice = choices[tasks[0]]
        merged = merge(vectors, method, progress=progress, scaling=choice.scaling, **choice.method_args)
        add_scaled_(model, base_state, merged, 1.0)
        scores.update({t: float(v) for t, v in evaluate(model, tasks).items()})
    add_scaled_(model, base_state, [], [])
    return {task: scores[task] for task in choices}
