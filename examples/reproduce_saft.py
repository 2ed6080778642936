"""Reproduce the SAFT paper's merging table in one command: fine-tune, merge, evaluate, tabulate.

    accelerate launch examples/reproduce_saft.py --output_dir repro --data_dir /data/saft-tasks

Fine-tunes every task twice (``standard``, and ``saft`` = the paper's ASAM with rho 0.5) with
``examples/train_saft.py``'s code and settings, merges each variant's task vectors with every method
(λ searched on validation), evaluates on test, and writes into ``--output_dir``: ``results.json``,
``results.md`` (the paper's table layout) and ``saft_minus_standard.png``. Re-running continues where
it stopped: finished fine-tunes and merges are skipped once their outputs check out, a killed fine-tune
resumes from its last Trainer checkpoint (``--save_steps``). Training arguments such as
``--max_steps`` or ``--per_device_train_batch_size`` are passed through (``--help`` lists them).

The default is the clean table: the paper's *text* recipe, one λ (one merged model) per method and variant.
``--recipe authors-code --protocol authors`` gives the table the paper's released *code* would: its training
loop and settings (train_saft.py --recipe authors-code) and a λ chosen per task on that task's validation
split (not one merged model).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from transformers import HfArgumentParser

from saft_hf.merging import METHODS, get_method
from saft_hf.pipeline import MergeJob, resolve_device, run_merge_job
from saft_hf.reproduce import (
    MARKER_NAME,
    StageMismatchError,
    StageProgress,
    fingerprint,
    latest_valid_checkpoint,
    read_marker,
    remove_checkpoints,
    summarize,
    write_marker,
    write_report,
)
from saft_hf.task_vectors import HEAD_FILES
from saft_hf.tasks import TASKS, resolve_task
from saft_hf.trainer import SAMTrainingArguments


def _load_train_saft() -> Any:
    """``examples/train_saft.py`` as a module (registered in sys.modules, as its dataclasses need)."""
    if "train_saft" not in sys.modules:
        spec = importlib.util.spec_from_file_location("train_saft", Path(__file__).with_name("train_saft.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["train_saft"] = module
        spec.loader.exec_module(module)
    return sys.modules["train_saft"]


train_saft = _load_train_saft()

VARIANTS = ("standard", "saft")
# Checkpoint every 500 of the paper's 8,000 steps (≈ 1/16 of a run lost at worst); keep two in case the
# newest is broken. A finished fine-tune's checkpoints are deleted unless --keep_checkpoints.
REPRODUCE_DEFAULTS = {**train_saft.PAPER_DEFAULTS, "save_strategy": "steps", "save_steps": 500, "save_total_limit": 2}
STAGE_OUTPUTS = ("results.json", "task_vector", "vision_model", *HEAD_FILES)  # what train_task writes
RUN_LOG = "reproduce_runs.jsonl"


@dataclass
class ReproduceArguments:
    """What to reproduce; the fine-tuning settings are the ``SAMTrainingArguments`` (the chosen --recipe's defaults)."""

    model_name_or_path: str = field(
        default="openai/clip-vit-base-patch32", metadata={"help": "CLIP checkpoint (Hub id or directory)."}
    )
    tasks: list[str] = field(
        default_factory=lambda: list(TASKS),
        metadata={"help": "Tasks to fine-tune and merge (default: the paper's eight; custom tasks need --data_dir)."},
    )
    variants: list[str] = field(
        default_factory=lambda: list(VARIANTS),
        metadata={"help": "Fine-tuning variants: 'standard' (sam_rho 0) and 'saft' (ASAM, --sam_rho, default 0.5)."},
    )
    methods: list[str] = field(
        default_factory=lambda: list(METHODS),
        metadata={"help": f"Merge methods (default: every registered one: {', '.join(METHODS)})."},
    )
    data_dir: str | None = field(
        default=None,
        metadata={"help": "Local task data: one sub-directory per task (<dir>/<Task>). Default: $SAFT_DATA_DIR, else the Hub."},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Cache directory for Hub downloads."})
    grid: list[float] | None = field(
        default=None, metadata={"help": "λ grid for methods without their own (default 0.05, 0.10, ..., 1.0)."}
    )
    select: str = field(
        default="absolute",
        metadata={"help": "λ chosen by the best mean validation accuracy: 'absolute' or 'normalized'.",
                  "choices": ["absolute", "normalized"]},
    )  # fmt: skip
    max_test_samples: int | None = field(
        default=None, metadata={"help": "Evaluate each fine-tuned model on at most this many test examples."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Merges: at most this many validation/test examples per task."}
    )
    merge_batch_size: int = field(default=128, metadata={"help": "Batch size of the merges' evaluations."})
    merge_device: str = field(
        default="auto",
        metadata={"help": "Device of the merges' λ search, evaluation and AdaMerging: auto (cuda when present, else "
                  "cpu), cpu, cuda or cuda:N."},
    )  # fmt: skip
    recipe: str = field(
        default="paper-text",
        metadata={"help": "Fine-tuning recipe, as train_saft.py --recipe: 'paper-text' (the paper's text) or "
                  "'authors-code' (its released code: eta 0 on all, the authors' loop, augmentation, per-dataset "
                  "epochs, best checkpoint kept beside the last).", "choices": ["paper-text", "authors-code"]},
    )  # fmt: skip
    protocol: str = field(
        default="single",
        metadata={"help": "λ selection: 'single' (one λ for all tasks: one merged model per method and variant) or "
                  "'authors' (the released code's: each task's λ on its own validation split, their grids; "
                  "saft-merge --select per-task; NOT one merged model).", "choices": ["single", "authors"]},
    )  # fmt: skip
    merge_checkpoint: str = field(
        default="last",
        metadata={"help": "Which fine-tuned checkpoint's task vector is merged: 'last' or, with --recipe "
                  "authors-code, 'best' (on validation).", "choices": ["last", "best"]},
    )  # fmt: skip
    keep_checkpoints: bool = field(
        default=False, metadata={"help": "Keep each finished fine-tune's Trainer checkpoints (deleted by default)."}
    )


def build_parser() -> HfArgumentParser:
    """Parser over the reproduction and training arguments, with the paper-text recipe's defaults."""
    return build_recipe_parser("paper-text")


def build_recipe_parser(recipe: str) -> HfArgumentParser:
    """The parser with ``recipe``'s training defaults (saft_hf.recipes) over the paper's."""
    parser = HfArgumentParser((ReproduceArguments, SAMTrainingArguments), description=__doc__.split("\n\n")[0])
    parser.set_defaults(**{**REPRODUCE_DEFAULTS, **train_saft.INPUT_DEFAULTS, **train_saft.RECIPE_DEFAULTS.get(recipe, {})})
    return parser


class UsageError(ValueError):
    """A wrong option or input, found before any training; reported as one ``error:`` line (exit status 2)."""


def check_arguments(args: ReproduceArguments) -> list[str]:
    """Fail before any training on a wrong task, variant or method; returns the tasks' canonical names."""
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or not args.variants or len(set(args.variants)) != len(args.variants):
        raise UsageError(f"--variants must be among {list(VARIANTS)}, each once, got {args.variants!r}.")
    if not args.methods or len(set(args.methods)) != len(args.methods):
        raise UsageError(f"--methods must list at least one merge method, each once, got {args.methods!r}.")
    try:
        for method in args.methods:
            get_method(method)  # raises naming the available methods
    except ValueError as err:
        raise UsageError(str(err)) from None
    try:
        resolve_device(args.merge_device)  # a missing CUDA stops here, not after days of fine-tuning
    except ValueError as error:
        raise UsageError(str(error).replace("--device", "--merge_device")) from None
    if args.merge_checkpoint == "best" and args.recipe != "authors-code":
        raise UsageError("--merge_checkpoint best needs --recipe authors-code, which keeps the best epoch's task vector.")
    try:
        names = [resolve_task(task, args.data_dir).name for task in args.tasks]
    except (KeyError, ValueError, FileNotFoundError) as err:
        raise UsageError(err.args[0] if err.args else str(err)) from None
    if len(set(names)) != len(names) or len(names) < 2:
        raise UsageError(f"--tasks must name at least two different tasks to merge, got {args.tasks!r}.")
    return names


def parse_args(argv: list[str] | None) -> tuple[ReproduceArguments, SAMTrainingArguments]:
    """The command line as the two dataclasses; an unknown option or bad value is a ``UsageError``."""
    try:
        parser = build_recipe_parser(train_saft._requested_recipe(argv))
        args, training_args = parser.parse_args_into_dataclasses(args=argv)
        train_saft.fit_input_settings(training_args)
        return args, training_args
    except ValueError as err:  # e.g. "Some specified arguments are not used by the HfArgumentParser: [...]"
        hint = " (progress bars: --disable_tqdm true)" if "progress" in str(err) else ""
        raise UsageError(f"{err}{hint}. See --help for the options.") from None


def stage_settings(args: ReproduceArguments, training_args: SAMTrainingArguments, task: str) -> dict[str, Any]:
    """What a fine-tune's result depends on; a finished stage with other settings is not reused."""
    keys = (*REPRODUCE_DEFAULTS, "sam_eta", "sam_ascent", "sam_adaptive_scope", "sam_loop", "num_train_epochs",
            "eval_strategy", "seed")  # fmt: skip
    # the batch a step sees, whatever the process count: a finished stage is reused on 1 or N processes
    skip = {"remove_unused_columns", "save_strategy", "save_steps", "save_total_limit", "report_to",
            "per_device_train_batch_size"}  # fmt: skip
    hyperparameters = {key: getattr(training_args, key) for key in keys if key not in skip}
    hyperparameters["total_train_batch_size"] = (
        training_args.per_device_train_batch_size * training_args.world_size * training_args.gradient_accumulation_steps
    )
    return {"task": task, "model_name_or_path": args.model_name_or_path, "max_test_samples": args.max_test_samples,
            "recipe": args.recipe, **hyperparameters}  # fmt: skip


def _clear_stale_outputs(stage_dir: Path) -> None:
    """Outputs of an unfinished or corrupted stage are never reused: remove them, keep the checkpoints."""
    for name in (MARKER_NAME, *STAGE_OUTPUTS):
        path = stage_dir / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def plan_finetune(stage_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Main process: skip a verified finished stage, else clear it and pick the checkpoint to resume from.

    The plan is broadcast to every process, so an error is returned as a plan too: raised on the main
    process alone, it would leave the others waiting at the broadcast.
    """
    try:
        marker, why = read_marker(stage_dir, settings)
    except StageMismatchError as err:
        return {"action": "error", "note": str(err)}
    if marker is not None:
        return {"action": "skip", "note": "finished earlier, outputs verified"}
    _clear_stale_outputs(stage_dir)
    checkpoint, removed = latest_valid_checkpoint(stage_dir)
    note = why + "".join(f"; removed broken {name}" for name in removed)
    return {"action": "train", "checkpoint": str(checkpoint) if checkpoint else None, "note": note}


def run_finetunes(
    args: ReproduceArguments,
    training_args: SAMTrainingArguments,
    tasks: list[str],
    progress: StageProgress,
    log: dict[str, list],
    callbacks: list[Any] | None,
) -> None:
    """Fine-tune every (variant, task) not finished yet, on all processes; the main one decides and writes markers."""
    state = PartialState()
    root = Path(training_args.output_dir)
    saft_rho, saft_adaptive = training_args.sam_rho, training_args.sam_adaptive
    for variant in args.variants:
        training_args.sam_rho = 0.0 if variant == "standard" else saft_rho
        training_args.sam_adaptive = saft_adaptive if variant == "saft" else False
        for task in tasks:
            progress.start()
            stage_dir = root / "finetune" / variant / task
            script_args = train_saft.ScriptArguments(
                task=task, model_name_or_path=args.model_name_or_path, data_dir=args.data_dir,
                cache_dir=args.cache_dir, max_test_samples=args.max_test_samples, recipe=args.recipe,
            )  # fmt: skip
            if args.recipe == "authors-code" and training_args.max_steps <= 0:
                training_args.num_train_epochs = train_saft.authors_epochs(task, script_args)  # Q8
            settings = stage_settings(args, training_args, task)
            plan = [plan_finetune(stage_dir, settings) if state.is_main_process else None]
            plan = broadcast_object_list(plan)[0]
            name = f"{task}/{variant}"
            if plan["action"] == "error":
                raise UsageError(f"fine-tune {name}: {plan['note']}")
            if plan["action"] == "skip":
                log["skipped"].append(name)
                progress.finish("fine-tune", name, plan["note"], worked=False)
                continue
            checkpoint = plan["checkpoint"]
            if state.is_main_process:
                resume = f"resuming from {Path(checkpoint).name}" if checkpoint else "from the start"
                print(f"fine-tune {name}: {plan['note']}; training {resume}", flush=True)
            training_args.output_dir = str(stage_dir)
            training_args.resume_from_checkpoint = checkpoint
            train_saft.train_task(task, script_args, training_args, callbacks=callbacks)
            if state.is_main_process:
                outputs = [*STAGE_OUTPUTS, *(["task_vector_best"] if (stage_dir / "task_vector_best").is_dir() else [])]
                write_marker(stage_dir, outputs, settings, {"variant": variant})
                if not args.keep_checkpoints:
                    remove_checkpoints(stage_dir)
            state.wait_for_everyone()
            log["trained"].append(name)
            if checkpoint:
                log["resumed"].append(f"{name}@{Path(checkpoint).name}")
            outcome = f"trained ({'resumed from ' + Path(checkpoint).name if checkpoint else 'from the start'})"
            progress.finish("fine-tune", name, outcome)
    training_args.output_dir = str(root)


def run_merges(
    args: ReproduceArguments,
    root: Path,
    tasks: list[str],
    progress: StageProgress,
    log: dict[str, list],
    bars: bool = True,
) -> dict[str, dict[str, dict]]:
    """Merge each variant's task vectors with each method (λ searched on validation), evaluated on test."""
    device = str(resolve_device(args.merge_device))
    merges: dict[str, dict[str, dict]] = {}
    for variant in args.variants:
        folder = "task_vector_best" if args.merge_checkpoint == "best" else "task_vector"
        vectors = [root / "finetune" / variant / task / folder for task in tasks]
        inputs = fingerprint(root, [str(v.relative_to(root)) for v in vectors])
        merges[variant] = {}
        for method in args.methods:
            progress.start()
            spec = get_method(method)
            grid = args.grid if spec.scalable and spec.grid is None else None
            out = root / "merges" / variant / method
            # --protocol authors: a λ per task (saft-merge --select per-task) wherever there is a λ to choose
            select = "per-task" if args.protocol == "authors" and spec.scalable else args.select
            settings = {"method": method, "grid": grid, "select": select, "max_eval_samples": args.max_eval_samples,
                        "inputs": inputs}  # fmt: skip
            name = f"{method}/{variant}"
            marker, why = read_marker(out, settings, strict=False)
            if marker is None:
                job = MergeJob(
                    repos=[str(v) for v in vectors], output=out, method=method, search=spec.scalable, grid=grid,
                    select=select, evaluate=True, data_dir=args.data_dir, max_eval_samples=args.max_eval_samples,
                    batch_size=args.merge_batch_size, device=device, overwrite=True, progress=bars,
                )  # fmt: skip
                run_merge_job(job)
                written = [p.name for p in out.iterdir() if p.name != MARKER_NAME]  # model, heads, card, JSON
                write_marker(out, written, settings, {"variant": variant})
                log["merged"].append(name)
                progress.finish("merge", name, f"merged ({why})" if why != "not run before" else "merged")
            else:
                log["reused"].append(name)
                progress.finish("merge", name, "finished earlier, outputs verified", worked=False)
            merges[variant][method] = json.loads((out / "results.json").read_text())
    return merges


def main(argv: list[str] | None = None, callbacks: list[Any] | None = None) -> int:
    """Run or continue the whole reproduction; ``callbacks`` go to every fine-tune's Trainer.

    Exit status: 0 done, 2 a wrong option or input (one ``error:`` line, nothing written), 1 a failure while
    running, 130 on Ctrl-C. Every invocation that started work appends one line to ``reproduce_runs.jsonl``.
    """
    try:
        args, training_args = parse_args(argv)
        tasks = check_arguments(args)
    except UsageError as err:
        return _error(err, 2)
    state = PartialState()
    root = Path(training_args.output_dir)
    log: dict[str, Any] = {"started": time.time(), "world_size": state.num_processes, "trained": [], "resumed": [],
                           "skipped": [], "merged": [], "reused": []}  # fmt: skip
    try:
        _run(args, training_args, tasks, log, callbacks)
        log["outcome"] = "finished"
        return 0
    except KeyboardInterrupt:
        log["outcome"] = "interrupted"
        print("reproduce_saft.py: interrupted (Ctrl-C); finished stages are kept, run the same command to continue.",
              file=sys.stderr)  # fmt: skip
        return 130
    except (UsageError, ValueError, KeyError, OSError) as err:
        log["outcome"] = f"error: {err.args[0] if isinstance(err, KeyError) and err.args else err}"
        return _error(err, 1)
    finally:
        if state.is_main_process and root.is_dir():  # one line per invocation: what it trained, resumed, reused
            with open(root / RUN_LOG, "a") as handle:
                handle.write(json.dumps(log) + "\n")


def _error(err: BaseException, code: int) -> int:
    """One line on stderr from the main process (every process meets the same user error)."""
    if PartialState().is_main_process:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"reproduce_saft.py: error: {message}", file=sys.stderr)
    return code


def _run(
    args: ReproduceArguments,
    training_args: SAMTrainingArguments,
    tasks: list[str],
    log: dict[str, Any],
    callbacks: list[Any] | None,
) -> None:
    state = PartialState()
    root = Path(training_args.output_dir)
    totals = {"fine-tune": len(tasks) * len(args.variants), "merge": len(args.methods) * len(args.variants)}
    progress = StageProgress(totals, printer=_printer(state.is_main_process))
    run_finetunes(args, training_args, tasks, progress, log, callbacks)
    state.wait_for_everyone()
    # Merging runs on the main process alone: leave the process group now rather than hold the others at a barrier.
    state.destroy_process_group()
    if not state.is_main_process:
        return
    merges = run_merges(args, root, tasks, progress, log, bars=not training_args.disable_tqdm)
    finetune = {
        v: {t: json.loads((root / "finetune" / v / t / "results.json").read_text()) for t in tasks} for v in args.variants
    }
    summary = summarize(tasks, args.variants, args.methods, finetune, merges)
    summary.update(recipe=args.recipe, protocol=args.protocol, merge_checkpoint=args.merge_checkpoint)
    written = write_report(summary, root)
    print(
        f"reproduce: trained {len(log['trained'])} ({len(log['resumed'])} resumed), skipped {len(log['skipped'])} "
        f"fine-tunes; ran {len(log['merged'])}, reused {len(log['reused'])} merges. "
        + ", ".join(f"{k}: {p}" for k, p in written.items()),
        flush=True,
    )


def _printer(enabled: bool) -> Any:
    return (lambda line: print(line, flush=True)) if enabled else (lambda line: None)


if __name__ == "__main__":
    sys.exit(main())
