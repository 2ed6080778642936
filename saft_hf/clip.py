"""CLIP zero-shot heads and the image classifier SAFT fine-tunes (vision tower trains, head stays frozen).

Zero-shot head: Radford et al., "Learning Transferable Visual Models From Natural Language
Supervision" (2021), as used by Ilharco et al. (ICLR 2023): per class, encode every prompt template,
L2-normalise, average, L2-normalise again; logits = exp(logit_scale) · ⟨normalised image embedding, w_c⟩.
On disk a head is ``head.safetensors`` (``weight`` [num_classes, dim], ``logit_scale``) plus
``head_config.json`` (``class_names``, ``task``), the layout :class:`saft_hf.task_vectors.TaskVector` reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer, CLIPConfig, CLIPModel, CLIPVisionModelWithProjection
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils import logging as transformers_logging

from .io_utils import atomic_output_dir, atomic_save_file, atomic_write_json
from .readers import require_safetensors
from .tasks.registry import Template, fill_template

__all__ = [
    "HEAD_WEIGHTS_NAME",
    "HEAD_CONFIG_NAME",
    "VISION_SUBFOLDER",
    "ZeroShotHead",
    "build_zero_shot_head",
    "CLIPImageClassifier",
    "load_vision_tower",
    "collate_image_batch",
    "evaluate_accuracy",
    "load_task_vector_head",
    "load_clip_model",
]

HEAD_WEIGHTS_NAME = "head.safetensors"
HEAD_CONFIG_NAME = "head_config.json"
VISION_SUBFOLDER = "vision_model"


class ZeroShotHead(nn.Module):
    """Frozen linear head: rows are unit class embeddings; logits = scale · normalised input @ weightᵀ.

    ``weight`` and ``logit_scale`` are buffers, not parameters: no optimizer (nor weight decay) touches them.
    """

    def __init__(
        self, weight: Tensor, logit_scale: float | Tensor, classnames: Sequence[str] | None = None, task: str | None = None
    ) -> None:
        super().__init__()
        if weight.ndim != 2:
            raise ValueError(f"head weight must be [num_classes, dim], got shape {tuple(weight.shape)}.")
        if classnames is not None and len(classnames) != weight.shape[0]:
            raise ValueError(
                f"head has {weight.shape[0]} rows but {len(classnames)} class names were given; give one per class."
            )
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("logit_scale", torch.as_tensor(float(logit_scale), dtype=torch.float32))
        self.classnames = list(classnames) if classnames is not None else [str(i) for i in range(weight.shape[0])]
        self.task = task

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    @property
    def embed_dim(self) -> int:
        return self.weight.shape[1]

    def forward(self, image_embeds: Tensor) -> Tensor:
        features = F.normalize(image_embeds, dim=-1)
        weight, scale = (t.to(features.device, features.dtype) for t in (self.weight, self.logit_scale))
        return scale * features @ weight.t()  # follows the features' device, e.g. a tower moved to cuda

    @classmethod
    def from_prototypes(
        cls,
        prototypes: Tensor,
        classnames: Sequence[str] | None = None,
        logit_scale: float = 100.0,
        task: str | None = None,
    ) -> ZeroShotHead:
        """A head from given class prototypes [num_classes, dim] (rows are L2-normalised here)."""
        return cls(F.normalize(prototypes.detach().float(), dim=-1), logit_scale, classnames, task)

    def check_classnames(self, classnames: Sequence[str], what: str = "the task") -> None:
        """Raise if this head does not have one row per class of ``classnames``."""
        if len(classnames) != self.num_classes:
            raise ValueError(
                f"zero-shot head (task {self.task!r}) has {self.num_classes} classes but {what} has "
                f"{len(classnames)}; rebuild the head for this task (build_zero_shot_head) or load its own head."
            )

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``head.safetensors`` and ``head_config.json`` into ``save_directory`` (each atomically)."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_save_file(
            {"weight": self.weight, "logit_scale": self.logit_scale}, directory / HEAD_WEIGHTS_NAME, {"format": "pt"}
        )
        config = {"class_names": self.classnames, "task": self.task, "num_classes": self.num_classes}
        atomic_write_json(directory / HEAD_CONFIG_NAME, config)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> ZeroShotHead:
        """Load a head saved by :meth:`save_pretrained` (safetensors only)."""
        directory = Path(directory)
        weights = directory / HEAD_WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(
                f"{str(directory)!r} has no {HEAD_WEIGHTS_NAME}; build one with build_zero_shot_head(...) and "
                "save_pretrained(dir) first."
            )
        tensors = load_file(str(weights))
        missing = sorted({"weight", "logit_scale"} - set(tensors))
        if missing:
            raise ValueError(f"{weights} lacks tensors {missing}; it is not a saft-hf zero-shot head.")
        config_path = directory / HEAD_CONFIG_NAME
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        return cls(tensors["weight"], tensors["logit_scale"], config.get("class_names"), config.get("task"))


def load_task_vector_head(vector: Any, task: str, data_dir: str | os.PathLike | None = None) -> ZeroShotHead:
    """The zero-shot head saved beside a task vector, checked against ``task``'s class names."""
    from .tasks import resolve_task

    if vector.head_dir is None:
        raise FileNotFoundError(
            f"task vector {vector.source} has no head.safetensors; save it with its zero-shot head "
            "(TaskVector(..., head_dir=...) or ZeroShotHead.save_pretrained into the vector's folder)."
        )
    head = ZeroShotHead.from_pretrained(vector.head_dir).eval()
    head.check_classnames(resolve_task(task, data_dir).classnames, what=f"task {task!r}")
    return head


