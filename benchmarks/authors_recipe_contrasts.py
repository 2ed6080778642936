"""The contrasts of docs/authors_recipe_protocol.md from a combined saft-demo results.json (markdown on stdout).

    python benchmarks/authors_recipe_contrasts.py runs/authors-combined/results.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from saft_hf.demo.report import paired_contrast

METHODS = {"task_arithmetic": "TA", "ties": "TIES", "pcb": "PCB"}
PER_TASK = "@per-task"


def _cell(stats: dict[str, float]) -> str:
    if stats["n"] < 2:
        return f"{100 * stats['mean']:+.1f}"
    return f"{100 * stats['mean']:+.1f} [{100 * stats['ci_low']:+.1f}, {100 * stats['ci_high']:+.1f}]"


def above_zero(stats: dict[str, float]) -> bool:
    """The protocol's test: a 95% interval entirely above 0 (needs n >= 2)."""
    return stats["n"] >= 2 and stats["ci_low"] > 0


def contrasts(results: dict) -> dict[str, dict[str, dict[str, float]]]:
    """D_clean, D_clean-per-task, D_loop, D_paper and D_paper − D_clean per method (paired per seed)."""
    seeds, tasks = results["seeds"], results["config"]["tasks"]
    out: dict[str, dict[str, dict[str, float]]] = {}
    for method in METHODS:
        per_task = method + PER_TASK
        clean = ((method, "asam"), (method, "standard"))
        paper = ((per_task, "asam_authors"), (per_task, "standard_authors"))
        out[method] = {
            "D_clean": paired_contrast(seeds, tasks, *clean),
            "D_clean_per_task": paired_contrast(seeds, tasks, (per_task, "asam"), (per_task, "standard")),
            "D_loop": paired_contrast(seeds, tasks, (method, "asam_authors"), (method, "standard_authors")),
            "D_paper": paired_contrast(seeds, tasks, *paper),
            "D_paper_minus_D_clean": paired_contrast(seeds, tasks, *paper, minus=[clean]),
        }
    return out


def verdict(table: dict[str, dict[str, dict[str, float]]]) -> str:
    """The protocol's decision rule, applied as written before the runs."""
    n = next(iter(table.values()))["D_clean"]["n"]
    if n < 2:
        return "no conclusion (fewer than 2 seeds)"
    count = {key: sum(above_zero(table[m][key]) for m in table) for key in ("D_loop", "D_paper", "D_paper_minus_D_clean")}
    if count["D_loop"] >= 2:
        return "the released loop explains the paper's gain in this toy"
    if count["D_paper"] >= 2:
        return "the authors' whole protocol (loop + per-task λ) explains it, not the loop alone"
    if count["D_paper_minus_D_clean"] >= 2:
        return "moves toward it but does not explain it"
    return "does not explain it"


def main(path: str) -> None:
    results = json.loads(Path(path).read_text())
    table = contrasts(results)
    seeds = [s["seed"] for s in results["seeds"]]
    print(f"Seeds: {len(seeds)} ({', '.join(map(str, seeds))}); test accuracy, mean of {len(results['config']['tasks'])} "
          "tasks, ASAM ρ=0.5 − standard, paired per seed, [95% t-interval], points.\n")  # fmt: skip
    print("| method | D_clean (clean loop, one λ) | D_clean, λ per task | D_loop (authors' loop, one λ) | "
          "D_paper (authors' loop, λ per task) | D_paper − D_clean |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for method, label in METHODS.items():
        row = table[method]
        print(f"| {label} | " + " | ".join(_cell(row[k]) for k in ("D_clean", "D_clean_per_task", "D_loop", "D_paper",
                                                                        "D_paper_minus_D_clean")) + " |")  # fmt: skip
    print(f"\nDecision rule of docs/authors_recipe_protocol.md: **{verdict(table)}**.\n")
    print("| variant | individual (mean) | mean ‖τ‖ | mean cos(τ_i, τ_j) | sharpness L(w+ε)−L(w) |")
    print("|---|---|---|---|---|")
    for variant, label in results["variants"].items():
        ind = statistics.fmean(statistics.fmean(s["individual"][variant].values()) for s in results["seeds"])
        norm = statistics.fmean(s["task_vectors"][variant]["mean_norm"] for s in results["seeds"])
        cos = statistics.fmean(s["task_vectors"][variant]["mean_cosine"] for s in results["seeds"])
        sharp = statistics.fmean(statistics.fmean(s["sharpness"][variant].values()) for s in results["seeds"])
        print(f"| {label} | {100 * ind:.1f} | {norm:.3f} | {cos:.4f} | {sharp:.4f} |")


if __name__ == "__main__":
    main(sys.argv[1])
