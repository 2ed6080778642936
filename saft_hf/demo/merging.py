"""Merge one variant's task vectors with a library method, choosing λ (and its other knob) on validation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from transformers import CLIPVisionModelWithProjection

from ..clip import ZeroShotHead
from ..merging import SearchResult, merge, search_coefficients
from ..merging.adamerging import adamerging_coefficients
from ..merging.search import AUTHORS_GRID, AUTHORS_TIES_DENSITIES, evaluate_per_task, select_per_task
from ..task_vectors import add_scaled_
from .config import DEMO_METHODS as METHODS  # noqa: F401  (re-exported)
from .config import DemoArguments
from .finetune import Items, accuracies

# Methods the per-task (SAFT authors') selection runs for: λ-scaled ones; AdaMerging learns its own.
PER_TASK_METHODS = ("task_arithmetic", "ties", "pcb", "tsv_m", "iso_c", "iso_cts")
PER_TASK_SUFFIX = "@per-task"

# A coarser α grid than the registry's 0.1…3.0 for the SVD methods, to keep the demo's search cheap.
SVD_GRID = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0)


def method_settings(method: str, args: DemoArguments) -> list[dict[str, Any]]:
    """The non-λ settings searched for `method` (TIES density, PCB ratio), each with a full λ search."""
    if method == "ties":
        return [{"density": d} for d in args.ties_densities]
    if method == "pcb":
        return [{"ratio": r} for r in args.pcb_ratios]
    return [{}]


def adamerging_and_evaluate(
    vectors: Sequence[Mapping[str, Tensor]],
    model: CLIPVisionModelWithProjection,
    base_state: Mapping[str, Tensor],
    heads: Mapping[str, ZeroShotHead],
    test: Mapping[str, Items],
    steps: int = 500,
) -> dict[str, Any]:
    """Layer-wise AdaMerging with the paper's defaults, adapted on the *unlabeled* test inputs (its
    default split; no label is passed), then test accuracy; `model` ends at base."""
    inputs = {task: torch.stack([item["pixel_values"] for item in items]) for task, items in test.items()}
    result = adamerging_coefficients(
        model, base_state, vectors, heads, inputs, progress=False, granularity="layer", steps=steps
    )
    test_accuracy = accuracies(model, heads, test)
    add_scaled_(model, base_state, [], [])
    coefficients = torch.tensor(result.coefficients)
    return {
        "scaling": float(coefficients.mean()),  # the mean learned λ, where the other rows give their λ
        "method_args": {"granularity": "layer", "adapt_split": "test", "steps": steps},
        "validation_mean": None,  # nothing is chosen on validation
        "test": test_accuracy,
        "entropy": [result.entropy[0], result.entropy[-1]],
        "coefficients_per_task": coefficients.mean(dim=1).tolist(),
    }


def merge_and_evaluate(
    method: str,
    vectors: Sequence[Mapping[str, Tensor]],
    model: CLIPVisionModelWithProjection,
    base_state: Mapping[str, Tensor],
    heads: Mapping[str, ZeroShotHead],
    validation: Mapping[str, Items],
    test: Mapping[str, Items],
    args: DemoArguments,
) -> dict[str, Any]:
    """Best setting by mean validation accuracy, then test accuracy per task; `model` ends at base."""
    if method == "adamerging":
        return adamerging_and_evaluate(vectors, model, base_state, heads, test, args.adamerging_steps)
    best: SearchResult | None = None
    for settings in method_settings(method, args):
        result = search_coefficients(
            model,
            base_state,
            vectors,
            method,
            lambda m: accuracies(m, heads, validation),
            grid=args.lambda_grid or (SVD_GRID if method in ("tsv_m", "iso_c", "iso_cts") else None),
            method_args=settings,
            progress=False,
        )
        if best is None or result.best_score > best.best_score:  # the first setting wins a tie
            best = result
    assert best is not None
    merged = merge(vectors, method, scaling=best.best_scaling, **best.method_args)
    add_scaled_(model, base_state, merged, 1.0)
    test_accuracy = accuracies(model, heads, test)
    add_scaled_(model, base_state, [], [])
    return {
        "scaling": best.best_scaling,
        "method_args": best.method_args,
        "validation_mean": best.best_score,
        "test": test_accuracy,
    }


def per_task_row(method: str) -> str:
    """The results key of a method's per-task-selection rows (e.g. 'ties@per-task')."""
    return f"{method}{PER_TASK_SUFFIX}"


def per_task_merge_and_evaluate(
    method: str,
    vectors: Sequence[Mapping[str, Tensor]],
    model: CLIPVisionModelWithProjection,
    base_state: Mapping[str, Tensor],
    heads: Mapping[str, ZeroShotHead],
    validation: Mapping[str, Items],
    test: Mapping[str, Items],
    args: DemoArguments,
) -> dict[str, Any]:
    """The SAFT authors' protocol: each task's λ (TIES: and mask rate) on its own validation split, then its
    test accuracy at that model. Task arithmetic and TIES use the authors' grids; the others (absent from
    their code) their own grid and the demo's settings. NOT one merged model; `model` ends at base."""
    if method == "ties":
        settings = [{"density": d} for d in AUTHORS_TIES_DENSITIES]
    else:
        settings = method_settings(method, args)
    if args.lambda_grid:
        grid = args.lambda_grid
    elif method in ("task_arithmetic", "ties"):
        grid = AUTHORS_GRID
    else:
        grid = SVD_GRID if method in ("tsv_m", "iso_c", "iso_cts") else None
    results = [
        search_coefficients(
            model, base_state, vectors, method, lambda m: accuracies(m, heads, validation),
            grid=grid, method_args=s, progress=False,
        )
        for s in settings
    ]  # fmt: skip
    choices = select_per_task(results)
    test_accuracy = evaluate_per_task(
        model, base_state, vectors, method, choices,
        lambda m, tasks: accuracies(m, {t: heads[t] for t in tasks}, {t: test[t] for t in tasks}),
    )  # fmt: skip
    lambdas = [c.scaling for c in choices.values()]
    return {
        "selection": "per-task",
        "one_merged_model": False,
        "scaling": sum(lambdas) / len(lambdas),  # the mean of the per-task λ, where the other rows give their λ
        "per_task": {t: c.to_dict() for t, c in choices.items()},
        "validation_mean": sum(c.validation for c in choices.values()) / len(choices),
        "test": test_accuracy,
    }
