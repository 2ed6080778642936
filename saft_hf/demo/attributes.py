"""The calibrated base's pretext: procedural scenes described by coarse, partly missing attributes.

CLIP keeps many attributes of an image because its captions mention them; a classifier trained on
object identity alone learns to discard colour, place and size, and fine-tuning must then build those
features anew and moves far from the base (the regime the merging literature does not study). Here
each scene comes with a "caption" of seven coarse attributes — what the main object is, its hue, where
it is, how big, how it is oriented, how many objects there are, and the background's style — and each
attribute is left out of the caption with probability ``drop`` (a caption does not mention everything).
The evaluation tasks ask for finer versions of some attributes (8 hues, not 4; a 3×3 grid, not 4
quadrants), and for one (digits) the base never saw, as CLIP never saw labelled MNIST digits.
"""

from __future__ import annotations

import math

import numpy as np
from datasets import Dataset, Features, Sequence, Value
from datasets import Image as ImageFeature
from PIL import Image, ImageDraw

from . import primitives as P

KINDS = (*P.SHAPES, "bar", "patch")
PATCH_KINDS = ("stripes", "checks", "dots")
BACKGROUNDS = P.BACKGROUND_STYLES
# attribute -> number of values in a caption's vocabulary, for coarse and for detailed captions
COARSE: dict[str, int] = {
    "kind": len(KINDS),
    "hue": 4,  # red-yellow, green-cyan, blue, purple-pink
    "place": 4,  # quadrant of the main object
    "size": 2,  # small / large
    "orientation": 4,  # horizontal, diagonal, vertical, other diagonal (main object's angle mod 180°)
    "count": 3,  # one, two, three or more objects
    "background": len(BACKGROUNDS),
}
FINE: dict[str, int] = {
    "kind": len(KINDS),
    "hue": 8,  # eighths of the hue circle
    "place": 9,  # 3×3 grid cell of the main object
    "size": 4,  # radius quartiles of the main object's range
    "orientation": 8,  # 22.5° bins
    "count": 4,  # one, two, three, four or more
    "background": len(BACKGROUNDS),
}
DETAILS = {"coarse": COARSE, "fine": FINE}
ATTRIBUTES = COARSE  # the attribute names, in column order (the same for both details)
IGNORE = -100  # an attribute the caption does not mention (cross-entropy's ignore_index)


def _background(rng: np.random.Generator, style: int, size: int) -> Image.Image:
    base = P.hsv_colour(rng.random(), rng.uniform(0.0, 0.5), rng.uniform(0.05, 0.95))
    other = P.hsv_colour(rng.random(), rng.uniform(0.0, 0.5), rng.uniform(0.05, 0.95))
    return P.styled_background(rng, BACKGROUNDS[style], size, base, other)


def _hue_bin(hue: float) -> int:
    return int(((hue + 0.08) % 1.0) // 0.25)


def render_scene(rng: np.random.Generator, size: int, detail: str = "coarse") -> tuple[Image.Image, dict[str, int]]:
    """One random scene and its full description at ``detail`` (before any attribute is dropped)."""
    style = int(rng.integers(len(BACKGROUNDS)))
    s = P.SUPERSAMPLE * size
    image = _background(rng, style, s)
    draw = ImageDraw.Draw(image)
    count = int(rng.choice([1, 1, 2, 3, 4, 5]))
    objects = []
    for index in range(count):
        radius = rng.uniform(0.07, 0.3) if index == 0 else rng.uniform(0.05, 0.12)  # the first is the main object
        objects.append(
            {
                "kind": int(rng.integers(len(KINDS))),
                "hue": float(rng.random()),
                "x": float(rng.uniform(radius, 1 - radius)),
                "y": float(rng.uniform(radius, 1 - radius)),
                "radius": float(radius),
                "angle": float(rng.uniform(0, math.pi)),
            }
        )
    for item in reversed(objects):  # the main object is drawn last, on top
        colour = P.hsv_colour(item["hue"], rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
        x, y, r, angle = item["x"] * s, item["y"] * s, item["radius"] * s, item["angle"]
        kind = KINDS[item["kind"]]
        if kind == "bar":
            P.draw_bar(draw, x, y, 2.4 * r, max(2.0, 0.3 * r), angle, colour)
        elif kind == "patch":
            side = max(2, int(2 * r))
            mask = P.grating(side, PATCH_KINDS[int(rng.integers(3))], max(2.0, rng.uniform(0.2, 0.35) * side), rng.uniform(0, 6.3), angle)
            image.paste(Image.new("RGB", (side, side), colour), (int(x - r), int(y - r)), Image.fromarray((mask * 255).astype(np.uint8)))
        else:
            P.draw_shape(draw, kind, x, y, r, angle, colour)
    main = objects[0]
    if detail == "fine":
        radius_bin = min(3, int((main["radius"] - 0.07) / ((0.3 - 0.07) / 4)))
        labels = {
            "kind": main["kind"],
            "hue": int(((main["hue"] + 1 / 16) % 1.0) * 8),
            "place": min(2, int(main["x"] * 3)) + 3 * min(2, int(main["y"] * 3)),
            "size": radius_bin,
            "orientation": int(((main["angle"] + math.pi / 16) % math.pi) // (math.pi / 8)),
            "count": min(count, 4) - 1,
            "background": style,
        }
        return P.finish(image, size, rng), labels
    labels = {
        "kind": main["kind"],
        "hue": _hue_bin(main["hue"]),
        "place": int(main["x"] >= 0.5) + 2 * int(main["y"] >= 0.5),
        "size": int(main["radius"] >= 0.17),
        "orientation": int(((main["angle"] + math.pi / 8) % math.pi) // (math.pi / 4)),
        "count": min(count, 3) - 1,
        "background": style,
    }
    return P.finish(image, size, rng), labels


def build_attribute_pretext(
    n: int, seed: int, image_size: int = 32, sample_seed: int = 0, drop: float = 0.3, detail: str = "coarse"
) -> Dataset:
    """``n`` scenes with an ``attributes`` column (one value per ATTRIBUTES entry, IGNORE if dropped).

    ``detail`` picks the caption vocabulary: "coarse" (COARSE) or "fine" (FINE: finer bins, still not the
    evaluation tasks' classes, and never digits).
    """
    if n < 1 or not 0.0 <= drop < 1.0 or detail not in DETAILS:
        raise ValueError(f"need n >= 1 scenes, 0 <= drop < 1 and detail in {list(DETAILS)}, got {n=} {drop=} {detail=}")
    rng = np.random.default_rng([seed, sample_seed, 15485863])
    images, rows = [], []
    for _ in range(n):
        image, labels = render_scene(rng, image_size, detail)
        keep = rng.random(len(ATTRIBUTES)) >= drop
        images.append(image)
        rows.append([labels[name] if kept else IGNORE for name, kept in zip(ATTRIBUTES, keep)])
    features = Features({"image": ImageFeature(), "attributes": Sequence(Value("int64"))})
    return Dataset.from_dict({"image": images, "attributes": rows}, features=features)
