"""Accuracy of the cheaper SAFT variants against standard fine-tuning and full SAFT, from saft-demo outputs.

    saft-demo --seeds 1 --seed_start S --output cheap-sS --analysis_pairs 0 --methods task_arithmetic ties \\
        --variants standard asam_periodic2 asam_periodic5 asam_looksam5 asam_on lora lora_asam     # S = 0, 1, 2
    python benchmarks/cheap_saft_accuracy.py --runs cheap-s0 cheap-s1 cheap-s2 --full final-s0 final-s1 final-s2

``--full`` names runs of the same seeds that hold the full-SAFT variant (``asam``, default regime); the
standard rows of both must agree seed by seed (the demo is deterministic), which the script checks
before it uses them side by side. Prints, per variant, the mean of the eight tasks (mean ± std over
seeds) for the individual models, task arithmetic and TIES, each variant's paired difference to
standard, and the share of full SAFT's merged gain a cheap variant keeps (when SAFT has a gain).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ROWS = ("individual", "task_arithmetic", "ties")


def _load(folder: str) -> dict:
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: pass saft-demo output folders")
    return json.loads(path.read_text())


def _task_mean(seed: dict, row: str, variant: str) -> float:
    accs = seed["individual"][variant] if row == "individual" else seed["merged"][row][variant]["test"]
    return 100 * statistics.fmean(accs.values())


def _fmt(values: list[float], signed: bool = False) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:+.1f} ± {std:.1f}" if signed else f"{mean:.1f} ± {std:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="saft-demo outputs with the cheap variants")
    parser.add_argument("--full", nargs="*", default=[], help="outputs of the same seeds with the 'asam' variant")
    args = parser.parse_args()
    seeds: dict[int, dict] = {}
    for folder in args.runs:
        for seed in _load(folder)["seeds"]:
            seeds[seed["seed"]] = {"cheap": seed}
    labels = dict(_load(args.runs[0])["variants"])
    for folder in args.full:
        run = _load(folder)
        labels.setdefault("asam", run["variants"]["asam"])
        for seed in run["seeds"]:
            if seed["seed"] not in seeds:
                continue
            cheap = seeds[seed["seed"]]["cheap"]
            if seed["individual"]["standard"] != cheap["individual"]["standard"]:
                raise SystemExit(f"seed {seed['seed']}: the standard models of {folder} differ from the cheap run's")
            seeds[seed["seed"]]["full"] = seed
    order = sorted(seeds)
    variants = [v for v in labels if v != "standard"]
    print(f"seeds {order}; test accuracy (%), mean of the tasks, mean ± std over seeds; Δ = paired difference to standard")

    def values(variant: str, row: str) -> list[float]:
        out = []
        for s in order:
            source = seeds[s]["full"] if variant == "asam" else seeds[s]["cheap"]
            out.append(_task_mean(source, row, variant))
        return out

    header = ["variant", *(f"{r}" for r in ROWS), *(f"Δ {r}" for r in ROWS)]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    base = {row: values("standard", row) for row in ROWS}
    print("| standard | " + " | ".join(_fmt(base[r]) for r in ROWS) + " |" + " |" * len(ROWS))
    gains = {}
    full_rows = ["asam"] if all("full" in seeds[s] for s in order) else []  # full SAFT only if every seed has it
    for variant in full_rows + [v for v in variants if v != "asam"]:
        own = {row: values(variant, row) for row in ROWS}
        diff = {row: [a - b for a, b in zip(own[row], base[row])] for row in ROWS}
        gains[variant] = {row: statistics.fmean(diff[row]) for row in ROWS}
        print(f"| {labels[variant]} | " + " | ".join(_fmt(own[r]) for r in ROWS) + " | "
              + " | ".join(_fmt(diff[r], signed=True) for r in ROWS) + " |")
    if "lora" in labels and "lora_asam" in labels:  # LoRA-SAFT against LoRA trained plainly, same rank and rate
        lora = {row: [a - b for a, b in zip(values("lora_asam", row), values("lora", row))] for row in ROWS}
        print(f"{labels['lora_asam']} − {labels['lora']}: "
              + ", ".join(f"{row} {_fmt(lora[row], signed=True)}" for row in ROWS))
    if "asam" in gains:
        for row in ("task_arithmetic", "ties"):
            full = gains["asam"][row]
            if full <= 0:
                print(f"{row}: full SAFT has no merged-accuracy gain over standard here ({full:+.2f} points), "
                      "so no share of a gain is kept or lost; the costs stand alone.")
            else:
                kept = {v: g[row] / full for v, g in gains.items() if v != "asam"}
                print(f"{row}: share of full SAFT's gain kept: " + ", ".join(f"{labels[v]} {k:.0%}" for v, k in kept.items()))


if __name__ == "__main__":
    main()
