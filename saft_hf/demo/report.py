"""Aggregate the demo's seeds (mean ± std, paired differences with 95% intervals) and format the tables."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

LABELS = {
    "zero_shot": "zero-shot (base + head)",
    "individual": "individual fine-tuned",
    "task_arithmetic": "task arithmetic",
    "ties": "TIES",
    "pcb": "PCB",
    "tsv_m": "TSV-M",
    "iso_c": "Iso-C",
    "iso_cts": "Iso-CTS",
    "adamerging": "AdaMerging (layer-wise)",
}
# Per-task selection rows (the SAFT authors' protocol): each task at its own λ, not one merged model.
LABELS.update({f"{m}@per-task": f"{LABELS[m]}, λ per task (not one model)" for m in list(LABELS)[2:-1]})


def _methods(seeds: Sequence[Mapping[str, Any]]) -> list[str]:
    """The merging methods every seed ran, in the order the first seed ran them."""
    return [m for m in seeds[0]["merged"] if all(m in s["merged"] for s in seeds)]


def t_quantile_975(df: int) -> float:
    """Student's t 97.5% quantile (two-sided 95% interval), via scipy when present, else a small table."""
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, df))
    except ImportError:  # pragma: no cover - scipy comes with scikit-learn, the demo's extra
        table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
        return table.get(df, 1.96)


def _stats(values: Sequence[float]) -> dict[str, float]:
    """mean, std and n of ``values``, plus the 95% t-interval of the mean (ci_low, ci_high) when n > 1."""
    if not all(math.isfinite(v) for v in values):  # e.g. the gap share when individual == zero-shot
        return {"mean": float("nan"), "std": float("nan"), "n": len(values)}
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    out = {"mean": mean, "std": std, "n": len(values)}
    if len(values) > 1:
        half = t_quantile_975(len(values) - 1) * std / math.sqrt(len(values))
        out.update(ci_low=mean - half, ci_high=mean + half)
    return out


def _row_accuracies(seed: Mapping[str, Any], row: str, variant: str) -> dict[str, float]:
    if row == "zero_shot":
        return seed["zero_shot"]  # one base for every variant
    if row == "individual":
        return seed["individual"][variant]
    return seed["merged"][row][variant]["test"]


def _gap_recovered(merged: float, zero_shot: float, individual: float) -> float:
    """Share of the zero-shot → individual gap a merge recovers (1 = as good as the individual models)."""
    return (merged - zero_shot) / (individual - zero_shot) if individual != zero_shot else float("nan")


def summarize_seeds(
    seeds: Sequence[Mapping[str, Any]], tasks: Sequence[str], variants: Sequence[str] = ("standard", "saft")
) -> dict[str, Any]:
    """Per row and variant: each task's and the task-mean accuracy as mean/std/n over seeds.

    Merges also get the normalised accuracy (merged / individual of the same variant, Ilharco et al. 2023)
    and the share of the zero-shot → individual gap recovered. ``difference`` holds, for every variant
    after the first (the reference), the paired per-seed difference variant − reference with its 95%
    t-interval.
    """
    reference = variants[0]
    methods = _methods(seeds)
    summary: dict[str, Any] = {}
    for row in ("zero_shot", "individual", *methods):
        entry: dict[str, Any] = {}
        per_seed: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
        for seed in seeds:
            zero_mean = statistics.fmean(seed["zero_shot"][t] for t in tasks)
            for variant in variants:
                accs = _row_accuracies(seed, row, variant)
                values = {task: accs[task] for task in tasks}
                values["mean"] = statistics.fmean(values[task] for task in tasks)
                if row in methods:
                    own = seed["individual"][variant]
                    values["normalized_mean"] = statistics.fmean(accs[t] / max(own[t], 1e-12) for t in tasks)
                    own_mean = statistics.fmean(own[t] for t in tasks)
                    values["gap_recovered"] = _gap_recovered(values["mean"], zero_mean, own_mean)
                    values["lambda"] = seed["merged"][row][variant]["scaling"]
                per_seed[variant].append(values)
        keys = list(per_seed[reference][0])
        for variant, rows in per_seed.items():
            entry[variant] = {key: _stats([r[key] for r in rows]) for key in keys}
        entry["difference"] = {
            variant: {
                key: _stats([s[key] - b[key] for s, b in zip(per_seed[variant], per_seed[reference])]) for key in keys
            }
            for variant in variants[1:]
        }
        summary[row] = entry
    return summary


def _cell(stats: Mapping[str, float], signed: bool = False, interval: bool = False) -> str:
    mean, std = 100 * stats["mean"], 100 * stats["std"]
    text = f"{mean:+.1f}" if signed else f"{mean:.1f}"
    if stats["n"] <= 1:
        return text
    if interval:
        return f"{text} [{100 * stats['ci_low']:+.1f}, {100 * stats['ci_high']:+.1f}]"
    return f"{text} ± {std:.1f}"


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _mechanism_rows(results: Mapping[str, Any], variants: Sequence[str]) -> list[list[str]]:
    """‖τ‖, ‖τ‖/‖θ0‖, pairwise cosine and end-of-training sharpness per variant (mean over seeds)."""
    rows = []
    for variant in variants:
        seeds = results["seeds"]
        norm = statistics.fmean(s["task_vectors"][variant]["mean_norm"] for s in seeds)
        rel = statistics.fmean(s["task_vectors"][variant]["relative_norm"] for s in seeds)
        cos = statistics.fmean(s["task_vectors"][variant]["mean_cosine"] for s in seeds)
        sharp = statistics.fmean(statistics.fmean(s["sharpness"][variant].values()) for s in seeds)
        rows.append([results["variants"][variant], f"{norm:.3f}", f"{rel:.4f}", f"{cos:.4f}", f"{sharp:.4f}"])
    return rows


