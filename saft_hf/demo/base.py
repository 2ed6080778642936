"""The demo's pre-trained base: a small CLIP vision tower pre-trained on the pretext task, cached.

The base plays CLIP's part: it is trained once on data that is none of the evaluation tasks, saved
with `save_pretrained` (safetensors) under the user's cache dir, and every later run reuses it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionModelWithProjection,
    Trainer,
    TrainingArguments,
)

from ..io_utils import atomic_output_dir, cache_root
from .attributes import DETAILS, IGNORE, build_attribute_pretext
from .pretext import build_pretext
from .spec import BASE_FORMAT_VERSION, BaseSpec

logger = logging.getLogger(__name__)



def default_cache_dir() -> Path:
    """`$SAFT_HF_CACHE/demo`, else `$XDG_CACHE_HOME/saft_hf/demo`, else `~/.cache/saft_hf/demo`."""
    return cache_root() / "demo"


def image_processor(image_size: int) -> CLIPImageProcessorPil:
    """A CLIP image processor for `image_size` pixels (CLIP's mean/std), saved beside the base.

    The PIL backend: at 32 pixels it is fast enough, and it needs no torchvision.
    """
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


class CosinePretextModel(nn.Module):
    """The base tower plus a cosine classifier over the pretext classes (CLIP-style scaled cosine logits)."""

    def __init__(self, vision: CLIPVisionModelWithProjection, num_classes: int) -> None:
        super().__init__()
        self.vision = vision
        self.prototypes = nn.Parameter(torch.randn(num_classes, vision.config.projection_dim) * 0.02)
        # CLIP's logit scale (1/0.07 at init), learned; the zero-shot-style demo heads reuse cosines.
        self.log_scale = nn.Parameter(torch.tensor(2.659))

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
        embeds = F.normalize(self.vision(pixel_values=pixel_values).image_embeds, dim=-1)
        logits = self.log_scale.exp().clamp(max=100) * embeds @ F.normalize(self.prototypes, dim=-1).T
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


class AttributePretextModel(nn.Module):
    """The base tower plus one cosine classifier per caption attribute; unmentioned attributes are ignored."""

    def __init__(self, vision: CLIPVisionModelWithProjection, sizes: dict[str, int]) -> None:
        super().__init__()
        self.vision = vision
        self.names = list(sizes)
        self.prototypes = nn.ParameterList(
            [nn.Parameter(torch.randn(n, vision.config.projection_dim) * 0.02) for n in sizes.values()]
        )
        self.log_scale = nn.Parameter(torch.tensor(2.659))

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
        embeds = F.normalize(self.vision(pixel_values=pixel_values).image_embeds, dim=-1)
        scale = self.log_scale.exp().clamp(max=100)
        logits = [scale * embeds @ F.normalize(p, dim=-1).T for p in self.prototypes]
        loss = None
        if labels is not None:
            losses = [
                F.cross_entropy(lg, labels[:, i], ignore_index=IGNORE, reduction="sum")
                for i, lg in enumerate(logits)
            ]
            loss = torch.stack(losses).sum() / (labels != IGNORE).sum().clamp(min=1)
        return {"loss": loss, "logits": torch.cat(logits, dim=-1)}


def _pixel_items(spec: BaseSpec, sample_seed: int, fraction: float) -> list[dict[str, torch.Tensor]]:
    """Pretext examples preprocessed once into tensors (reading Arrow rows per step costs more than the model).

    ``fraction`` of the training set's size: 1 for training, less for the held-out check.
    """
    processor = image_processor(spec.image_size)
    if spec.pretext == "attributes":
        n = max(2, int(spec.pretext_scenes * fraction))
        data = build_attribute_pretext(n, spec.seed, spec.image_size, sample_seed, spec.pretext_drop, spec.pretext_detail)
        labels = torch.as_tensor(list(data["attributes"]), dtype=torch.long)
    else:
        per_class = max(1, int(spec.pretext_per_class * fraction))
        data = build_pretext(spec.pretext_classes, per_class, spec.seed, spec.image_size, sample_seed)
        labels = torch.as_tensor(list(data["label"]), dtype=torch.long)
    pixels = processor(images=list(data["image"]), return_tensors="pt")["pixel_values"]
    return [{"pixel_values": pixels[i], "labels": labels[i]} for i in range(len(labels))]


def pretrain(spec: BaseSpec, output_dir: Path, progress: bool = True) -> dict[str, float]:
    """Pre-train the base on the pretext task and `save_pretrained` it (with its processor) to `output_dir`."""
    torch.manual_seed(spec.seed)
    vision = CLIPVisionModelWithProjection(spec.vision_config())
    if spec.pretext == "attributes":
        model: nn.Module = AttributePretextModel(vision, DETAILS[spec.pretext_detail])
    elif spec.pretext == "recipes":
        model = CosinePretextModel(vision, spec.pretext_classes)
    else:
        raise ValueError(f"unknown pretext {spec.pretext!r}; expected 'attributes' or 'recipes'")
    train = _pixel_items(spec, 0, 1.0)
    held_out = _pixel_items(spec, 1, 1 / 6)
    with tempfile.TemporaryDirectory(prefix="saft-demo-pretrain-") as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            max_steps=spec.pretrain_steps,
            per_device_train_batch_size=spec.pretrain_batch_size,
            per_device_eval_batch_size=256,
            learning_rate=spec.pretrain_lr,
            weight_decay=0.05,
            warmup_steps=max(1, spec.pretrain_steps // 20),
            lr_scheduler_type="cosine",
            save_strategy="no",
            eval_strategy="no",
            logging_steps=max(1, spec.pretrain_steps // 5),
            report_to="none",
            seed=spec.seed,
            use_cpu=True,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            disable_tqdm=not progress,
        )
        trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=held_out)
        trainer.train()
        predictions = trainer.predict(held_out)
    accuracy = _held_out_accuracy(spec, predictions.predictions, predictions.label_ids)
    vision.save_pretrained(output_dir)
    image_processor(spec.image_size).save_pretrained(output_dir)
    info = {"pretext_held_out_accuracy": accuracy, "spec": asdict(spec), "version": BASE_FORMAT_VERSION}
    (output_dir / "pretext.json").write_text(json.dumps(info, indent=2))
    return {"pretext_held_out_accuracy": accuracy}


def _held_out_accuracy(spec: BaseSpec, logits: Any, labels: Any) -> float:
    """Recipes: top-1 accuracy; attributes: top-1 accuracy over every mentioned (attribute, scene) pair."""
    if spec.pretext != "attributes":
        return float((logits.argmax(-1) == labels).mean())
    correct = total = 0
    start = 0
    for column, size in enumerate(DETAILS[spec.pretext_detail].values()):
        mentioned = labels[:, column] != IGNORE
        predicted = logits[:, start : start + size].argmax(-1)
        correct += int((predicted[mentioned] == labels[mentioned, column]).sum())
        total += int(mentioned.sum())
        start += size
    return correct / max(total, 1)


def _is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in ("model.safetensors", "config.json", "pretext.json"))


def ensure_base(
    spec: BaseSpec, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> tuple[Path, bool]:
    """Path of the cached base for `spec`, pre-training it first if absent; returns (path, was_trained).

    Written to a temporary directory beside the target and renamed, so an interrupted run never
    leaves a half-written base that a later run would trust.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / f"base-{spec.cache_key()}"
    if _is_complete(target):
        logger.info("Reusing cached demo base model at %s", target)
        return target, False
    logger.info("Pre-training the demo base model (cached afterwards at %s)", target)
    # An incomplete leftover is replaced only once the new base is complete.
    with atomic_output_dir(target, overwrite=True) as staging:
        pretrain(spec, staging, progress=progress)
    return target, True


def load_base(path: str | os.PathLike) -> CLIPVisionModelWithProjection:
    """The cached base tower (safetensors, no remote code)."""
    return CLIPVisionModelWithProjection.from_pretrained(path, use_safetensors=True)