def _text_embeds(model: CLIPModel, tokens: Mapping[str, Tensor]) -> Tensor:
    out = model.get_text_features(**tokens)
    return out if isinstance(out, Tensor) else out.pooler_output  # transformers 5 returns a ModelOutput


def build_zero_shot_head(
    clip_model_or_path: CLIPModel | str | os.PathLike,
    tokenizer: Any | None,
    classnames: Sequence[str],
    templates: Sequence[Template],
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    task: str | None = None,
) -> ZeroShotHead:
    """Encode every (template, class) prompt with the CLIP text tower and average per class (no grad)."""
    if isinstance(clip_model_or_path, nn.Module):
        model = clip_model_or_path
        if tokenizer is None:
            raise ValueError("build_zero_shot_head got a model but no tokenizer; pass the model's CLIP tokenizer.")
    else:
        model = load_clip_model(clip_model_or_path)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(clip_model_or_path)
    if not classnames or not templates:
        raise ValueError(f"need class names and templates, got {len(classnames)} and {len(templates)}.")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    prompts = [fill_template(t, c) for c in classnames for t in templates]
    was_training = model.training
    model.eval()
    chunks = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            tokens = tokenizer(prompts[start : start + batch_size], padding=True, truncation=True, return_tensors="pt")
            embeds = _text_embeds(model, {k: v.to(device) for k, v in tokens.items()})
            chunks.append(F.normalize(embeds.float(), dim=-1).cpu())
        logit_scale = model.logit_scale.detach().float().exp().item()
    model.train(was_training)
    per_prompt = torch.cat(chunks).view(len(classnames), len(templates), -1)
    class_embeds = F.normalize(per_prompt.mean(dim=1), dim=-1)  # Radford et al. 2021, prompt ensembling
    return ZeroShotHead(class_embeds, logit_scale, classnames, task)


