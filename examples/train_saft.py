"""Fine-tune a CLIP vision tower on one of the eight merging tasks with SAM/ASAM (SAFT) or plainly.

    accelerate launch examples/train_saft.py --task DTD --output_dir out/dtd            # ASAM, rho 0.5
    accelerate launch examples/train_saft.py --task all --output_dir out --standard     # plain fine-tuning
    accelerate launch examples/train_saft.py --task DTD --output_dir out/dtd --lora_r 16  # LoRA-SAFT

Defaults follow the SAFT paper's *text* (ICLR 2025, ``--recipe paper-text``): AdamW, lr 1e-5, batch 128,
8,000 steps, cosine schedule with 500 warm-up steps, weight decay 0.1, gradient clipping 1.0, ASAM with
rho 0.5 and ASAM's own eta 0.01 on weights, in the Trainer's clean loop. ``--recipe authors-code`` follows
the paper's released *code* instead (saft_hf/recipes.py: eta 0 on every parameter, the authors' loop,
RandomResizedCrop, best-on-validation checkpoint beside the last, per-dataset epochs). Every value can be
overridden on the command line (``--help`` lists them). Writes, per task: ``vision_model/`` (HF format)
and the zero-shot head, ``task_vector/`` (fine-tuned − pre-trained vision weights), ``results.json``.
With ``--lora_r`` only a PEFT LoRA adapter is trained (SAM/ASAM perturb its parameters only) and
``task_vector/`` is that adapter (the LoRA path ``saft-merge`` reads), with the head and
``saft_provenance.json`` (task, method, rank) beside it; no ``vision_model/`` is written.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import PartialState
from transformers import AutoImageProcessor, AutoTokenizer, HfArgumentParser, TrainerCallback

from saft_hf import sam
from saft_hf.base_model import BaseCheckpoint, load_base_clip, load_base_vision_tower, resolve_base
from saft_hf.cli.options import unwritable_output
from saft_hf.clip import (
    HEAD_WEIGHTS_NAME,
    CLIPImageClassifier,
    ZeroShotHead,
    build_zero_shot_head,
    collate_image_batch,
    evaluate_accuracy,
    load_vision_tower,
)
from saft_hf.io_utils import apply_umask_modes, replace_dir
from saft_hf.metrics import load_accuracy
from saft_hf.recipes import (
    AUTHORS_EPOCHS,
    RECIPE_DEFAULTS,
    RECIPES,
    RandomResizedCropTransform,
    recipe_summary,
)
from saft_hf.task_vector_io import provenance_config
from saft_hf.task_vectors import TaskVector
from saft_hf.tasks import (
    DATA_DIR_ENV,
    TASKS,
    PixelNormalizer,
    TaskSpec,
    default_num_workers,
    load_task,
    resolve_task,
)
from saft_hf.trainer import SAMTrainer, SAMTrainingArguments

# SAFT paper defaults (Sec. 5 text; --recipe adds RECIPE_DEFAULTS); set_defaults, so the CLI overrides them.
PAPER_DEFAULTS: dict[str, Any] = {
    "optim": "adamw_torch",
    "learning_rate": 1e-5,
    "per_device_train_batch_size": 128,
    "max_steps": 8000,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 500,
    "weight_decay": 0.1,
    "max_grad_norm": 1.0,
    "sam_adaptive": True,
    "sam_rho": 0.5,
    "remove_unused_columns": False,  # the collator needs pixel_values and labels from the lazy transform
    "save_strategy": "no",
    "report_to": "none",
    # Not the paper's: log 20 times per run (a fraction of max_steps), so a 30-step run logs too.
    "logging_steps": 0.05,
    "logging_first_step": True,
}
NOT_HYPERPARAMETERS = ("remove_unused_columns", "save_strategy", "report_to", "logging_steps", "logging_first_step")
# The input path of a GPU run, not hyperparameters: decode + resize in DataLoader workers (one per core
# left over, at most 16), kept across epochs; evaluation batches that fill a GPU. All overridable.
INPUT_DEFAULTS: dict[str, Any] = {
    "dataloader_num_workers": default_num_workers(),
    "dataloader_persistent_workers": True,
    "per_device_eval_batch_size": 128,
}


# The cheap-SAM settings (SAMTrainingArguments), recorded with the run's hyperparameters.
CHEAP_SAM_KEYS = ("sam_mode", "sam_interval", "sam_looksam_alpha", "sam_include", "sam_exclude")
# The CLIP vision encoder's linear layers (attention and MLP); the projection stays frozen under LoRA.
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclass
class ScriptArguments:
    """What to fine-tune on; the optimisation settings are the ``SAMTrainingArguments``."""

    task: str = field(
        default="DTD",
        metadata={
            "help": "Task: one of Cars, DTD, EuroSAT, GTSRB, MNIST, RESISC45, SUN397, SVHN (case-insensitive), a "
            "custom task whose local data dir holds a task_spec.json, or 'all' to train the eight in turn "
            "(one sub-directory of --output_dir per task)."
        },
    )
    model_name_or_path: str = field(
        default="openai/clip-vit-base-patch32",
        metadata={"help": "CLIP checkpoint (Hub id or directory) giving the vision tower, text tower and processor."},
    )
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Local data: a directory with one sub-directory per task (<dir>/<Task>), or the task's data "
            "itself (a DatasetDict saved with save_to_disk, or any path load_dataset accepts). Default: "
            "$SAFT_DATA_DIR, else the Hub."
        },
    )
    head_dir: str | None = field(
        default=None,
        metadata={
            "help": "Cache of zero-shot heads: <head_dir>/<Task>/head.safetensors is reused when present, else "
            "built and saved there. Default: the task's output directory."
        },
    )
    recipe: str = field(
        default="paper-text",
        metadata={
            "help": "'paper-text' (default): the SAFT paper's text — ASAM eta 0.01 on weights, the Trainer's clean "
            "loop, 8,000 steps, the last checkpoint. 'authors-code': the paper's released code — ASAM eta 0 on "
            "every parameter, --sam_loop authors (gradients never zeroed, descent not clipped, decay on all), "
            "RandomResizedCrop(224, scale 0.9-1.0, bicubic) on training images, validation each epoch with the "
            "best checkpoint kept beside the last (task_vector_best/), per-dataset epochs (Cars 140, DTD 304, "
            "EuroSAT 48, GTSRB 44, MNIST 20, RESISC45 60, SUN397 56, SVHN 16) at batch 128.",
            "choices": list(RECIPES),
        },
    )
    epochs: float | None = field(
        default=None,
        metadata={"help": "--recipe authors-code: epochs to train (default: the authors' per-dataset table)."},
    )
    standard: bool = field(default=False, metadata={"help": "Standard fine-tuning: same as --sam_rho 0."})
    cache_dir: str | None = field(default=None, metadata={"help": "Cache directory for Hub downloads."})
    max_test_samples: int | None = field(
        default=None, metadata={"help": "Evaluate test accuracy on at most this many examples (default: all)."}
    )
    lora_r: int | None = field(
        default=None,
        metadata={
            "help": "LoRA-SAFT: train a PEFT LoRA adapter of this rank on the vision tower instead of all its "
            "weights (SAM/ASAM perturb the adapter parameters only; --standard trains it plainly). The adapter "
            "is saved as task_vector/, which saft-merge reads as a LoRA task vector."
        },
    )
    lora_alpha: float | None = field(
        default=None, metadata={"help": "LoRA's alpha (the update is scaled by alpha / r). Default: r (scale 1)."}
    )
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(LORA_TARGET_MODULES),
        metadata={"help": "Module names that get a LoRA adapter. Default: every linear layer of the encoder."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace a finished run (results.json) in --output_dir; the old outputs stay in place until "
            "the new run has finished. Without it a finished run is refused, and an unfinished one with Trainer "
            "checkpoints (--save_steps) is resumed from its newest complete checkpoint."
        },
    )
    traceback: bool = field(
        default=False, metadata={"help": "Show the full traceback of an error instead of one line."}
    )


class UsageError(ValueError):
    """A wrong option or input found before training; reported as one line naming the fix."""


class LogLastStepCallback(TrainerCallback):
    """Log at the last step too, so a run shorter than ``logging_steps`` still reports loss and ``sam_*``."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            control.should_log = True
        return control


