"""Per-task evaluation report of a merged model: absolute and normalised accuracy, and their means.

Normalised accuracy = merged / individual (fine-tuned) accuracy, as reported by TIES (Yadav et al.
2023) and the SAFT paper, so tasks of different difficulty weigh the same.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .registry import MergeError


@dataclass(frozen=True)
class TaskResult:
    """One task's accuracies in [0, 1]; ``individual`` is the fine-tuned model's, when known."""

    task: str
    merged: float
    individual: float | None = None

    @property
    def normalized(self) -> float | None:
        return None if self.individual is None else self.merged / self.individual


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _checked(task: str, value: float, what: str) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise MergeError(f"{what} accuracy of task {task!r} must be a finite number ≥ 0, got {value!r}.")
    return value


@dataclass
class MergeReport:
    """Accuracies of a merged model per task, plus means; ``format_table`` prints, ``to_dict`` is JSON-ready."""

    tasks: list[TaskResult]
    method: str | None = None
    method_args: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_accuracies(
        cls,
        merged: Mapping[str, float],
        individual: Mapping[str, float] | None = None,
        method: str | None = None,
        method_args: Mapping[str, Any] | None = None,
    ) -> MergeReport:
        """Build a report from ``{task: accuracy}`` of the merged and (optionally) fine-tuned models."""
        if not merged:
            raise MergeError("no merged accuracies given; pass {task: accuracy} for at least one task.")
        individual = individual or {}
        rows = []
        for task, accuracy in merged.items():
            known = individual.get(task)
            if known is not None and _checked(task, known, "individual") == 0:
                raise MergeError(f"individual accuracy of task {task!r} is 0; cannot normalise by it.")
            rows.append(
                TaskResult(
                    task, _checked(task, accuracy, "merged"), None if known is None else float(known)
                )
            )
        return cls(rows, method, dict(method_args or {}))

    @property
    def mean_accuracy(self) -> float:
        return sum(r.merged for r in self.tasks) / len(self.tasks)

    @property
    def mean_normalized(self) -> float | None:
        """Mean normalised accuracy over the tasks whose individual accuracy is known."""
        return _mean([r.normalized for r in self.tasks if r.normalized is not None])

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "method_args": self.method_args,
            "tasks": [
                {"task": r.task, "merged": r.merged, "individual": r.individual, "normalized": r.normalized}
                for r in self.tasks
            ],
            "mean_accuracy": self.mean_accuracy,
            "mean_normalized": self.mean_normalized,
        }

    def format_table(self) -> str:
        """Plain-text table, accuracies in %, one row per task and a mean row."""

        def pct(value: float | None) -> str:
            return "-" if value is None else f"{100 * value:.2f}"

        width = max(len("mean"), *(len(r.task) for r in self.tasks))
        title = f"{self.method or 'merged'}" + (
            " (" + ", ".join(f"{k}={v}" for k, v in self.method_args.items()) + ")" if self.method_args else ""
        )
        lines = [title, f"{'task':<{width}}  {'merged':>8}  {'individual':>10}  {'normalized':>10}"]
        for r in self.tasks:
            lines.append(f"{r.task:<{width}}  {pct(r.merged):>8}  {pct(r.individual):>10}  {pct(r.normalized):>10}")
        mean_individual = _mean([r.individual for r in self.tasks if r.individual is not None])
        lines.append(
            f"{'mean':<{width}}  {pct(self.mean_accuracy):>8}  {pct(mean_individual):>10}  "
            f"{pct(self.mean_normalized):>10}"
        )
        return "\n".join(lines)
