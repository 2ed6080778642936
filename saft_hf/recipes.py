"""Fine-tuning recipes: the SAFT paper's *text* (the default) and its released *code* (``authors-code``).

``paper-text``: what Sec. 5 of the paper says — AdamW lr 1e-5, batch 128, 8,000 steps, cosine with 500
warm-up steps, weight decay 0.1, clipping 1.0, "ASAM's default hyper-parameters" (ASAM ρ = 0.5, η = 0.01,
T = |w| + η on weights only), in the Trainer's clean loop, the last checkpoint.

``authors-code``: what BAIKLAB/SAFT-Merge ``sgd_saft/src/finetune.py`` and ``sam.py`` run — the same
optimiser settings, plus Q1 gradients never zeroed, Q2 the descent gradient not clipped, Q4 weight decay on
every parameter (``sam_loop="authors"``), Q3 ASAM η = 0 on every parameter, Q5 training images through
RandomResizedCrop(224, scale (0.9, 1.0), bicubic), Q6 validation every epoch with the best checkpoint kept
beside the last, Q8 per-dataset epochs at batch 128 on train-minus-validation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from PIL import Image

RECIPES = ("paper-text", "authors-code")

# Q8: finetune.py's epochs (4x Ilharco et al.'s) at batch 128, on the train split minus its validation part.
AUTHORS_EPOCHS: dict[str, int] = {
    "Cars": 140, "DTD": 304, "EuroSAT": 48, "GTSRB": 44, "MNIST": 20, "RESISC45": 60, "SUN397": 56, "SVHN": 16,
}  # fmt: skip

# SAMTrainingArguments values each recipe sets (the command line still overrides each one).
RECIPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "paper-text": {"sam_eta": 0.01, "sam_adaptive_scope": "weights", "sam_loop": "clean"},
    "authors-code": {
        "sam_eta": 0.0,  # Q3: their sam.py scales by |w| with no eta ...
        "sam_adaptive_scope": "all",  # ... on every parameter
        "sam_loop": "authors",  # Q1, Q2, Q4
        "max_steps": -1,  # Q8: epochs per dataset instead (AUTHORS_EPOCHS)
        "eval_strategy": "epoch",  # Q6: validation accuracy after every epoch
    },
}


def recipe_summary(recipe: str) -> str:
    """One line naming what a recipe follows, for provenance, cards and logs."""
    if recipe == "authors-code":
        return ("authors-code: the SAFT paper's released code (BAIKLAB/SAFT-Merge finetune.py): ASAM eta=0 on every "
                "parameter, gradients never zeroed, descent not clipped, decay on all, RandomResizedCrop, "
                "best-on-validation kept beside last, per-dataset epochs")  # fmt: skip
    return "paper-text: the SAFT paper's text (ASAM eta=0.01 on weights, the Trainer's clean loop, last checkpoint)"


def _crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (left, top, w, h): torchvision's sampling, with torch's RNG (10 tries, then centre)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,)).item())
            left = int(torch.randint(0, width - w + 1, size=(1,)).item())
            return left, top, w, h
    in_ratio = width / height  # fallback: the largest centred crop within the ratio range
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _decoded(value: Any) -> Image.Image:
    """A PIL image from a decoded column, or from a stored one (``{"bytes", "path"}``, as the uint8 input path
    leaves the image column undecoded for its workers)."""
    if isinstance(value, dict):
        from datasets import Image as ImageFeature

        from .tasks.loading import decode_image

        return decode_image(value, ImageFeature())
    return value


class RandomResizedCropTransform:
    """Q5: open_clip's training preprocess — RandomResizedCrop(size, scale (0.9, 1.0), bicubic), RGB, normalise.

    A batch transform like ``tasks.ImageTransform`` (``pixel_values``, ``labels``); the normalisation is the
    CLIP image processor's, with its resize and centre crop switched off.
    """

    def __init__(
        self,
        image_processor: Any,
        image_column: str = "image",
        label_column: str = "label",
        scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        crop = getattr(image_processor, "crop_size", None)
        height = crop.get("height") if hasattr(crop, "get") else getattr(crop, "height", crop)
        self.size = int(height) if height is not None else 224
        self.image_processor, self.image_column, self.label_column = image_processor, image_column, label_column
        self.scale, self.ratio = scale, ratio

    def crop(self, image: Image.Image) -> Image.Image:
        left, top, w, h = _crop_box(image.width, image.height, self.scale, self.ratio)
        return image.resize((self.size, self.size), Image.BICUBIC, box=(left, top, left + w, top + h))

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, torch.Tensor]:
        images = [self.crop(_decoded(image).convert("RGB")) for image in batch[self.image_column]]
        pixels = self.image_processor(images=images, return_tensors="pt", do_resize=False, do_center_crop=False)
        return {
            "pixel_values": pixels["pixel_values"],
            "labels": torch.as_tensor(batch[self.label_column], dtype=torch.long),
        }
