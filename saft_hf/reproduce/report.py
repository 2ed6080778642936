"""The reproduction's outputs: one ``results.json``, the paper-style Markdown table and the SAFT − standard chart."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..io_utils import atomic_file, atomic_write_json, atomic_write_text

__all__ = ["VARIANT_LABELS", "summarize", "format_table", "plot_gains", "write_report"]

VARIANT_LABELS = {"standard": "standard", "saft": "SAFT"}
CHART_KEY = "saft_minus_standard"


def _merge_entry(result: Mapping[str, Any]) -> dict[str, Any]:
    evaluation = result.get("evaluation") or {}
    rows = evaluation.get("tasks") or []
    per_task = result.get("per_task")  # saft-merge --select per-task: a λ per task, not one model
    return {
        "scaling": result.get("scaling"),
        "per_task_scaling": {t: c["scaling"] for t, c in per_task.items()} if per_task else None,
        "absolute": {row["task"]: row["merged"] for row in rows},
        "normalized": {row["task"]: row["normalized"] for row in rows},
        "mean_absolute": evaluation.get("mean_accuracy"),
        "mean_normalized": evaluation.get("mean_normalized"),
    }


def summarize(
    tasks: Sequence[str],
    variants: Sequence[str],
    methods: Sequence[str],
    finetune: Mapping[str, Mapping[str, Mapping[str, Any]]],
    merges: Mapping[str, Mapping[str, Mapping[str, Any]]],
) -> dict[str, Any]:
    """Collect per-run ``results.json`` contents (fine-tunes by variant/task, merges by variant/method) into one."""
    individual = {v: {t: finetune[v][t]["test_accuracy"] for t in tasks} for v in variants}
    merged = {m: {v: _merge_entry(merges[v][m]) for v in variants} for m in methods}
    summary: dict[str, Any] = {
        "tasks": list(tasks),
        "variants": list(variants),
        "methods": list(methods),
        "individual": individual,
        "merged": merged,
    }
    if "standard" in variants and "saft" in variants:
        summary[CHART_KEY] = {
            m: {
                key: merged[m]["saft"][f"mean_{key}"] - merged[m]["standard"][f"mean_{key}"]
                if merged[m]["saft"][f"mean_{key}"] is not None and merged[m]["standard"][f"mean_{key}"] is not None
                else None
                for key in ("absolute", "normalized")
            }
            for m in methods
        }
    return summary


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def format_table(summary: Mapping[str, Any]) -> str:
    """Markdown laid out like the paper's table: rows method × fine-tuning, columns the tasks and the average."""
    tasks, variants = summary["tasks"], summary["variants"]
    header = _row(["Method", "Fine-tuning", *tasks, "Avg"])
    rule = _row(["---", "---", *["---:"] * (len(tasks) + 1)])
    lines = ["# Merging results (test accuracy, %)", "", "## Absolute accuracy", "", header, rule]
    for variant in variants:
        values = [summary["individual"][variant][t] for t in tasks]
        lines.append(_row(["Individual", VARIANT_LABELS[variant], *map(_pct, values), _pct(sum(values) / len(values))]))
    for kind in ("absolute", "normalized"):
        if kind == "normalized":
            lines += ["", "## Normalised accuracy (merged / individual)", "", header, rule]
        for method, by_variant in summary["merged"].items():
            for variant in variants:
                entry = by_variant[variant]
                cells = [entry[kind].get(t) for t in tasks]
                lines.append(_row([method, VARIANT_LABELS[variant], *map(_pct, cells), _pct(entry[f"mean_{kind}"])]))
    if CHART_KEY in summary:
        lines += ["", "## SAFT − standard (average, points)", "", "| Method | Absolute | Normalised |", "|---|---:|---:|"]
        for method, gain in summary[CHART_KEY].items():
            lines.append(_row([method, _pct(gain["absolute"]), _pct(gain["normalized"])]))
    scalings = [
        f"{m} {VARIANT_LABELS[v]}: {summary['merged'][m][v]['scaling']}"
        for m in summary["merged"]
        for v in variants
        if summary["merged"][m][v]["scaling"] is not None
    ]
    if scalings:
        lines += ["", "λ chosen on validation: " + "; ".join(scalings) + "."]
    per_task = [
        f"{m} {VARIANT_LABELS[v]}: " + ", ".join(f"{t} {lam:g}" for t, lam in summary["merged"][m][v]["per_task_scaling"].items())
        for m in summary["merged"]
        for v in variants
        if summary["merged"][m][v].get("per_task_scaling")
    ]  # fmt: skip
    if per_task:
        lines += ["", "**λ chosen per task** on that task's own validation split (the SAFT authors' protocol): "
                  "each task's accuracy comes from its own merged model, so these rows are NOT one merged model. "
                  "λ per task: " + "; ".join(per_task) + "."]  # fmt: skip
    recipe = summary.get("recipe")
    if recipe:
        lines += ["", f"Fine-tuning recipe: {recipe}; λ protocol: {summary.get('protocol', 'single')}; merged "
                  f"checkpoint: {summary.get('merge_checkpoint', 'last')}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_gains(summary: Mapping[str, Any], path: Path) -> None:
    """Bar chart of SAFT − standard average accuracy per method; the plotted values ride in the PNG's text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gains = summary[CHART_KEY]
    methods = list(gains)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(methods) + 2), 3.5))
    width = 0.38
    for offset, key, label in ((-width / 2, "absolute", "absolute"), (width / 2, "normalized", "normalised")):
        values = [100 * (gains[m][key] or 0.0) for m in methods]
        ax.bar([i + offset for i in range(len(methods))], values, width, label=label)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(methods)), methods, rotation=20, ha="right")
    ax.set_ylabel("SAFT − standard (points)")
    ax.set_title("Gain of SAFT fine-tuning, average over tasks")
    ax.legend()
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, metadata={CHART_KEY: json.dumps(gains, sort_keys=True)})
    plt.close(fig)


def write_report(summary: Mapping[str, Any], output_dir: Path) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and (with both variants) ``saft_minus_standard.png``."""
    written = {
        "results": atomic_write_json(output_dir / "results.json", summary),
        "table": atomic_write_text(output_dir / "results.md", format_table(summary)),
    }
    if CHART_KEY in summary:
        chart = output_dir / f"{CHART_KEY}.png"
        plot_gains(summary, chart)
        written["chart"] = chart
    return written
