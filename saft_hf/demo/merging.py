"""Merge one variant's task vectors with a library method, choosing λ (and its other knob) on validation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor
from transformers import CLIPVisionModelWithProjection

from ..clip import ZeroShotHead
from ..merging import SearchResult, merge, search_coefficients
from ..task_vectors import add_scaled_
from .config import DEMO_METHODS as METHODS  # noqa: F401  (re-exported)
from .config import DemoArguments
from .finetune import Items, accuracies

# A coarser α grid than the registry's 0.1…3.0 for the SVD methods, to keep the demo's search cheap.
SVD_GRID = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0)


def method_settings(method: str, args: DemoArguments) -> list[dict[str, Any]]:
    """The non-λ settings searched for `method` (TIES density, PCB ratio), each with a full λ search."""
    if method == "ties":
        return [{"density": d} for d in args.ties_densities]
    if method == "pcb":
        return [{"ratio": r} for r in args.pcb_ratios]
    return [{}]


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
