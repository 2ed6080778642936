"""The demo run: per seed, fine-tune every task standard and SAFT, save task vectors, merge, analyse.

Everything goes through the library's own paths: `SAMTrainer` (ρ = 0 for standard fine-tuning),
`TaskVector.save_pretrained` / `from_pretrained` (the Hub format), `merging.search_coefficients`,
and `analysis.analyze_pairs` / `write_report` for the SAFT paper's figures.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, CLIPVisionModelWithProjection

from ..analysis import analyze_pairs, heads_logits_fn, prepare_eval_data, summarize, write_report
from ..clip import ZeroShotHead
from ..io_utils import atomic_output_dir
from ..sam import method_name
from ..task_vector_io import provenance_config
from ..task_vectors import TaskVector
from .base import ensure_base, load_base
from .config import DemoArguments
from .data import TASKS
from .finetune import Items, accuracies, accuracy, finetune, load_splits, prototype_head
from .merging import METHODS, merge_and_evaluate
from .report import format_tables, summarize_seeds

logger = logging.getLogger(__name__)

VARIANTS = ("standard", "saft")
RESULTS_NAME = "results.json"
TABLE_NAME = "results.md"


def _save_vector(
    base: Any, tuned: Any, head: Any, task: str, variant: str, seed: int, rho: float, adaptive: bool, path: Path,
    base_name: str, metrics: dict[str, float],
) -> TaskVector:
    """τ = tuned − base written in the Hub format, then read back as a user of the Hub would."""
    adaptive = adaptive and rho > 0
    config = provenance_config(
        task=task,
        base_model=f"saft-demo/{base_name}",
        method=method_name(rho, adaptive),
        hyperparameters={"sam_rho": rho, "sam_adaptive": adaptive, "seed": seed},
        metrics=metrics,  # validation accuracy: what saft-merge --select normalized divides by
        variant=variant,
    )
    vector = TaskVector.from_models(
        base, tuned, config=config, head={"weight": head.weight, "logit_scale": head.logit_scale}, class_names=head.classnames
    )
    vector.save_pretrained(path)
    return TaskVector.from_pretrained(path)


def _sam_label(args: DemoArguments) -> str:
    return f"{method_name(args.sam_rho, args.sam_adaptive)} ρ={args.sam_rho:g}"


def run_seed(args: DemoArguments, seed: int, base_path: Path, output: Path) -> dict[str, Any]:
    """One full repetition: data, heads, 2 × len(tasks) fine-tunings, merges and analysis for `seed`."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    processor = AutoImageProcessor.from_pretrained(base_path)
    base = load_base(base_path)
    base_state = {name: p.detach().clone() for name, p in base.named_parameters()}
    splits = {task: load_splits(task, seed, args, processor) for task in args.tasks}
    heads = {task: prototype_head(base, splits[task]["train"], TASKS[task].classes, task) for task in args.tasks}
    test = {task: splits[task]["test"] for task in args.tasks}
    validation = {task: splits[task]["validation"] for task in args.tasks}
    zero_shot = accuracies(base, heads, test)
    timings["data_and_heads"] = time.perf_counter() - start

    start = time.perf_counter()
    individual: dict[str, dict[str, float]] = {v: {} for v in VARIANTS}
    train_loss: dict[str, dict[str, float]] = {v: {} for v in VARIANTS}
    vectors: dict[str, dict[str, TaskVector]] = {v: {} for v in VARIANTS}
    jobs = [(variant, task) for variant in VARIANTS for task in args.tasks]
    for variant, task in tqdm(jobs, desc=f"fine-tuning (seed {seed})", disable=not args.progress):
        rho = 0.0 if variant == "standard" else args.sam_rho
        tuned, loss = finetune(base_path, heads[task], splits[task]["train"], args, rho, seed)
        individual[variant][task] = accuracy(tuned, heads[task], test[task])
        train_loss[variant][task] = loss
        path = output / "task_vectors" / f"seed-{seed}" / variant / task
        vectors[variant][task] = _save_vector(
            base, tuned, heads[task], task, variant, seed, rho, args.sam_adaptive, path, base_path.name,
            {"accuracy": individual[variant][task], "validation_accuracy": accuracy(tuned, heads[task], validation[task])},
        )
    timings["fine_tuning"] = time.perf_counter() - start

    start = time.perf_counter()
    merged: dict[str, dict[str, Any]] = {m: {} for m in METHODS}
    merge_jobs = [(method, variant) for method in METHODS for variant in VARIANTS]
    for method, variant in tqdm(merge_jobs, desc=f"merging (seed {seed})", disable=not args.progress):
        task_vectors = [vectors[variant][task] for task in args.tasks]
        merged[method][variant] = merge_and_evaluate(method, task_vectors, base, base_state, heads, validation, test, args)
    timings["merging"] = time.perf_counter() - start

    start = time.perf_counter()
    analysis = _analyse(args, base, base_state, heads, test, vectors, output) if seed == 0 else {}
    timings["analysis"] = time.perf_counter() - start
    return {
        "seed": seed,
        "zero_shot": zero_shot,
        "individual": individual,
        "train_loss": train_loss,
        "merged": merged,
        "analysis": analysis,
        "timings_s": timings,
    }


