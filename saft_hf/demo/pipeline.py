"""The demo run: per seed, fine-tune every task standard and SAFT, save task vectors, merge, analyse.

Everything goes through the library's own paths: `SAMTrainer` (ρ = 0 for standard fine-tuning),
`TaskVector.save_pretrained` / `from_pretrained` (the Hub format), `merging.search_coefficients`,
and `analysis.analyze_pairs` / `write_report` for the SAFT paper's figures.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
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
from .finetune import Items, accuracies, accuracy, finetune, load_splits, prototype_head, sharpness
from .merging import PER_TASK_METHODS, merge_and_evaluate, per_task_merge_and_evaluate, per_task_row
from .report import combine_results, format_tables, summarize_seeds

logger = logging.getLogger(__name__)

RESULTS_NAME = "results.json"
TABLE_NAME = "results.md"


def _save_vector(
    base: Any,
    tuned: Any,
    head: Any,
    task: str,
    variant: str,
    seed: int,
    settings: Mapping[str, Any],
    path: Path,
    base_name: str,
    metrics: dict[str, float],
    lora: Mapping[str, Any] | None = None,
) -> TaskVector:
    """τ = tuned − base written in the Hub format, then read back as a user of the Hub would."""
    rho = float(settings.get("sam_rho", 0.0))
    adaptive = bool(settings.get("sam_adaptive", False)) and rho > 0
    lora_fields = {f"lora_{k}" if k == "r" else k: v for k, v in (lora or {}).items()}
    config = provenance_config(
        task=task,
        base_model=f"saft-demo/{base_name}",
        method=method_name(rho, adaptive),
        hyperparameters={**settings, **lora_fields, "seed": seed},
        metrics=metrics,  # validation accuracy: what saft-merge --select normalized divides by
        variant=variant,
    )
    vector = TaskVector.from_models(
        base,
        tuned,
        config=config,
        head={"weight": head.weight, "logit_scale": head.logit_scale},
        class_names=head.classnames,
    )
    vector.save_pretrained(path)
    return TaskVector.from_pretrained(path)


def variant_label(args: DemoArguments, variant: str) -> str:
    """How tables name a variant: 'standard', 'ASAM ρ=0.5', 'ASAM ρ=0.5 LookSAM k=5', 'LoRA r=8 ASAM ρ=0.5'."""
    settings = args.variant_settings(variant)
    rho = settings["sam_rho"]
    label = "standard" if rho == 0 else f"{method_name(rho, settings.get('sam_adaptive', False))} ρ={rho:g}"
    mode = settings.get("sam_mode", "sam")
    if mode != "sam":
        label += f" {'LookSAM' if mode == 'looksam' else 'periodic'} k={settings['sam_interval']}"
    if settings.get("sam_include"):
        label += " norms only"
    if settings.get("sam_loop") == "authors":
        label += " (authors' loop)"
    lora = args.variant_lora(variant)
    return f"LoRA r={lora['r']} {label}" if lora else label


def vector_statistics(
    vectors: Sequence[Mapping[str, Tensor]], base_state: Mapping[str, Tensor]
) -> dict[str, float]:
    """Mean ‖τ‖, mean ‖τ‖/‖θ0‖ and mean pairwise cosine of the task vectors (floating parameters)."""
    names = [n for n in vectors[0].keys() if n in base_state]
    flat = torch.stack([torch.cat([v[n].float().reshape(-1) for n in names]) for v in vectors])
    base_norm = torch.cat([base_state[n].float().reshape(-1) for n in names]).norm()
    norms = flat.norm(dim=1)
    unit = flat / norms.clamp(min=1e-12).unsqueeze(1)
    cos = unit @ unit.T
    off = cos[~torch.eye(len(vectors), dtype=torch.bool)]
    return {
        "mean_norm": float(norms.mean()),
        "relative_norm": float(norms.mean() / base_norm),
        "mean_cosine": float(off.mean()) if off.numel() else 0.0,
    }


def _seed_inputs(
    args: DemoArguments, seed: int, base_path: Path
) -> tuple[Any, dict[str, Tensor], dict[str, Any], dict[str, Any]]:
    """The base, its weights, one seed's preprocessed splits and prototype heads (deterministic per seed)."""
    processor = AutoImageProcessor.from_pretrained(base_path)
    base = load_base(base_path)
    base_state = {name: p.detach().clone() for name, p in base.named_parameters()}
    splits = {task: load_splits(task, seed, args, processor) for task in args.tasks}
    heads = {
        task: prototype_head(base, splits[task]["train"], TASKS[task].classes, task) for task in args.tasks
    }
    return base, base_state, splits, heads


