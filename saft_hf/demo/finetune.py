"""Per-task pieces of the demo: preprocessed splits, frozen prototype heads, fine-tuning, accuracies."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import CLIPVisionModelWithProjection
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..clip import CLIPImageClassifier, ZeroShotHead, collate_image_batch, evaluate_accuracy
from ..sam import first_step, second_step
from ..tasks.loading import with_image_transform
from ..trainer import SAMTrainer, SAMTrainingArguments
from .base import load_base
from .config import DemoArguments
from .data import SPLITS, build_task

Items = list[dict[str, Tensor]]


def load_splits(task: str, seed: int, args: DemoArguments, processor: Any) -> dict[str, Items]:
    """A task's splits through the library's image transform, read once into memory.

    There is no augmentation, so preprocessing once gives the same items as reading lazily each epoch.
    """
    data = build_task(
        task,
        seed,
        args.n_train,
        args.n_validation,
        args.n_test,
        args.base_spec().image_size,
        distinct_domains=args.task_domains == "distinct",
    )
    data = with_image_transform(data, processor)
    return {split: [data[split][i] for i in range(len(data[split]))] for split in SPLITS}


@torch.no_grad()
def prototype_head(vision: CLIPVisionModelWithProjection, items: Items, classnames: Sequence[str], task: str) -> ZeroShotHead:
    """The zero-shot head's analogue: per class, the normalised mean of normalised base embeddings (train split)."""
    vision.eval()
    batch = collate_image_batch(items)
    embeds = F.normalize(vision(pixel_values=batch["pixel_values"]).image_embeds, dim=-1)
    sums = torch.zeros(len(classnames), embeds.shape[-1]).index_add_(0, batch["labels"], embeds)
    if (torch.bincount(batch["labels"], minlength=len(classnames)) == 0).any():
        raise ValueError(f"task {task!r}: some class has no training example; raise --n-train above {len(items)}")
    # CLIP's logit scale (100), as the zero-shot heads of the real tasks use.
    return ZeroShotHead.from_prototypes(sums, classnames, logit_scale=100.0, task=task)


def accuracy(vision: CLIPVisionModelWithProjection, head: ZeroShotHead, items: Items) -> float:
    """Top-1 accuracy of tower + head on preprocessed items."""
    return evaluate_accuracy(CLIPImageClassifier(vision, head), items, batch_size=256, progress=False)


def accuracies(
    vision: CLIPVisionModelWithProjection, heads: Mapping[str, ZeroShotHead], splits: Mapping[str, Items]
) -> dict[str, float]:
    """Accuracy of one shared tower on every task, each through its own frozen head."""
    return {task: accuracy(vision, heads[task], items) for task, items in splits.items()}


def training_arguments(
    args: DemoArguments, output_dir: str, settings: Mapping[str, Any], seed: int
) -> SAMTrainingArguments:
    """The fine-tuning recipe: AdamW + cosine for every variant; ``settings`` are the variant's ``sam_*``.

    ``settings`` may carry any SAMTrainingArguments field (e.g. ``sam_mode``, ``sam_interval``, ``sam_include``,
    ``learning_rate``); they win over the recipe.
    """
    recipe: dict[str, Any] = dict(
        output_dir=output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=int(args.warmup_ratio * args.steps),
        lr_scheduler_type="cosine",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        seed=seed,
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    return SAMTrainingArguments(**{**recipe, **settings})  # a variant may override the rate (LoRA)


def finetune(
    base_path: Path,
    head: ZeroShotHead,
    train: Items,
    args: DemoArguments,
    settings: Mapping[str, Any],
    seed: int,
    lora: Mapping[str, Any] | None = None,
) -> tuple[CLIPVisionModelWithProjection, float]:
    """Fine-tune the base tower on one task under its frozen head; returns (tower, final train loss).

    ``settings`` go to SAMTrainingArguments (sam_rho, ASAM, cheap-SAM modes); ``lora`` (``r``, ``lora_alpha``,
    ``target_modules``: peft.LoraConfig fields) trains a LoRA adapter instead of all weights, merged into
    the returned tower so its task vector is the adapter's delta.
    """
    vision = load_base(base_path)
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        vision = get_peft_model(vision, LoraConfig(**lora))
    model = CLIPImageClassifier(vision, head)
    with tempfile.TemporaryDirectory(prefix="saft-demo-ft-") as scratch:
        trainer = SAMTrainer(
            model=model,
            args=training_arguments(args, scratch, settings, seed),
            train_dataset=train,
            data_collator=collate_image_batch,
        )
        for callback in (PrinterCallback, ProgressCallback):  # the demo draws its own progress bar
            trainer.remove_callback(callback)
        result = trainer.train()
    if lora is not None:
        vision = vision.merge_and_unload()
        vision.requires_grad_(True)  # PEFT froze the base weights; hand back a tower like the others
    vision.eval()
    return vision, float(result.training_loss)


def sharpness(
    vision: CLIPVisionModelWithProjection, head: ZeroShotHead, items: Items, rho: float = 0.05
) -> float:
    """SAM sharpness at the end of fine-tuning: L(w + ε) − L(w), ε = ρ g/‖g‖ on one batch (Foret et al. 2021).

    The same probe (plain SAM, the same ρ and batch) for every variant, so their minima are compared alike.
    """
    model = CLIPImageClassifier(vision, head)
    batch = collate_image_batch(items)
    params = [p for p in vision.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    backup, _ = first_step(params, [p.grad for p in params], rho)
    with torch.no_grad():
        perturbed = model(**batch).loss
    if backup is not None:
        second_step(params, backup)
    model.zero_grad(set_to_none=True)
    return float(perturbed - loss.detach())