def _analyse(
    args: DemoArguments,
    base: CLIPVisionModelWithProjection,
    base_state: Mapping[str, Tensor],
    heads: Mapping[str, ZeroShotHead],
    test: Mapping[str, Items],
    vectors: Mapping[str, Mapping[str, TaskVector]],
    output: Path,
) -> dict[str, Any]:
    """ξ and joint-loss maps (standard vs SAFT) for the configured task pairs; figures in `analysis/`."""
    summaries: dict[str, Any] = {}
    logits_fn = heads_logits_fn(heads)
    for first, second in tqdm(args.pairs(), desc="analysis", disable=not args.progress):
        data = {t: prepare_eval_data(test[t], max_samples=args.analysis_samples, batch_size=256) for t in (first, second)}
        pairs = {variant: [vectors[variant][first], vectors[variant][second]] for variant in VARIANTS}
        report = analyze_pairs(
            base, base_state, pairs, data, logits_fn, tasks=(first, second), alphas=args.analysis_alphas, progress=False
        )
        folder = output / "analysis" / f"{first}+{second}"
        write_report(report, folder, overwrite=True)
        summaries[f"{first}+{second}"] = {"folder": str(folder.relative_to(output)), "summary": summarize(report)}
    return summaries


def run_demo(args: DemoArguments) -> dict[str, Any]:
    """The whole benchmark; writes results.json, results.md, task vectors and figures into `args.output`."""
    torch.set_num_threads(args.num_threads())
    started = time.perf_counter()
    with atomic_output_dir(args.output, overwrite=args.overwrite) as staging:  # refuses an existing output first
        base_path, pretrained_now = ensure_base(args.base_spec(), args.cache_dir, progress=args.progress)
        base_seconds = time.perf_counter() - started
        base_info = json.loads((base_path / "pretext.json").read_text())
        seeds = [run_seed(args, seed, base_path, staging) for seed in range(args.seeds)]
        results = {
            "config": args.to_dict(),
            "saft": _sam_label(args),
            "base": {
                "path": str(base_path),
                "pretrained_this_run": pretrained_now,
                "pretext_held_out_accuracy": base_info["pretext_held_out_accuracy"],
                "spec": base_info["spec"],
            },
            "seeds": seeds,
            "summary": summarize_seeds(seeds, args.tasks),
            "timings_s": {"base": base_seconds, "total": time.perf_counter() - started},
        }
        tables = format_tables(results)
        (staging / TABLE_NAME).write_text(tables + "\n", encoding="utf-8")
        (staging / RESULTS_NAME).write_text(json.dumps(results, indent=2), encoding="utf-8")
    results["table"] = tables
    return results
