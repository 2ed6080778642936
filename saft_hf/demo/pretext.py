"""The pretext task the demo's base model is pre-trained on: many classes of mixed primitives.

Each class is a fixed random "recipe" of two primitives (a shape, a bar or a textured patch, each with
its own place, size and angle); examples jitter every parameter and draw random colours. No evaluation task is a pretext
class: the base learns generic features of colour, form, place and texture, as CLIP learns them from
web data, and the evaluation tasks then ask for one factor at a time.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature
from PIL import Image

from . import primitives as P

PRIMITIVES = ("shape", "bar", "patch")
PATCH_KINDS = ("stripes", "checks", "dots")


def make_recipes(num_classes: int, seed: int) -> list[list[dict[str, Any]]]:
    """`num_classes` recipes, each a list of two primitives with their mean parameters."""
    rng = np.random.default_rng([seed, 7919])
    recipes = []
    for _ in range(num_classes):
        items = []
        for _ in range(2):
            items.append(
                {
                    "kind": PRIMITIVES[int(rng.integers(len(PRIMITIVES)))],
                    "shape": P.SHAPES[int(rng.integers(len(P.SHAPES)))],
                    "patch": PATCH_KINDS[int(rng.integers(len(PATCH_KINDS)))],
                    "x": float(rng.uniform(0.25, 0.75)),
                    "y": float(rng.uniform(0.25, 0.75)),
                    "scale": float(rng.uniform(0.12, 0.3)),
                    "angle": float(rng.uniform(0, math.pi)),
                }
            )
        recipes.append(items)
    return recipes


def render(recipe: list[dict[str, Any]], rng: np.random.Generator, size: int) -> Image.Image:
    """One jittered example of a recipe."""
    # The background is random per example, so a class cannot be told by its overall colour.
    background = P.hsv_colour(rng.random(), rng.uniform(0.0, 0.4), rng.uniform(0.05, 0.95))
    image, draw = P.canvas(size, background)
    s = P.SUPERSAMPLE * size
    for item in recipe:
        # Colours are random per example too: a class is told by form and layout, so the base learns them.
        colour = P.random_colour(rng)
        x, y = (item["x"] + rng.normal(0, 0.08)) * s, (item["y"] + rng.normal(0, 0.08)) * s
        scale = item["scale"] * rng.uniform(0.8, 1.25) * s
        angle = item["angle"] + rng.normal(0, 0.25)
        if item["kind"] == "shape":
            P.draw_shape(draw, item["shape"], x, y, scale, angle, colour)
        elif item["kind"] == "bar":
            P.draw_bar(draw, x, y, 2.5 * scale, 0.25 * scale, angle, colour)
        else:
            side = int(2 * scale)
            mask = P.grating(side, item["patch"], rng.uniform(0.2, 0.35) * side, rng.uniform(0, 6.3), angle)
            patch = Image.fromarray((mask * 255).astype(np.uint8))
            image.paste(Image.new("RGB", (side, side), colour), (int(x - scale), int(y - scale)), patch)
    return P.finish(image, size, rng)


def build_pretext(
    num_classes: int, per_class: int, seed: int, image_size: int = 32, sample_seed: int = 0
) -> Dataset:
    """A class-balanced pretext set (`image`, `label`): recipes fixed by `seed`, examples by `sample_seed`."""
    if num_classes < 2 or per_class < 1:
        raise ValueError(
            f"pretext task needs >= 2 classes and >= 1 example per class, got {num_classes=} {per_class=}"
        )
    recipes = make_recipes(num_classes, seed)
    rng = np.random.default_rng([seed, sample_seed, 104729])
    labels = rng.permutation(np.arange(num_classes * per_class) % num_classes)
    images = [render(recipes[label], rng, image_size) for label in labels]
    features = Features({"image": ImageFeature(), "label": ClassLabel(num_classes=num_classes)})
    return Dataset.from_dict({"image": images, "label": labels.tolist()}, features=features)
