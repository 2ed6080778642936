"""Aggregate the demo's seeds (mean ± std) and format the standard-vs-SAFT tables."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from .merging import METHODS

ROWS = ("zero_shot", "individual", *METHODS)
LABELS = {
    "zero_shot": "zero-shot (base + head)",
    "individual": "individual fine-tuned",
    "task_arithmetic": "task arithmetic",
    "ties": "TIES",
    "pcb": "PCB",
}


def _stats(values: Sequence[float]) -> dict[str, float]:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def _row_accuracies(seed: Mapping[str, Any], row: str, variant: str) -> dict[str, float]:
    if row == "zero_shot":
        return seed["zero_shot"]  # one base for both variants
    if row == "individual":
        return seed["individual"][variant]
    return seed["merged"][row][variant]["test"]


def summarize_seeds(seeds: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> dict[str, Any]:
    """Per row and variant: each task's and the task-mean accuracy as mean/std over seeds, and SAFT − standard.

    Merges also get the normalised accuracy (merged / individual of the same variant, Ilharco et al. 2023).
    """
    summary: dict[str, Any] = {}
    for row in ROWS:
        entry: dict[str, Any] = {}
        per_seed: dict[str, list[dict[str, float]]] = {"standard": [], "saft": []}
        for seed in seeds:
            for variant in per_seed:
                accs = _row_accuracies(seed, row, variant)
                values = {task: accs[task] for task in tasks}
                values["mean"] = statistics.fmean(values[task] for task in tasks)
                if row in METHODS:
                    own = seed["individual"][variant]
                    values["normalized_mean"] = statistics.fmean(accs[t] / max(own[t], 1e-12) for t in tasks)
                per_seed[variant].append(values)
        keys = list(per_seed["standard"][0])
        for variant, rows in per_seed.items():
            entry[variant] = {key: _stats([r[key] for r in rows]) for key in keys}
        entry["difference"] = {
            key: _stats([s[key] - b[key] for s, b in zip(per_seed["saft"], per_seed["standard"])]) for key in keys
        }
        summary[row] = entry
    return summary


def _cell(stats: Mapping[str, float], signed: bool = False) -> str:
    mean, std = 100 * stats["mean"], 100 * stats["std"]
    text = f"{mean:+.1f}" if signed else f"{mean:.1f}"
    return f"{text} ± {std:.1f}" if stats["n"] > 1 else text


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def format_tables(results: Mapping[str, Any]) -> str:
    """Markdown: mean over tasks (standard, SAFT, difference), then every task per row and variant."""
    summary, tasks = results["summary"], results["config"]["tasks"]
    n_seeds = len(results["seeds"])
    saft = results["saft"]
    mean_rows = []
    for row in ROWS:
        entry = summary[row]
        cells = [LABELS[row], _cell(entry["standard"]["mean"]), _cell(entry["saft"]["mean"])]
        cells.append(_cell(entry["difference"]["mean"], signed=True))
        if "normalized_mean" in entry["standard"]:
            cells += [_cell(entry["standard"]["normalized_mean"]), _cell(entry["saft"]["normalized_mean"])]
        else:
            cells += ["", ""]
        mean_rows.append(cells)
    head = ["test accuracy (%), mean of tasks", "standard", f"SAFT ({saft})", "difference", "standard norm.", "SAFT norm."]
    task_rows = []
    for row in ROWS:
        for variant, label in (("standard", "standard"), ("saft", "SAFT"), ("difference", "difference")):
            stats = summary[row][variant]
            signed = variant == "difference"
            task_rows.append([LABELS[row], label, *(_cell(stats[t], signed) for t in tasks), _cell(stats["mean"], signed)])
    parts = [
        f"Seeds: {n_seeds} (mean ± std over seeds where > 1). Normalised = merged / individual accuracy.",
        "",
        _markdown(head, mean_rows),
        "",
        _markdown(["row", "variant", *tasks, "mean"], task_rows),
    ]
    return "\n".join(parts)
