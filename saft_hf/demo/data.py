"""The demo's eight small image-classification tasks, built offline and deterministically per seed.

Each task is a `datasets.DatasetDict` with train/validation/test splits and `image` (PIL) and
`label` (ClassLabel) columns, so it flows through the same code paths as the real tasks.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features
from datasets import Image as ImageFeature
from PIL import Image, ImageDraw

from . import primitives as P
from .spec import TASK_NAMES

SPLITS = ("train", "validation", "test")

# (rng, label, image size, split, background style) -> image
Renderer = Callable[[np.random.Generator, int, int, str, str], Image.Image]


@dataclass(frozen=True)
class DemoTask:
    """One procedurally generated task: its class names, how to draw a class, and its input domain.

    ``domain`` is the background style (primitives.BACKGROUND_STYLES) of the task's images when tasks
    have distinct domains, as the real merging tasks do; with shared domains every task uses "plain".
    """

    name: str
    classes: tuple[str, ...]
    render: Renderer
    domain: str = "plain"


def _canvas(
    rng: np.random.Generator, size: int, bg: P.Colour, style: str
) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """A supersampled canvas of colour ``bg`` in the task's background style (the style varies ``bg`` a little)."""
    side = P.SUPERSAMPLE * size
    period = 1 / 3 if style == "grid" else None  # the positions task's grid is its 3×3 cells
    image = P.styled_background(rng, style, side, bg, P.shade(bg, rng), period)
    return image, ImageDraw.Draw(image)


def _background(rng: np.random.Generator) -> P.Colour:
    return P.hsv_colour(rng.random(), rng.uniform(0.0, 0.4), rng.uniform(0.05, 0.95))