def build_parser(recipe: str = "paper-text") -> HfArgumentParser:
    """Parser over the script and training arguments, with the paper's defaults and ``recipe``'s."""
    parser = HfArgumentParser((ScriptArguments, SAMTrainingArguments), description=__doc__.split("\n\n")[0])
    parser.set_defaults(**{**PAPER_DEFAULTS, **INPUT_DEFAULTS, **RECIPE_DEFAULTS.get(recipe, {})})
    return parser


def _requested_recipe(argv: list[str] | None) -> str:
    """The --recipe on the command line (its defaults apply before the full parse); a bad one fails there."""
    args = sys.argv[1:] if argv is None else argv
    for i, arg in enumerate(args):
        if arg == "--recipe" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--recipe="):
            return arg.split("=", 1)[1]
    return "paper-text"


def parse_args(argv: list[str] | None = None) -> tuple[ScriptArguments, SAMTrainingArguments]:
    """Parse the command line; ``--standard`` sets ``sam_rho`` to 0. A bad value raises ``UsageError``."""
    try:
        script_args, training_args = build_parser(_requested_recipe(argv)).parse_args_into_dataclasses(args=argv)
    except ValueError as err:  # e.g. SAMTrainingArguments' check of --sam_rho
        raise UsageError(f"{err} See --help.") from err
    if script_args.standard:
        training_args.sam_rho = 0.0
    if script_args.recipe != "authors-code" and script_args.epochs is not None:
        raise UsageError("--epochs belongs to --recipe authors-code; use --num_train_epochs or --max_steps.")
    fit_input_settings(training_args)
    return script_args, training_args