def _merge_all(
    args: DemoArguments,
    methods: Sequence[str],
    vectors: Mapping[str, Mapping[str, TaskVector]],
    base: Any,
    base_state: Mapping[str, Tensor],
    heads: Mapping[str, ZeroShotHead],
    splits: Mapping[str, Any],
    stats: Mapping[str, Mapping[str, float]],
    desc: str,
) -> dict[str, dict[str, Any]]:
    """Every method × variant merged, its coefficients chosen on validation, then tested."""
    test = {task: splits[task]["test"] for task in args.tasks}
    validation = {task: splits[task]["validation"] for task in args.tasks}
    rows = [(method, "single") for method in methods if "single" in args.selection or method not in PER_TASK_METHODS]
    rows += [(method, "per-task") for method in methods if "per-task" in args.selection and method in PER_TASK_METHODS]
    merged: dict[str, dict[str, Any]] = {per_task_row(m) if s == "per-task" else m: {} for m, s in rows}
    jobs = [(method, selection, variant) for method, selection in rows for variant in vectors]
    for method, selection, variant in tqdm(jobs, desc=desc, disable=not args.progress):
        task_vectors = [vectors[variant][task] for task in args.tasks]
        if selection == "per-task":
            entry = per_task_merge_and_evaluate(method, task_vectors, base, base_state, heads, validation, test, args)
        else:
            entry = merge_and_evaluate(method, task_vectors, base, base_state, heads, validation, test, args)
        entry["lambda"] = entry["scaling"]
        entry["mean_cosine"] = stats[variant]["mean_cosine"]
        merged[per_task_row(method) if selection == "per-task" else method][variant] = entry
    return merged


