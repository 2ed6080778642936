"""The full analysis of one or more task-vector pairs (e.g. standard vs SAFT) and its output folder.

``analyze_pairs`` runs ξ, joint loss and CTL for each labelled pair on the same data and grid;
``write_report`` writes ``results.json`` plus the PNG figures into a folder atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..io_utils import atomic_output_dir
from .disentanglement import DEFAULT_ALPHAS, DEFAULT_OTHERS_SCALE, check_alphas, weight_disentanglement
from .evaluation import Batch, FeaturesFn, LogitsFn, block_outputs
from .linearity import DEFAULT_CTL_LAMBDA, cross_task_linearity
from .plots import DEFAULT_SEARCH_REGION, plot_ctl, plot_heatmaps

RESULTS_NAME = "results.json"
FIGURES = {"xi": "disentanglement.png", "joint_loss": "joint_loss.png", "ctl": "ctl.png"}
COLORBAR_LABELS = {
    "xi": "ξ (changed predictions, summed over tasks)",
    "joint_loss": "joint loss L(θ; D₁) + L(θ; D₂)",
}


def recorded_method(vectors: Sequence[Mapping[str, Any] | Any]) -> str | None:
    """The fine-tuning method (standard/SAM/ASAM) the task vectors record, joined with '+' if they differ."""
    methods = []
    for vector in vectors:
        config = getattr(vector, "config", None) or {}
        method = (config.get("finetuning") or {}).get("method")
        if method and method != "unknown" and method not in methods:
            methods.append(str(method))
    return "+".join(methods) or None


def pair_labels(pairs: Sequence[Sequence[Any]], fallbacks: Sequence[str]) -> list[str]:
    """One figure label per pair: its recorded method, else the fallback; equal labels get the fallback added."""
    labels = [recorded_method(vectors) or fallback for vectors, fallback in zip(pairs, fallbacks)]
    if len(set(labels)) < len(labels):
        labels = [label if label == fallback else f"{label} ({fallback})" for label, fallback in zip(labels, fallbacks)]
    return labels


def analyze_pairs(
    model: nn.Module,
    base_state: Mapping[str, Tensor],
    pairs: Mapping[str, Sequence[Mapping[str, Tensor]]],
    data: Mapping[str, Sequence[Batch]],
    logits_fn: LogitsFn | Mapping[str, LogitsFn],
    *,
    tasks: Sequence[str],
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    others: Mapping[str, Sequence[Mapping[str, Tensor]]] | None = None,
    others_scale: float = DEFAULT_OTHERS_SCALE,
    reference_includes_others: bool = False,
    features_fn: FeaturesFn | None = block_outputs,
    ctl_lambda: float = DEFAULT_CTL_LAMBDA,
    progress: bool = True,
) -> dict[str, Any]:
    """ξ grid, joint-loss grid and per-block CTL for every labelled pair (label -> (τ₁, τ₂)).

    ``logits_fn`` may map each label to its own classifier (e.g. heads shipped with its vectors).
    ``others`` maps a label to the other tasks' vectors for its merged variant (a pair without an
    entry is analysed alone). CTL uses both tasks' samples; ``features_fn=None`` skips it.
    """
    if not pairs:
        raise ValueError("analyze_pairs needs at least one labelled pair of task vectors.")
    alphas = check_alphas(alphas)
    results: dict[str, Any] = {}
    if isinstance(logits_fn, Mapping) and set(logits_fn) != set(pairs):
        raise KeyError(f"logits_fn has entries for {sorted(logits_fn)} but the pairs are {sorted(pairs)}.")
    for label, pair in pairs.items():
        pair_logits_fn = logits_fn[label] if isinstance(logits_fn, Mapping) else logits_fn
        grid = weight_disentanglement(
            model, base_state, pair, data, pair_logits_fn,
            tasks=tasks, alphas=alphas, others=(others or {}).get(label, ()), others_scale=others_scale,
            reference_includes_others=reference_includes_others, progress=progress,
        )  # fmt: skip
        entry: dict[str, Any] = {"grid": grid.to_dict()}
        if features_fn is not None:
            ctl_batches = [batch for task in tasks for batch in data[task]]  # tasks checked by the grid
            entry["ctl"] = cross_task_linearity(
                model, base_state, pair[0], pair[1], ctl_batches,
                features_fn=features_fn, lam=ctl_lambda, progress=progress,
            )  # fmt: skip
        results[label] = entry
    return {"tasks": list(tasks), "alphas": alphas, "ctl_lambda": ctl_lambda, "pairs": results}


def write_report(
    report: Mapping[str, Any],
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    search_region: tuple[float, float] | None = DEFAULT_SEARCH_REGION,
) -> Path:
    """Write ``results.json`` and the figures into ``output_dir`` via a temporary sibling folder.

    An existing ``output_dir`` is refused unless ``overwrite``; it is replaced only once the new
    folder is complete.
    """
    with atomic_output_dir(output_dir, overwrite=overwrite) as staging:
        _write_contents(report, staging, search_region)
    return Path(output_dir)


def _write_contents(report: Mapping[str, Any], folder: Path, search_region: tuple[float, float] | None) -> None:
    pairs = report["pairs"]
    tasks = " + ".join(report["tasks"])
    (folder / RESULTS_NAME).write_text(json.dumps(report, indent=2), encoding="utf-8")
    for metric, title in (("xi", f"Weight disentanglement error ξ ({tasks})"), ("joint_loss", f"Joint loss ({tasks})")):
        plot_heatmaps(
            {label: entry["grid"][metric] for label, entry in pairs.items()},
            folder / FIGURES[metric],
            alphas=report["alphas"], title=title, search_region=search_region, colorbar_label=COLORBAR_LABELS[metric],
        )  # fmt: skip
    curves = {label: entry["ctl"] for label, entry in pairs.items() if "ctl" in entry}
    if curves:
        plot_ctl(curves, folder / FIGURES["ctl"], title=f"Cross-task linearity, λ={report['ctl_lambda']} ({tasks})")


def summarize(
    report: Mapping[str, Any], search_region: tuple[float, float] | None = DEFAULT_SEARCH_REGION
) -> dict[str, dict[str, float]]:
    """Per label: mean ξ and mean joint loss over grid points inside the search square, and mean CTL."""
    alphas = report["alphas"]
    lo, hi = search_region if search_region is not None else (min(alphas), max(alphas))
    inside = [k for k, a in enumerate(alphas) if lo <= a <= hi]
    summary: dict[str, dict[str, float]] = {}
    for label, entry in report["pairs"].items():
        grid = entry["grid"]
        cells = [(i, j) for i in inside for j in inside]
        row: dict[str, float] = {"points": float(len(cells))}
        if cells:
            row["mean_xi"] = sum(grid["xi"][i][j] for i, j in cells) / len(cells)
            row["mean_joint_loss"] = sum(grid["joint_loss"][i][j] for i, j in cells) / len(cells)
        if entry.get("ctl"):
            row["mean_ctl"] = sum(entry["ctl"]) / len(entry["ctl"])
        summary[label] = row
    return summary