def authors_epochs(task: str, script_args: ScriptArguments) -> float:
    """Q8: the epochs of --recipe authors-code for ``task`` (--epochs, else the authors' table)."""
    if script_args.epochs is not None:
        return script_args.epochs
    name = next((n for n in AUTHORS_EPOCHS if n.lower() == task.lower()), None)
    if name is None:
        raise UsageError(
            f"--recipe authors-code has per-dataset epochs for {', '.join(AUTHORS_EPOCHS)} only; give --epochs "
            f"(or --max_steps) for task {task!r}."
        )
    return float(AUTHORS_EPOCHS[name])


class KeepBestCallback(TrainerCallback):
    """Q6 (--recipe authors-code): after each evaluation, save the vision tower when validation accuracy improves.

    As the authors' loop: strictly better than the best so far (the first of equal epochs is kept).
    """

    def __init__(self, model: CLIPImageClassifier, directory: Path, resumed: bool = False) -> None:
        self.model, self.directory = model, directory
        self.best: float | None = None
        self.best_epoch: float | None = None
        record = directory / "best.json"
        if resumed and record.is_file():  # a resumed run continues from the best epoch so far
            saved = json.loads(record.read_text())
            self.best, self.best_epoch = saved["accuracy"], saved["epoch"]
        elif not resumed:
            shutil.rmtree(directory, ignore_errors=True)  # a fresh run never reuses an older run's best

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None, **kwargs: Any) -> None:
        accuracy = (metrics or {}).get("eval_accuracy")
        if accuracy is None or (self.best is not None and accuracy <= self.best):
            return
        self.best, self.best_epoch = float(accuracy), state.epoch
        if state.is_world_process_zero:
            self.model.vision_model.save_pretrained(self.directory)
            _write_json({"accuracy": self.best, "epoch": self.best_epoch}, self.directory / "best.json")