@lru_cache(maxsize=1)
def _digit_pools() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """sklearn's 8x8 digits (shipped with scikit-learn), split once so no image is in two splits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    cut1, cut2 = int(0.6 * len(order)), int(0.75 * len(order))
    parts = {"train": order[:cut1], "validation": order[cut1:cut2], "test": order[cut2:]}
    return {split: (digits.images[idx] / 16.0, digits.target[idx]) for split, idx in parts.items()}


def _render_digit(
    rng: np.random.Generator, label: int, size: int, split: str, style: str = "plain"
) -> Image.Image:
    images, targets = _digit_pools()[split]
    glyph = images[rng.choice(np.flatnonzero(targets == label))]
    side = int(rng.integers(int(size * 0.75), size + 1))
    glyph = np.asarray(Image.fromarray((glyph * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR))
    mask = np.zeros((size, size), dtype=np.float32)
    x0, y0 = rng.integers(0, size - side + 1, size=2)
    mask[y0 : y0 + side, x0 : x0 + side] = glyph / 255.0
    fg, bg = P.contrasting_pair(rng, light_on_dark=True)  # as the glyphs are drawn: form is the task
    return P.finish(P.blend(mask, fg, bg), size, rng)


def _centre(rng: np.random.Generator, size: int, radius: float) -> tuple[float, float]:
    margin = min(radius + 1, size / 2)
    return float(rng.uniform(margin, size - margin)), float(rng.uniform(margin, size - margin))


def _render_shape(
    rng: np.random.Generator, label: int, size: int, split: str, style: str = "plain"
) -> Image.Image:
    fg, bg = P.contrasting_pair(rng, light_on_dark=True)
    image, draw = _canvas(rng, size, bg, style)
    radius = rng.uniform(0.25, 0.33) * size
    cx, cy = (size / 2 + rng.uniform(-0.1, 0.1) * size for _ in range(2))
    s = P.SUPERSAMPLE
    P.draw_shape(draw, P.SHAPES[label], cx * s, cy * s, radius * s, rng.uniform(0, 2 * math.pi), fg)
    return P.finish(image, size, rng)


TEXTURES = ("stripes", "checks", "dots", "noise", "gradient", "rings")


def _render_texture(
    rng: np.random.Generator, label: int, size: int, split: str, style: str = "plain"
) -> Image.Image:
    kind = TEXTURES[label]
    period = rng.uniform(4.0, 9.0)
    phase = rng.uniform(0, 2 * math.pi)
    if kind in ("stripes", "checks", "dots"):
        mask = P.grating(size, kind, period, phase, angle=rng.uniform(0, math.pi))
    elif kind == "noise":
        cells = int(rng.integers(4, 9))
        coarse = (rng.random((cells, cells)) > 0.5).astype(np.uint8) * 255
        mask = np.asarray(Image.fromarray(coarse).resize((size, size), Image.NEAREST)) / 255.0
    elif kind == "gradient":
        y, x = np.mgrid[0:size, 0:size] / (size - 1)
        theta = rng.uniform(0, 2 * math.pi)
        u = x * math.cos(theta) + y * math.sin(theta)
        mask = (u - u.min()) / (u.max() - u.min())
    else:  # rings
        y, x = np.mgrid[0:size, 0:size].astype(np.float32)
        cx, cy = rng.uniform(0, size, size=2)
        mask = (np.sin(2 * math.pi * np.hypot(x - cx, y - cy) / period + phase) > 0).astype(np.float32)
    fg, bg = P.contrasting_pair(rng)
    return P.finish(P.blend(mask.astype(np.float32), fg, bg), size, rng)


HUES = {
    "red": 0.0,
    "orange": 0.08,
    "yellow": 0.16,
    "green": 0.33,
    "cyan": 0.5,
    "blue": 0.64,
    "purple": 0.77,
    "pink": 0.9,
}


def _render_colour(
    rng: np.random.Generator, label: int, size: int, split: str, style: str = "plain"
) -> Image.Image:
    hue = list(HUES.values())[label] + rng.uniform(-0.025, 0.025)
    colour = P.hsv_colour(hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
    grey = int(rng.uniform(20, 235))
    image, draw = _canvas(rng, size, (grey, grey, grey), style)
    radius = rng.uniform(0.15, 0.3) * size
    cx, cy = _centre(rng, size, radius * 1.2)
    s = P.SUPERSAMPLE
    kind = P.SHAPES[int(rng.integers(len(P.SHAPES)))]
    P.draw_shape(draw, kind, cx * s, cy * s, radius * s, rng.uniform(0, 2 * math.pi), colour)
    return P.finish(image, size, rng)


def _render_count(
    rng: np.random.Generator, label: int, size: int, split: str, style: str = "plain"
) -> Image.Image:
    fg, bg = P.contrasting_pair(rng)
    image, draw = _canvas(rng, size, bg, style)
    radius = rng.uniform(0.06, 0.09) * size
    placed: list[tuple[float, float]] = []
    while len(placed) < label + 1:  # rejection sampling: dots never touch, so the count is visible
        cx, cy = _centre(rng, size, radius)
        if all(math.hypot(cx - px, cy - py) > 2.6 * radius for px, py in placed):
            placed.append((cx, cy))
    s = P.SUPERSAMPLE
    for cx, cy in placed:
        P.draw_shape(draw, "circle", cx * s, cy * s, radius * s, 0.0, fg)
    return P.finish(image, size, rng)


def _render_orientation(
    rng: np.random.Generator, label: int, size: int, split: str, style: str = "plain"
) -> Image.Image:
    fg, bg = P.contrasting_pair(rng)
    image, draw = _canvas(rng, size, bg, style)
    angle = math.radians(label * 22.5 + rng.uniform(-5, 5))
    length = rng.uniform(0.5, 0.8) * size
    cx, cy = (size / 2 + rng.uniform(-0.12, 0.12) * size for _ in range(2))
    s = P.SUPERSAMPLE
    P.draw_bar(draw, cx * s, cy * s, length * s, rng.uniform(2, 4) * s, angle, fg)
    return P.finish(image, size, rng)


def _render_position(
    rng: np.random.Generator, label: int, size: int, split: str, style: str = "plain"
) -> Image.Image:
    fg, bg = P.contrasting_pair(rng)
    image, draw = _canvas(rng, size, bg, style)
    row, col = divmod(label, 3)
    cell = size / 3
    cx = (col + 0.5) * cell + rng.uniform(-0.12, 0.12) * cell
    cy = (row + 0.5) * cell + rng.uniform(-0.12, 0.12) * cell
    radius = rng.uniform(0.22, 0.3) * cell
    s = P.SUPERSAMPLE
    kind = P.SHAPES[int(rng.integers(len(P.SHAPES)))]
    P.draw_shape(draw, kind, cx * s, cy * s, radius * s, rng.uniform(0, 2 * math.pi), fg)
    return P.finish(image, size, rng)


SIZE_BINS = ((0.08, 0.11), (0.16, 0.2), (0.26, 0.3), (0.36, 0.42))


def _render_size(
    rng: np.random.Generator, label: int, size: int, split: str, style: str = "plain"
) -> Image.Image:
    fg, bg = P.contrasting_pair(rng)
    image, draw = _canvas(rng, size, bg, style)
    radius = rng.uniform(*SIZE_BINS[label]) * size
    cx, cy = _centre(rng, size, radius)
    s = P.SUPERSAMPLE
    P.draw_shape(draw, "circle" if rng.random() < 0.5 else "square", cx * s, cy * s, radius * s, 0.0, fg)
    return P.finish(image, size, rng)


TASKS: dict[str, DemoTask] = {
    task.name: task
    for task in (
        DemoTask("digits", tuple(str(d) for d in range(10)), _render_digit),
        DemoTask("shapes", P.SHAPES, _render_shape, "frame"),
        DemoTask("textures", TEXTURES, _render_texture),
        DemoTask("colours", tuple(HUES), _render_colour),
        DemoTask("counts", ("one", "two", "three", "four", "five"), _render_count, "noise"),
        DemoTask(
            "orientations", tuple(f"{k * 22.5:g} degrees" for k in range(8)), _render_orientation, "gradient"
        ),
        DemoTask(
            "positions",
            tuple(f"{r}-{c}" for r in ("top", "middle", "bottom") for c in ("left", "centre", "right")),
            _render_position,
            "grid",
        ),
        DemoTask("sizes", ("tiny", "small", "large", "huge"), _render_size),
    )
}
if tuple(TASKS) != TASK_NAMES:  # the light list the CLI validates with must match
    raise RuntimeError(f"demo task list out of sync: {tuple(TASKS)} vs {TASK_NAMES}")


def _split_seed(task: str, seed: int, split: str) -> list[int]:
    # crc32, not hash(): Python salts str hashes per process, which would break determinism.
    return [seed, zlib.crc32(task.encode()), SPLITS.index(split)]


def build_split(
    task: str, split: str, n: int, seed: int = 0, image_size: int = 32, distinct_domains: bool = True
) -> Dataset:
    """`n` class-balanced examples of `task`'s `split`, the same for the same seed.

    ``distinct_domains`` draws the task's images on its own background style (see DemoTask.domain).
    """
    if task not in TASKS:
        raise ValueError(f"unknown demo task {task!r}; choose from {', '.join(TASK_NAMES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    if n < 1:
        raise ValueError(f"need at least one example per split, got n={n}; pass a positive size")
    spec = TASKS[task]
    rng = np.random.default_rng(_split_seed(task, seed, split))
    labels = rng.permutation(np.arange(n) % len(spec.classes))
    style = spec.domain if distinct_domains else "plain"
    images = [spec.render(rng, int(label), image_size, split, style) for label in labels]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=list(spec.classes))})
    return Dataset.from_dict({"image": images, "label": labels.tolist()}, features=features)


def build_task(
    task: str,
    seed: int = 0,
    n_train: int = 400,
    n_validation: int = 100,
    n_test: int = 300,
    image_size: int = 32,
    distinct_domains: bool = True,
) -> DatasetDict:
    """A task's train/validation/test splits (PIL `image`, ClassLabel `label`), deterministic per seed."""
    sizes = {"train": n_train, "validation": n_validation, "test": n_test}
    return DatasetDict(
        {split: build_split(task, split, n, seed, image_size, distinct_domains) for split, n in sizes.items()}
    )