# ----------------------------------------------------------------------------- classifier
def _safetensors_only(path: str | os.PathLike, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``from_pretrained`` kwargs that never fall back to pickled weights; a local folder without them is refused."""
    if kwargs.get("use_safetensors") is False:
        raise ValueError("use_safetensors=False would read pickled weights; saft-hf reads safetensors only.")
    require_safetensors(path, kwargs.get("subfolder") or "")
    return {**kwargs, "use_safetensors": True}


def load_clip_model(model_name_or_path: str | os.PathLike, **kwargs: Any) -> CLIPModel:
    """A full ``CLIPModel`` (Hub id or folder) from safetensors only, never from pickled ``*.bin`` weights."""
    return CLIPModel.from_pretrained(model_name_or_path, **_safetensors_only(model_name_or_path, kwargs))


def load_vision_tower(model_name_or_path: str | os.PathLike, **kwargs: Any) -> CLIPVisionModelWithProjection:
    """``CLIPVisionModelWithProjection`` from a full CLIP checkpoint (Hub id or dir) or a vision-only one.

    For a full checkpoint the vision config gets the top-level ``projection_dim``, which the vision
    sub-config does not always carry. Weights are read from safetensors only.
    """
    return vision_tower_from(model_name_or_path, **_safetensors_only(model_name_or_path, kwargs))


def vision_tower_from(model_name_or_path: str | os.PathLike, **kwargs: Any) -> CLIPVisionModelWithProjection:
    """:func:`load_vision_tower` without the safetensors-only rule: for a *base* model that transformers reads
    (``use_safetensors=False`` goes through its ``weights_only`` loader); see :mod:`saft_hf.base_model`."""
    config_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
    config = AutoConfig.from_pretrained(model_name_or_path, **config_kwargs)
    if not isinstance(config, CLIPConfig):
        return CLIPVisionModelWithProjection.from_pretrained(model_name_or_path, **kwargs)
    vision_config = config.vision_config
    vision_config.projection_dim = config.projection_dim
    kwargs.setdefault("config", vision_config)
    # the text tower's weights are expected leftovers here: keep transformers' load report quiet
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        return CLIPVisionModelWithProjection.from_pretrained(model_name_or_path, **kwargs)
    finally:
        transformers_logging.set_verbosity(verbosity)


class CLIPImageClassifier(nn.Module):
    """CLIP vision tower + frozen zero-shot head; ``forward`` returns loss and logits as ``Trainer`` expects."""

    # The loss is a per-batch mean. Without this flag Trainer would pass num_items_in_batch and multiply
    # the loss by the number of processes, expecting the model to normalise by the global count.
    accepts_loss_kwargs = False

    def __init__(
        self, vision_model: CLIPVisionModelWithProjection, head: ZeroShotHead, normalizer: nn.Module | None = None
    ) -> None:
        """``normalizer`` (a ``saft_hf.tasks.PixelNormalizer``) turns uint8 ``pixel_values`` into the tower's
        input on the device, so workers hand over uint8; float ``pixel_values`` are used as they are."""
        super().__init__()
        projection_dim = vision_model.config.projection_dim
        if head.embed_dim != projection_dim:
            raise ValueError(
                f"head embeds in {head.embed_dim} dims but the vision tower projects to {projection_dim}; build the "
                "head with the same CLIP checkpoint as the vision tower."
            )
        self.vision_model = vision_model
        self.head = head
        self.normalizer = normalizer

    @property
    def config(self) -> Any:
        return self.vision_model.config

    @property
    def classnames(self) -> list[str]:
        return self.head.classnames

    def forward(self, pixel_values: Tensor, labels: Tensor | None = None) -> SequenceClassifierOutput:
        if pixel_values.dtype == torch.uint8:
            if self.normalizer is None:
                raise ValueError(
                    "got uint8 pixel_values but the classifier has no normalizer; build it with "
                    "CLIPImageClassifier(vision, head, PixelNormalizer.from_processor(image_processor))."
                )
            pixel_values = self.normalizer(pixel_values)
        image_embeds = self.vision_model(pixel_values=pixel_values).image_embeds
        logits = self.head(image_embeds)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)

    @classmethod
    def from_clip(cls, model_name_or_path: str | os.PathLike, head: ZeroShotHead, **kwargs: Any) -> CLIPImageClassifier:
        """Vision tower of a (full) CLIP checkpoint + a head."""
        return cls(load_vision_tower(model_name_or_path, **kwargs), head)

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """``vision_model/`` (HF format, safetensors) and the head files beside it; each swapped in atomically."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_output_dir(directory / VISION_SUBFOLDER, overwrite=True) as tmp:
            self.vision_model.save_pretrained(tmp)
        self.head.save_pretrained(directory)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **kwargs: Any) -> CLIPImageClassifier:
        """Load what :meth:`save_pretrained` wrote (kwargs go to the vision tower's ``from_pretrained``)."""
        directory = Path(directory)
        if not (directory / VISION_SUBFOLDER).is_dir():
            raise FileNotFoundError(
                f"{str(directory)!r} has no {VISION_SUBFOLDER}/; use CLIPImageClassifier.from_clip(model_id, head) "
                "for a CLIP checkpoint."
            )
        vision_path = directory / VISION_SUBFOLDER
        vision_model = CLIPVisionModelWithProjection.from_pretrained(vision_path, **_safetensors_only(vision_path, kwargs))
        return cls(vision_model, ZeroShotHead.from_pretrained(directory))


# ----------------------------------------------------------------------------- data + evaluation
def collate_image_batch(examples: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
    """Stack ``pixel_values`` and ``labels`` of preprocessed examples into one batch."""
    if examples and "pixel_values" not in examples[0]:
        raise KeyError(
            f"examples have keys {sorted(examples[0])}, not 'pixel_values'; attach the image transform with "
            "saft_hf.tasks.load_task(..., image_processor=...) or with_image_transform(dataset, processor)."
        )
    return {
        "pixel_values": torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples]),
        "labels": torch.as_tensor([int(e["labels"]) for e in examples], dtype=torch.long),
    }


def evaluate_accuracy(
    model: nn.Module,
    dataset: Any,
    batch_size: int = 128,
    device: str | torch.device | None = None,
    max_samples: int | None = None,
    progress: bool = True,
    num_workers: int = 0,
) -> float:
    """Top-1 accuracy of ``model`` (returns ``.logits``) on a dataset yielding pixel_values/labels; no grad."""
    from .metrics import load_accuracy

    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    if len(dataset) == 0:
        raise ValueError("cannot evaluate accuracy on an empty dataset.")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, collate_fn=collate_image_batch, num_workers=num_workers
    )
    metric = load_accuracy()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(loader, desc="accuracy", disable=not progress):
                logits = model(pixel_values=batch["pixel_values"].to(device)).logits
                metric.add_batch(predictions=logits.argmax(dim=-1).cpu(), references=batch["labels"])
    finally:
        model.train(was_training)
    return float(metric.compute()["accuracy"])