def fit_input_settings(training_args: SAMTrainingArguments) -> None:
    """``--dataloader_num_workers 0`` leaves no workers to keep: persistence off (the DataLoader refuses it)."""
    if training_args.dataloader_num_workers == 0:
        training_args.dataloader_persistent_workers = False


def lora_settings(script_args: ScriptArguments) -> dict[str, Any] | None:
    """The LoRA adapter's settings as recorded in provenance, or None without ``--lora_r``."""
    if script_args.lora_r is None:
        return None
    if script_args.lora_r < 1:
        raise ValueError(f"--lora_r must be a rank >= 1, got {script_args.lora_r}; leave it out to train all weights.")
    alpha = float(script_args.lora_r if script_args.lora_alpha is None else script_args.lora_alpha)
    if not alpha > 0:
        raise ValueError(f"--lora_alpha must be > 0, got {script_args.lora_alpha}.")
    if not script_args.lora_target_modules:
        raise ValueError("--lora_target_modules is empty; name at least one module, e.g. q_proj v_proj.")
    return {"lora_r": script_args.lora_r, "lora_alpha": alpha, "lora_target_modules": list(script_args.lora_target_modules)}


def add_lora(vision: Any, lora: dict[str, Any]) -> Any:
    """Wrap the vision tower in a PEFT LoRA model: only the adapters train, and only they are perturbed."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora["lora_r"], lora_alpha=lora["lora_alpha"], target_modules=lora["lora_target_modules"])
    return get_peft_model(vision, config)


def save_lora_task_vector(vision: Any, head: ZeroShotHead, config: dict[str, Any], directory: Path) -> None:
    """Write the adapter (saft-merge's LoRA task-vector path), the head and the provenance, all at once."""
    from saft_hf.io_utils import atomic_output_dir
    from saft_hf.readers import LORA_PROVENANCE_NAME

    with atomic_output_dir(directory, overwrite=True) as tmp:
        vision.save_pretrained(tmp)
        head.save_pretrained(tmp)
        _write_json(config, tmp / LORA_PROVENANCE_NAME)


def method_name(args: SAMTrainingArguments) -> str:
    return sam.method_name(args.sam_rho, args.sam_adaptive)


def _looks_like_path(name: str) -> bool:
    """True for names only a local folder can have (a Hub id is ``name`` or ``owner/name``)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def check_inputs(task: str, script_args: ScriptArguments, training_args: SAMTrainingArguments) -> None:
    """Refuse wrong options before anything is loaded or written, naming the problem and the fix."""
    problem = unwritable_output(training_args.output_dir)
    if problem is not None:
        raise UsageError(problem.replace("the output", "--output_dir"))
    model = script_args.model_name_or_path
    if Path(model).expanduser().exists():
        if not (Path(model).expanduser() / "config.json").is_file():
            raise UsageError(
                f"--model_name_or_path {model!r} has no config.json; point it at a CLIP checkpoint folder "
                "(saved with save_pretrained) or a Hub id like openai/clip-vit-base-patch32."
            )
    elif _looks_like_path(model):
        raise UsageError(
            f"--model_name_or_path {model!r}: no such folder; check the path, or give a Hub id like "
            "openai/clip-vit-base-patch32."
        )
    data_dir = script_args.data_dir if script_args.data_dir is not None else os.environ.get(DATA_DIR_ENV)
    flag = "--data_dir" if script_args.data_dir is not None else f"${DATA_DIR_ENV}"
    if data_dir:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise UsageError(f"{flag} {data_dir!r} is not a folder; point it at the local task data.")
        if not any(root.iterdir()):
            raise UsageError(
                f"{flag} {data_dir!r} is empty; it should hold one folder per task (e.g. {root / 'DTD'}) or one "
                "task's data (a DatasetDict saved with save_to_disk)."
            )
    known = task.lower() in {name.lower() for name in TASKS}
    if known and data_dir:
        spec = TASKS[task]
        names = {spec.name, spec.name.lower(), spec.dataset_id.split("/")[-1]}
        task_folders = sorted(
            d.name for d in root.iterdir() if (d / "task_spec.json").is_file() or (d / "dataset_dict.json").is_file()
        )
        if task_folders and not names & set(task_folders):
            raise UsageError(
                f"{flag} {data_dir!r} holds data for {', '.join(task_folders)} but not for task {spec.name!r}; "
                f"add {root / spec.name}, or drop {flag} to load {spec.dataset_id} from the Hub."
            )
    if not known:
        local = [root / task, root / task.lower()] if data_dir else []
        if not any((folder / "task_spec.json").is_file() for folder in local) and not (
            data_dir and (root / "task_spec.json").is_file()
        ):
            where = (
                f"no {task}/task_spec.json was found in {flag} {data_dir!r}"
                if data_dir
                else "no --data_dir holding its data and task_spec.json was given"
            )
            raise UsageError(
                f"unknown task {task!r}: it is not one of {', '.join(TASKS)}, and {where}; pick a built-in task, "
                "or point --data_dir at a folder with <task>/task_spec.json."
            )


def finished_run(output_dir: Path) -> str | None:
    """A description of the finished run in ``output_dir`` (its ``results.json``), or None if there is none."""
    results = output_dir / "results.json"
    if not results.is_file():
        return None
    try:
        recorded = json.loads(results.read_text())
        summary = f"task {recorded.get('task')}, {recorded.get('method')}, test accuracy {recorded.get('test_accuracy')}"
    except (OSError, ValueError):
        summary = "results.json unreadable"
    return summary


def check_output(output_dir: Path, script_args: ScriptArguments) -> None:
    """Refuse to replace a finished run unless ``--overwrite_output_dir`` (the Trainer's name for "replace")."""
    finished = finished_run(output_dir)
    if finished is not None and not script_args.overwrite_output_dir:
        raise UsageError(
            f"--output_dir {str(output_dir)!r} holds a finished run ({finished}); pass --overwrite_output_dir to "
            "replace it once the new run has finished, or choose another --output_dir."
        )


def resume_checkpoint(output_dir: Path) -> str | None:
    """The newest complete Trainer checkpoint of an unfinished run in ``output_dir``, to resume from; else None."""
    from saft_hf.reproduce.stages import latest_valid_checkpoint

    if not output_dir.is_dir():
        return None
    checkpoint, removed = latest_valid_checkpoint(output_dir) if PartialState().is_main_process else (None, [])
    for problem in removed:
        print(f"train_saft.py: removed an incomplete checkpoint: {problem}", file=sys.stderr)
    PartialState().wait_for_everyone()
    if checkpoint is None and not PartialState().is_main_process:
        checkpoint, _ = latest_valid_checkpoint(output_dir)
    return str(checkpoint) if checkpoint is not None else None


def absolute_steps(training_args: SAMTrainingArguments) -> Callable[[], None]:
    """Make fractional ``logging/save/eval_steps`` step counts (``max_steps`` known); returns the undo.

    The Trainer converts them internally but compares the fraction with the count it saved when it
    resumes, warning about a mismatch that is not one. Undo once training has started its state.
    """
    saved = {name: getattr(training_args, name) for name in ("logging_steps", "save_steps", "eval_steps")}
    for name, value in saved.items():
        if training_args.max_steps > 0 and value is not None and 0 < value < 1:
            setattr(training_args, name, max(1, math.ceil(training_args.max_steps * value)))

    def restore() -> None:
        for name, value in saved.items():
            setattr(training_args, name, value)

    return restore


def warn_if_fewer_processes(training_args: SAMTrainingArguments) -> bool:
    """Warn when ``accelerate launch --num_processes N`` (N > 1) started a single process; True if warned.

    Without ``--multi_gpu`` (or a config saying so), ``accelerate launch --cpu`` runs one process, sets
    ``MASTER_ADDR`` for N > 1 but no ``WORLD_SIZE``: the run trains with world size 1.
    """
    launched = any(key.startswith("ACCELERATE_") for key in os.environ) and "MASTER_ADDR" in os.environ
    if training_args.world_size != 1 or not launched or "WORLD_SIZE" in os.environ:
        return False
    print(
        "train_saft.py: warning: accelerate launch was asked for more than one process, but this run has world "
        "size 1 (one process). For N processes on CPU use: accelerate launch --multi_gpu --num_processes N "
        "examples/train_saft.py ... --use_cpu",
        file=sys.stderr,
    )
    return True


def _write_json(data: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def load_or_build_head(spec: TaskSpec, base: BaseCheckpoint, head_dir: Path) -> ZeroShotHead:
    """Reuse ``head_dir``'s head if it exists (checking its class count), else encode the prompts and save it."""
    if (head_dir / HEAD_WEIGHTS_NAME).is_file():
        head = ZeroShotHead.from_pretrained(head_dir)
        head.check_classnames(spec.classnames, what=f"task {spec.name!r}")
        return head
    tokenizer = AutoTokenizer.from_pretrained(base.directory)
    head = build_zero_shot_head(load_base_clip(base), tokenizer, spec.classnames, spec.templates, task=spec.name)
    head.save_pretrained(head_dir)
    return head


def compute_metrics(eval_pred: Any) -> dict[str, float]:
    """Validation accuracy for ``--eval_strategy steps`` (the paper picks the best checkpoint on it)."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    return load_accuracy().compute(predictions=np.argmax(logits, axis=-1), references=labels)


def train_task(
    task: str,
    script_args: ScriptArguments,
    training_args: SAMTrainingArguments,
    callbacks: list[Any] | None = None,
) -> dict[str, Any] | None:
    """Fine-tune one task (from ``--resume_from_checkpoint`` if given); the main process writes the outputs."""
    output_dir = Path(training_args.output_dir)
    spec = resolve_task(task, script_args.data_dir)
    head_dir = Path(script_args.head_dir) / spec.name if script_args.head_dir else output_dir
    with training_args.main_process_first(desc=f"{spec.name}: base model, zero-shot head and data"):
        # the base as transformers reads it: safetensors, else its conversion branch, else its weights_only loader
        base = resolve_base(script_args.model_name_or_path, cache_dir=script_args.cache_dir)
        processor = AutoImageProcessor.from_pretrained(base.directory)
        # data first: a task whose data fails to load leaves no head file behind in the output folder
        # uint8 from the workers (JPEG draft decoding for train only), normalised on the device by the model
        data = load_task(spec, script_args.data_dir, processor, cache_dir=script_args.cache_dir, uint8=True, draft=True)
        head = load_or_build_head(spec, base, head_dir)
    vision = load_base_vision_tower(base)
    authors = script_args.recipe == "authors-code"
    if authors:  # Q5: open_clip's training augmentation on the training split only
        crop = RandomResizedCropTransform(processor, spec.image_column, spec.label_column)
        data["train"] = data["train"].with_transform(crop, columns=[spec.image_column, spec.label_column])
    lora = lora_settings(script_args)
    pretrained = {name: tensor.detach().clone() for name, tensor in vision.state_dict().items()} if lora is None else {}
    if lora is not None:
        vision = add_lora(vision, lora)
    model = CLIPImageClassifier(vision, head, PixelNormalizer.from_processor(processor))
    resumed = training_args.resume_from_checkpoint is not None
    keep_best = KeepBestCallback(model, output_dir / "best_vision_model", resumed) if authors else None

    restore_steps = absolute_steps(training_args)
    trainer = SAMTrainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=collate_image_batch,
        compute_metrics=compute_metrics,
        callbacks=[LogLastStepCallback(), *([keep_best] if keep_best else []), *(callbacks or [])],
    )
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    restore_steps()  # the caller's arguments as given (reproduce_saft.py compares them across stages)
    trainer.accelerator.wait_for_everyone()
    results = None
    if trainer.is_world_process_zero():
        accuracy = evaluate_accuracy(
            model,
            data["test"],
            batch_size=training_args.per_device_eval_batch_size,
            max_samples=script_args.max_test_samples,
            num_workers=training_args.dataloader_num_workers,
        )
        # recorded for saft-merge --select normalized, which must choose λ on validation data only
        validation_accuracy = evaluate_accuracy(
            model, data["validation"], batch_size=training_args.per_device_eval_batch_size,
            num_workers=training_args.dataloader_num_workers,
        )
        if lora is None:
            model.save_pretrained(output_dir)
        hyperparameters = {
            key: getattr(training_args, key)
            for key in (*PAPER_DEFAULTS, "sam_eta", "sam_ascent", "sam_adaptive_scope", "sam_loop", *CHEAP_SAM_KEYS,
                        "seed", *(("num_train_epochs",) if authors else ()))
            if key not in NOT_HYPERPARAMETERS
        }
        hyperparameters["recipe"] = script_args.recipe
        if lora is not None:
            hyperparameters.update(lora)
        results = {
            "task": spec.name,
            "dataset_id": spec.dataset_id,
            "method": method_name(training_args),
            "base_model": script_args.model_name_or_path,
            "test_accuracy": accuracy,
            "validation_accuracy": validation_accuracy,
            "train_loss": train_result.training_loss,
            "loss_history": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
            "sam_history": [
                {key: value for key, value in entry.items() if key == "step" or key.startswith("sam_")}
                for entry in trainer.state.log_history
                if any(key.startswith("sam_") for key in entry)
            ],
            "global_step": trainer.state.global_step,
            "world_size": training_args.world_size,
            "num_examples": {split: len(data[split]) for split in data},
            "hyperparameters": hyperparameters,
            "recipe": recipe_summary(script_args.recipe),
        }
        config = provenance_config(
            task=spec.name,
            dataset=spec.dataset_id,
            base_model=script_args.model_name_or_path,
            base_model_revision=base.resolved_revision,
            base_weights={k: v for k, v in base.record().items() if k.startswith("weights")},
            method=results["method"],
            hyperparameters=hyperparameters,
            metrics={"accuracy": accuracy, "validation_accuracy": validation_accuracy},
            recipe=recipe_summary(script_args.recipe),
            checkpoint="last",
        )
        if lora is not None:
            head.save_pretrained(output_dir)
            save_lora_task_vector(model.vision_model, head, config, output_dir / "task_vector")
        else:
            task_vector = TaskVector.from_models(pretrained, model.vision_model, config=config, head_dir=output_dir)
            task_vector.save_pretrained(output_dir / "task_vector")
        if keep_best is not None and keep_best.best is not None:
            results["best"] = save_best_task_vector(
                keep_best, pretrained, model, data, config, script_args, training_args, output_dir
            )
        _write_json(results, output_dir / "results.json")
        print(
            f"{spec.name}: test accuracy {accuracy:.4f}, validation accuracy {validation_accuracy:.4f} "
            f"({results['method']}), outputs in {output_dir}"
        )
    trainer.accelerator.wait_for_everyone()
    return results


def save_best_task_vector(
    keep_best: KeepBestCallback,
    pretrained: dict[str, Any],
    model: CLIPImageClassifier,
    data: Any,
    config: dict[str, Any],
    script_args: ScriptArguments,
    training_args: SAMTrainingArguments,
    output_dir: Path,
) -> dict[str, Any]:
    """Q6: task_vector_best/ from the best-on-validation epoch, beside the last one; returns its metrics."""
    best_vision = load_vision_tower(str(keep_best.directory))
    best_model = CLIPImageClassifier(best_vision, model.head, model.normalizer)
    batch = training_args.per_device_eval_batch_size
    metrics = {
        "accuracy": evaluate_accuracy(best_model, data["test"], batch_size=batch, max_samples=script_args.max_test_samples),
        "validation_accuracy": evaluate_accuracy(best_model, data["validation"], batch_size=batch),
    }
    best_config = {**config, "metrics": metrics, "checkpoint": f"best (epoch {keep_best.best_epoch:g})"}
    vector = TaskVector.from_models(pretrained, best_vision, config=best_config, head_dir=output_dir)
    vector.save_pretrained(output_dir / "task_vector_best")
    shutil.rmtree(keep_best.directory, ignore_errors=True)
    return {"epoch": keep_best.best_epoch, "test_accuracy": metrics["accuracy"],
            "validation_accuracy": metrics["validation_accuracy"]}  # fmt: skip


def _report_error(err: BaseException) -> None:
    """One line on stderr, from the main process only (every process hits the same user error)."""
    if os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) in ("", "0"):
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"train_saft.py: error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Train each requested task; a user error is one line on stderr and exit status 1."""
    show_traceback = "--traceback" in (sys.argv[1:] if argv is None else argv)
    created: list[Path] = []
    try:
        script_args, training_args = parse_args(argv)
        warn_if_fewer_processes(training_args)
        tasks = list(TASKS) if script_args.task.lower() == "all" else [script_args.task]
        root = Path(training_args.output_dir)
        targets = {task: root / TASKS[task].name if len(tasks) > 1 else root for task in tasks}
        for task in tasks:
            check_inputs(task, script_args, training_args)
            check_output(targets[task], script_args)
            if script_args.recipe == "authors-code":
                if script_args.lora_r is not None:
                    raise UsageError("--recipe authors-code trains every weight, as the authors' code; drop --lora_r.")
                if training_args.max_steps <= 0:
                    authors_epochs(task, script_args)  # an unknown task fails before anything trains
        state, asked_resume = PartialState(), training_args.resume_from_checkpoint
        for task, target in targets.items():
            if script_args.recipe == "authors-code" and training_args.max_steps <= 0:
                training_args.num_train_epochs = authors_epochs(task, script_args)  # Q8
            if script_args.overwrite_output_dir and target.exists():
                # train beside the old run; it is replaced only once the new one has finished
                staging = target.with_name(f".{target.name}.overwrite.tmp")
                if state.is_main_process:
                    shutil.rmtree(staging, ignore_errors=True)
                state.wait_for_everyone()
                created.append(staging)
                training_args.output_dir, training_args.resume_from_checkpoint = str(staging), None
                train_task(task, script_args, training_args)
                if state.is_main_process:
                    apply_umask_modes(staging)
                    replace_dir(staging, target)
                    print(f"train_saft.py: replaced the run in {target}", file=sys.stderr)
                state.wait_for_everyone()
            else:
                training_args.output_dir = str(target)
                if not target.exists():
                    created.append(target)
                checkpoint = asked_resume or resume_checkpoint(target)
                if checkpoint is not None and asked_resume is None and state.is_main_process:
                    print(f"train_saft.py: resuming the unfinished run in {target} from {checkpoint}", file=sys.stderr)
                training_args.resume_from_checkpoint = checkpoint
                train_task(task, script_args, training_args)
            created = []  # a finished task's outputs are complete: keep them
    except (UsageError, ValueError, KeyError, OSError) as err:
        if show_traceback:
            raise
        _report_error(err)
        if PartialState().is_main_process:
            for folder in created:  # the failed task's folder, when this run made it
                shutil.rmtree(folder, ignore_errors=True)
        return 1
    finally:
        # Destroy the process group before exit: left to interpreter shutdown, gloo's threads can abort it.
        PartialState().destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