def run_seed(args: DemoArguments, seed: int, base_path: Path, output: Path, analyse: bool) -> dict[str, Any]:
    """One full repetition: data, heads, variants × tasks fine-tunings, merges and (optionally) analysis."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    base, base_state, splits, heads = _seed_inputs(args, seed, base_path)
    test = {task: splits[task]["test"] for task in args.tasks}
    validation = {task: splits[task]["validation"] for task in args.tasks}
    zero_shot = accuracies(base, heads, test)
    zero_shot_validation = accuracies(base, heads, validation)
    timings["data_and_heads"] = time.perf_counter() - start

    start = time.perf_counter()
    variants = list(args.variants)
    individual: dict[str, dict[str, float]] = {v: {} for v in variants}
    individual_validation: dict[str, dict[str, float]] = {v: {} for v in variants}
    train_loss: dict[str, dict[str, float]] = {v: {} for v in variants}
    sharp: dict[str, dict[str, float]] = {v: {} for v in variants}
    vectors: dict[str, dict[str, TaskVector]] = {v: {} for v in variants}
    jobs = [(variant, task) for variant in variants for task in args.tasks]
    for variant, task in tqdm(jobs, desc=f"fine-tuning (seed {seed})", disable=not args.progress):
        settings, lora = args.variant_settings(variant), args.variant_lora(variant)
        tuned, loss = finetune(base_path, heads[task], splits[task]["train"], args, settings, seed, lora=lora)
        individual[variant][task] = accuracy(tuned, heads[task], test[task])
        individual_validation[variant][task] = accuracy(tuned, heads[task], validation[task])
        train_loss[variant][task] = loss
        sharp[variant][task] = sharpness(tuned, heads[task], splits[task]["train"][: args.batch_size * 4])
        path = output / "task_vectors" / f"seed-{seed}" / variant / task
        vectors[variant][task] = _save_vector(
            base, tuned, heads[task], task, variant, seed, settings, path, base_path.name,
            {"accuracy": individual[variant][task], "validation_accuracy": individual_validation[variant][task]},
            lora=lora,
        )
    timings["fine_tuning"] = time.perf_counter() - start

    start = time.perf_counter()
    stats = {v: vector_statistics([vectors[v][t] for t in args.tasks], base_state) for v in variants}
    merged = _merge_all(
        args, args.methods, vectors, base, base_state, heads, splits, stats, f"merging (seed {seed})"
    )
    timings["merging"] = time.perf_counter() - start

    start = time.perf_counter()
    analysis = _analyse(args, base, base_state, heads, test, vectors, output) if analyse else {}
    timings["analysis"] = time.perf_counter() - start
    return {
        "seed": seed,
        "zero_shot": zero_shot,
        "zero_shot_validation": zero_shot_validation,
        "individual": individual,
        "individual_validation": individual_validation,
        "train_loss": train_loss,
        "sharpness": sharp,
        "task_vectors": stats,
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
        data = {
            t: prepare_eval_data(test[t], max_samples=args.analysis_samples, batch_size=256)
            for t in (first, second)
        }
        pairs = {variant: [vectors[variant][first], vectors[variant][second]] for variant in args.variants}
        report = analyze_pairs(
            base,
            base_state,
            pairs,
            data,
            logits_fn,
            tasks=(first, second),
            alphas=args.analysis_alphas,
            progress=False,
        )
        folder = output / "analysis" / f"{first}+{second}"
        write_report(report, folder, overwrite=True)
        summaries[f"{first}+{second}"] = {
            "folder": str(folder.relative_to(output)),
            "summary": summarize(report),
        }
    return summaries


def run_demo(args: DemoArguments) -> dict[str, Any]:
    """The whole benchmark; writes results.json, results.md, task vectors and figures into `args.output`."""
    torch.set_num_threads(args.num_threads())
    started = time.perf_counter()
    with atomic_output_dir(
        args.output, overwrite=args.overwrite
    ) as staging:  # refuses an existing output first
        base_path, pretrained_now = ensure_base(args.base_spec(), args.cache_dir, progress=args.progress)
        base_seconds = time.perf_counter() - started
        base_info = json.loads((base_path / "pretext.json").read_text())
        seed_list = args.seed_list()
        seeds = [run_seed(args, seed, base_path, staging, analyse=seed == seed_list[0]) for seed in seed_list]
        results = {
            "config": args.to_dict(),
            "variants": {variant: variant_label(args, variant) for variant in args.variants},
            "base": {
                "path": str(base_path),
                "pretrained_this_run": pretrained_now,
                "pretext_held_out_accuracy": base_info["pretext_held_out_accuracy"],
                "spec": base_info["spec"],
            },
            "seeds": seeds,
            "summary": summarize_seeds(seeds, args.tasks, args.variants),
            "timings_s": {"base": base_seconds, "total": time.perf_counter() - started},
        }
        tables = format_tables(results)
        (staging / TABLE_NAME).write_text(tables + "\n", encoding="utf-8")
        (staging / RESULTS_NAME).write_text(json.dumps(results, indent=2), encoding="utf-8")
    results["table"] = tables
    return results


def _add_methods(run: dict[str, Any], folder: Path, methods: Sequence[str], progress: bool) -> None:
    """Merge a finished run's saved task vectors with more methods, as the run itself would have."""
    config = {k: v for k, v in run["config"].items() if k in DemoArguments.__dataclass_fields__}
    args = DemoArguments(**{**config, "combine": None, "add_methods": None, "progress": progress})
    base_path = Path(run["base"]["path"])
    if not (base_path / "pretext.json").is_file():
        raise FileNotFoundError(
            f"the run's base {base_path} is gone; --add-methods needs the cached base it used"
        )
    for seed_result in run["seeds"]:
        seed = seed_result["seed"]
        base, base_state, splits, heads = _seed_inputs(args, seed, base_path)
        vectors = {
            variant: {
                t: TaskVector.from_pretrained(folder / "task_vectors" / f"seed-{seed}" / variant / t)
                for t in args.tasks
            }
            for variant in args.variants
        }
        new = _merge_all(
            args,
            methods,
            vectors,
            base,
            base_state,
            heads,
            splits,
            seed_result["task_vectors"],
            f"adding methods (seed {seed})",
        )
        seed_result["merged"].update(new)
    run["config"]["methods"] = list(dict.fromkeys([*run["config"].get("methods", []), *methods]))


def combine_outputs(args: DemoArguments) -> dict[str, Any]:
    """Merge the seeds of several finished demo outputs into one results.json/results.md in ``args.output``."""
    runs = []
    for folder in args.combine or []:
        path = Path(folder) / RESULTS_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; --combine takes folders written by saft-demo")
        run = json.loads(path.read_text(encoding="utf-8"))
        if args.add_methods:
            _add_methods(run, Path(folder), args.add_methods, args.progress)
        runs.append(run)
    results = combine_results(runs)
    tables = format_tables(results)
    with atomic_output_dir(args.output, overwrite=args.overwrite) as staging:
        (staging / TABLE_NAME).write_text(tables + "\n", encoding="utf-8")
        (staging / RESULTS_NAME).write_text(json.dumps(results, indent=2), encoding="utf-8")
    results["table"] = tables
    return results
