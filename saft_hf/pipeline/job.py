"""``MergeJob``: everything one ``saft-merge`` run needs, checked before any download or output.

Usage problems (wrong combination of options, λ ≤ 0, unknown method or parameter, existing output)
raise ``MergeUsageError``; problems found while running (bad files, mismatched vectors) raise
``MergeJobError`` or the task-vector / merging errors.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..merging import METHODS, MergeError, get_method
from ..merging.registry import DEFAULT_GRID
from ..tasks import DATA_DIR_ENV

Selection = Literal["absolute", "normalized", "per-task"]
ADAPT_SPLITS = ("test", "validation")  # AdaMerging's unlabeled inputs: test as in the paper, or validation


class MergeJobError(ValueError):
    """A merge job failed on its inputs (data, heads, recorded metrics, base model)."""


class MergeUsageError(MergeJobError):
    """The job's options are wrong or contradict each other (the CLI exits with code 2)."""


def _offline() -> bool:
    flags = (os.environ.get(name, "") for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(flag.strip().lower() in {"1", "true", "yes", "on"} for flag in flags)


@dataclass
class MergeJob:
    """Options of one merge: inputs, method, λ (fixed or searched), evaluation and outputs."""

    repos: list[str]
    output: str | os.PathLike
    base: str | None = None
    base_revision: str | None = None
    revisions: list[str | None] | None = None
    tasks: list[str] | None = None
    method: str = "ties"
    method_args: dict[str, Any] = field(default_factory=dict)
    scaling: float | None = None
    search: bool = False
    grid: list[float] | None = None
    select: Selection = "absolute"
    evaluate: bool = False
    data_dir: str | os.PathLike | None = None
    max_eval_samples: int | None = None
    batch_size: int = 128  # evaluation batch: fills a GPU for ViT-B/32, fine on a CPU
    device: str = "auto"  # CUDA when available, else CPU (resolved by validate)
    overwrite: bool = False
    push_to_hub: str | None = None
    private: bool | None = None
    token: str | None = field(default=None, repr=False)  # a secret: never in a repr or log
    progress: bool = True
    adapt_split: str | None = None

    @property
    def learns_coefficients(self) -> bool:
        """True for a method that learns its coefficients on unlabeled inputs (AdaMerging)."""
        return self.method in METHODS and METHODS[self.method].needs_data

    @property
    def adapt_split_or_default(self) -> str:
        return self.adapt_split or ADAPT_SPLITS[0]

    @property
    def needs_data(self) -> bool:
        return self.search or self.evaluate or self.learns_coefficients

    def merge_args(self) -> dict[str, Any]:
        """The method's user-given parameters, with ``scaling`` = λ unless λ is searched."""
        args = dict(self.method_args)
        if self.scaling is not None:
            args["scaling"] = float(self.scaling)
        return args

    def grid_values(self) -> tuple[float, ...]:
        """The λ grid to search: ``grid``, else the method's own grid, else 0.05…1.0 step 0.05."""
        if self.grid is not None:
            return tuple(float(v) for v in self.grid)
        return get_method(self.method).grid or DEFAULT_GRID

    def validate(self) -> None:
        """Raise ``MergeUsageError`` naming the first wrong option, its value and the fix."""
        self._check_repos()
        self._check_method()
        self._check_lambda()
        self._check_evaluation()
        self._check_adaptation()
        self._check_device()
        output = Path(self.output)
        if output.exists() and not self.overwrite:
            raise MergeUsageError(
                f"--output {str(output)!r} already exists; pass --overwrite to replace it or choose another folder."
            )
        if output.exists() and not output.is_dir():
            raise MergeUsageError(f"--output {str(output)!r} is a file, not a folder; choose another path.")

    def _check_device(self) -> None:
        """Resolve ``device`` ("auto" → cuda or cpu) here, so a missing CUDA is a usage error before any download."""
        from .evaluation import resolve_device

        try:
            self.device = str(resolve_device(self.device))
        except ValueError as error:
            raise MergeUsageError(str(error)) from None

    def _check_repos(self) -> None:
        repos = [str(r).strip() for r in self.repos]
        if len(repos) < 2 or any(not r for r in repos):
            raise MergeUsageError(
                f"merging needs at least two task vectors, got {repos!r}; pass --repos a,b[,c...]."
            )
        seen: set[str] = set()
        for repo in repos:
            key = str(Path(repo).resolve()) if Path(repo).exists() else repo
            if key in seen:
                raise MergeUsageError(f"repo {repo!r} is given twice in --repos; list each task vector once.")
            seen.add(key)
        if self.tasks is not None:
            from ..tasks import resolve_task

            if len(self.tasks) != len(repos):
                raise MergeUsageError(
                    f"got {len(repos)} repos but {len(self.tasks)} tasks; give one task per repo, in the order of --repos."
                )
            for task in self.tasks:
                try:
                    resolve_task(task, self.data_dir)
                except (KeyError, FileNotFoundError) as err:
                    raise MergeUsageError(f"--tasks: {err.args[0] if err.args else err}") from None
        if self.revisions is not None and len(self.revisions) != len(repos):
            raise MergeUsageError(
                f"got {len(repos)} repos but {len(self.revisions)} revisions; give one revision per repo "
                "(an empty entry means the default branch)."
            )

    def _check_method(self) -> None:
        try:
            spec = get_method(self.method)
            if self.scaling is not None and "scaling" in self.method_args:
                raise MergeError("λ is given twice (--scaling and --method-arg scaling=); give it once.")
            if self.search and "scaling" in self.method_args:
                raise MergeError("--method-arg scaling= cannot be combined with --search, which chooses λ.")
            if self.scaling is not None and not spec.scalable:
                raise MergeError(f"method {self.method!r} has no λ (scaling); drop --scaling.")
            if self.search and not spec.scalable:
                raise MergeError(f"method {self.method!r} has no λ to search; drop --search or pick another method.")
            spec.resolve(self.merge_args())
        except MergeError as err:
            raise MergeUsageError(str(err)) from None

    def _check_lambda(self) -> None:
        if self.scaling is not None and self.search:
            raise MergeUsageError(
                f"--scaling {self.scaling} and --search both set λ; give a fixed λ with --scaling, or let --search "
                "choose it."
            )
        if self.scaling is not None and not (math.isfinite(self.scaling) and self.scaling > 0):
            raise MergeUsageError(f"λ (--scaling) must be a finite number > 0, got {self.scaling!r}; e.g. --scaling 0.3.")
        if self.grid is not None:
            if not self.search:
                raise MergeUsageError("--grid is only used with --search; add --search or drop --grid.")
            bad = [v for v in self.grid if not (math.isfinite(v) and v > 0)]
            if not self.grid or bad:
                raise MergeUsageError(
                    f"--grid values must be finite λ > 0, got {self.grid!r}; e.g. --grid 0.1,0.2,0.3 or 0.05:1.0:0.05."
                )
            if len(set(self.grid)) < 2:
                raise MergeUsageError(
                    f"--grid gives {len(set(self.grid))} distinct λ value(s), {self.grid!r}: a search needs at least "
                    "two; e.g. --grid 0.05:1.0:0.05 (start:stop:step) or 0.1,0.2,0.3, or use --scaling for one λ."
                )
        if self.select not in ("absolute", "normalized", "per-task"):
            raise MergeUsageError(f"--select must be 'absolute', 'normalized' or 'per-task', got {self.select!r}.")
        if self.select == "per-task" and not self.search:
            raise MergeUsageError("--select per-task chooses a λ per task on validation; add --search (and --eval "
                                  "for the test accuracy at each task's λ).")  # fmt: skip

    def _check_evaluation(self) -> None:
        for name, value in (("--max-eval-samples", self.max_eval_samples), ("--batch-size", self.batch_size)):
            if value is not None and value < 1:
                raise MergeUsageError(f"{name} must be a positive integer, got {value!r}.")
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise MergeUsageError(f"--data-dir {str(self.data_dir)!r} is not a folder; point it at the task data.")
        if not self.needs_data:
            if self.data_dir is not None or self.select != "absolute":
                raise MergeUsageError("--data-dir and --select are only used with --search or --eval; add one of them.")
            return
        if self.data_dir is None and not os.environ.get(DATA_DIR_ENV) and _offline():
            what = "--search" if self.search else "--eval" if self.evaluate else f"--method {self.method}"
            raise MergeUsageError(
                f"{what} needs task data, but no --data-dir (or ${DATA_DIR_ENV}) is given and the Hub is offline; "
                "pass --data-dir DIR with one folder per task, or go online to load the datasets from the Hub."
            )

    def _check_adaptation(self) -> None:
        if self.adapt_split is None:
            return
        if not self.learns_coefficients:
            raise MergeUsageError(
                f"--adapt-split is only used by methods that learn on unlabeled inputs (adamerging), not "
                f"{self.method!r}; drop --adapt-split or pass --method adamerging."
            )
        if self.adapt_split not in ADAPT_SPLITS:
            raise MergeUsageError(f"--adapt-split must be one of {list(ADAPT_SPLITS)}, got {self.adapt_split!r}.")