def format_tables(results: Mapping[str, Any]) -> str:
    """Markdown: task means per variant, paired differences, calibration figures, then every task."""
    summary, tasks = results["summary"], results["config"]["tasks"]
    variants = list(results["variants"])
    labels = results["variants"]
    n_seeds = len(results["seeds"])
    methods = _methods(results["seeds"])
    rows = ("zero_shot", "individual", *methods)
    mean_rows = []
    for row in rows:
        entry = summary[row]
        cells = [LABELS.get(row, row), *(_cell(entry[v]["mean"]) for v in variants)]
        cells += [_cell(entry["difference"][v]["mean"], signed=True, interval=True) for v in variants[1:]]
        mean_rows.append(cells)
    head = ["test accuracy (%), mean of tasks", *(labels[v] for v in variants)]
    interval = " [95% CI]" if n_seeds > 1 else " (1 seed: an interval needs ≥ 2, --seeds 2)"
    head += [f"{labels[v]} − {labels[variants[0]]}{interval}" for v in variants[1:]]
    merge_rows = []
    for method in methods:
        for v in variants:
            stats = summary[method][v]
            merge_rows.append(
                [LABELS.get(method, method), labels[v], _cell(stats["normalized_mean"]), _cell(stats["gap_recovered"]),
                 f"{stats['lambda']['mean']:.2f}"]
            )  # fmt: skip
    task_rows = []
    for row in rows:
        for v in variants:
            stats = summary[row][v]
            task_rows.append([LABELS.get(row, row), labels[v], *(_cell(stats[t]) for t in tasks), _cell(stats["mean"])])
    parts = [
        f"Seeds: {n_seeds} ({', '.join(str(s['seed']) for s in results['seeds'])}; mean ± std over seeds where > 1; "
        "differences are paired per seed, with a 95% t-interval). Normalised = merged / individual accuracy.",
        "",
        _markdown(head, mean_rows),
        "",
        _markdown(["method", "variant", "normalised (%)", "gap recovered (%)", "mean λ"], merge_rows),
        "",
        _markdown(["variant", "mean ‖τ‖", "‖τ‖/‖θ0‖", "mean cos(τ_i, τ_j)", "sharpness L(w+ε)−L(w)"],
                  _mechanism_rows(results, variants)),  # fmt: skip
        "",
        _markdown(["row", "variant", *tasks, "mean"], task_rows),
    ]
    return "\n".join(parts)


def combine_results(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One results dict from runs that differ only in their seeds (e.g. seeds 0-2 and 3-4 run side by side).

    Refuses runs whose settings differ, or that repeat a seed, since their seeds would not be comparable.
    """
    if not results:
        raise ValueError("nothing to combine: pass at least one saft-demo output folder")
    ignored = {"seeds", "seed_start", "output", "overwrite", "progress", "threads", "combine", "cache_dir"}
    ignored |= {"analysis_pairs", "analysis_samples", "analysis_alphas"}  # analysis runs on the first seed only
    first = {k: v for k, v in results[0]["config"].items() if k not in ignored}
    seeds: list[Mapping[str, Any]] = []
    for run in results:
        config = {k: v for k, v in run["config"].items() if k not in ignored}
        if config != first:
            different = sorted(k for k in set(config) | set(first) if config.get(k) != first.get(k))
            raise ValueError(f"runs differ in {different}; only runs with the same settings can be combined")
        seeds.extend(run["seeds"])
    numbers = [s["seed"] for s in seeds]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"runs repeat a seed ({sorted(numbers)}); combine runs on disjoint seeds")
    seeds.sort(key=lambda s: s["seed"])
    combined = dict(results[0])
    combined["seeds"] = seeds
    combined["summary"] = summarize_seeds(seeds, first["tasks"], list(results[0]["variants"]))
    combined["combined_from"] = [run["config"].get("output") for run in results]
    return combined


def paired_contrast(
    seeds: Sequence[Mapping[str, Any]],
    tasks: Sequence[str],
    first: tuple[str, str],
    second: tuple[str, str],
    minus: Sequence[tuple[tuple[str, str], tuple[str, str]]] = (),
) -> dict[str, float]:
    """Per-seed (row, variant) − (row, variant) difference of the task-mean accuracy, with its 95% t-interval.

    ``minus``: further (a, b) pairs whose per-seed difference a − b is subtracted, for a difference of
    differences (e.g. SAFT − standard under one protocol minus the same under another).
    """

    def mean(seed: Mapping[str, Any], row: str, variant: str) -> float:
        accs = _row_accuracies(seed, row, variant)
        return statistics.fmean(accs[t] for t in tasks)

    values = []
    for seed in seeds:
        value = mean(seed, *first) - mean(seed, *second)
        for a, b in minus:
            value -= mean(seed, *a) - mean(seed, *b)
        values.append(value)
    return _stats(values)
