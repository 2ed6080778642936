"""Drawing primitives for the demo's procedurally generated images (PIL, numpy RNG only).

Images are drawn at twice the output size and downsampled, so small shapes keep smooth edges.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image, ImageDraw

Colour = tuple[int, int, int]

SHAPES = ("circle", "square", "triangle", "cross", "star", "hexagon")
SUPERSAMPLE = 2


def hsv_colour(hue: float, saturation: float = 0.85, value: float = 0.9) -> Colour:
    """RGB bytes of an HSV colour (hue in [0, 1))."""
    r, g, b = colorsys.hsv_to_rgb(hue % 1.0, saturation, value)
    return (int(r * 255), int(g * 255), int(b * 255))


def random_colour(rng: np.random.Generator) -> Colour:
    """A saturated colour of any hue."""
    return hsv_colour(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.6, 1.0))


def contrasting_pair(rng: np.random.Generator, light_on_dark: bool = False) -> tuple[Colour, Colour]:
    """A (foreground, background) pair that stays visible: light on dark, or (by chance) dark on light."""
    light = hsv_colour(rng.random(), rng.uniform(0.2, 1.0), rng.uniform(0.75, 1.0))
    dark = hsv_colour(rng.random(), rng.uniform(0.2, 1.0), rng.uniform(0.05, 0.35))
    return (light, dark) if light_on_dark or rng.random() < 0.5 else (dark, light)


BACKGROUND_STYLES = ("plain", "gradient", "noise", "grid", "frame")


def styled_background(
    rng: np.random.Generator, style: str, side: int, base: Colour, other: Colour, period: float | None = None
) -> Image.Image:
    """A ``side``-pixel background mixing two colours in one of BACKGROUND_STYLES.

    The styles give the demo's tasks (and the base's pretext scenes) distinct input domains, as the real
    merging tasks have (satellite images, road signs, house numbers ... are told apart at a glance).
    ``period`` fixes the grid's cell size as a fraction of the side (random when None).
    """
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / max(side - 1, 1)
    if style == "plain":
        mix = np.zeros((side, side), np.float32)
    elif style == "gradient":
        theta = rng.uniform(0, 2 * math.pi)
        u = x * math.cos(theta) + y * math.sin(theta)
        mix = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
    elif style == "noise":
        cells = int(rng.integers(3, 8))
        coarse = (rng.random((cells, cells)) * 255).astype(np.uint8)
        mix = np.asarray(Image.fromarray(coarse).resize((side, side), Image.BILINEAR), np.float32) / 255.0
    elif style == "grid":
        cell = period if period is not None else rng.uniform(0.15, 0.3)
        near = lambda u: np.abs(((u / cell) + 0.5) % 1 - 0.5) * cell < 0.025  # noqa: E731
        mix = (near(x) | near(y)).astype(np.float32)
    elif style == "frame":
        width = rng.uniform(0.08, 0.14)
        mix = ((np.minimum(x, 1 - x) < width) | (np.minimum(y, 1 - y) < width)).astype(np.float32)
    else:
        raise ValueError(f"unknown background style {style!r}; expected one of {BACKGROUND_STYLES}")
    pixels = np.asarray(base, np.float32) * (1 - mix[..., None]) + np.asarray(other, np.float32) * mix[..., None]
    return Image.fromarray(pixels.astype(np.uint8))


def shade(colour: Colour, rng: np.random.Generator, amount: float = 80.0) -> Colour:
    """A nearby colour (each channel moved by up to ±amount), for backgrounds that stay behind the object."""
    return tuple(int(np.clip(c + rng.uniform(-amount, amount), 0, 255)) for c in colour)  # type: ignore[return-value]


def canvas(size: int, background: Colour) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """A supersampled RGB canvas and its drawing context."""
    image = Image.new("RGB", (size * SUPERSAMPLE, size * SUPERSAMPLE), background)
    return image, ImageDraw.Draw(image)


def finish(image: Image.Image, size: int, rng: np.random.Generator, noise: float = 8.0) -> Image.Image:
    """Downsample to `size` and add a little pixel noise, so no class is one exact template."""
    small = np.asarray(image.resize((size, size), Image.Resampling.LANCZOS), dtype=np.float32)
    small = small + rng.normal(0.0, noise, small.shape)
    return Image.fromarray(np.clip(small, 0, 255).astype(np.uint8))


def polygon(cx: float, cy: float, radius: float, sides: int, angle: float) -> list[tuple[float, float]]:
    """Vertices of a regular polygon (angle in radians)."""
    return [
        (cx + radius * math.cos(angle + 2 * math.pi * k / sides), cy + radius * math.sin(angle + 2 * math.pi * k / sides))
        for k in range(sides)
    ]


def draw_shape(
    draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, radius: float, angle: float, colour: Colour
) -> None:
    """Draw a filled shape of `kind` (one of SHAPES) in canvas pixels."""
    if kind == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    elif kind == "square":
        draw.polygon(polygon(cx, cy, radius * 1.2, 4, angle + math.pi / 4), fill=colour)
    elif kind == "triangle":
        draw.polygon(polygon(cx, cy, radius * 1.25, 3, angle - math.pi / 2), fill=colour)
    elif kind == "hexagon":
        draw.polygon(polygon(cx, cy, radius * 1.1, 6, angle), fill=colour)
    elif kind == "star":
        outer = polygon(cx, cy, radius * 1.3, 5, angle - math.pi / 2)
        inner = polygon(cx, cy, radius * 0.5, 5, angle - math.pi / 2 + math.pi / 5)
        draw.polygon([p for pair in zip(outer, inner) for p in pair], fill=colour)
    elif kind == "cross":
        width = max(2.0, radius * 0.7)
        for theta in (angle, angle + math.pi / 2):
            dx, dy = math.cos(theta) * radius * 1.2, math.sin(theta) * radius * 1.2
            draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=colour, width=int(width))
    else:
        raise ValueError(f"unknown shape {kind!r}; expected one of {SHAPES}")


def draw_bar(
    draw: ImageDraw.ImageDraw, cx: float, cy: float, length: float, width: float, angle: float, colour: Colour
) -> None:
    """Draw a straight bar centred at (cx, cy) with the given orientation (radians)."""
    dx, dy = math.cos(angle) * length / 2, math.sin(angle) * length / 2
    draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=colour, width=max(1, int(width)))


def grating(size: int, kind: str, period: float, phase: float, angle: float = 0.0) -> np.ndarray:
    """A [size, size] mask in {0, 1} for a periodic texture: stripes, checks or dots."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == "stripes":
        u = x * math.cos(angle) + y * math.sin(angle)
        return (np.sin(2 * math.pi * u / period + phase) > 0).astype(np.float32)
    if kind == "checks":
        return ((np.floor((x + phase) / period) + np.floor((y + phase) / period)) % 2).astype(np.float32)
    if kind == "dots":
        cx = (x + phase) % period - period / 2
        cy = (y + phase) % period - period / 2
        return ((cx**2 + cy**2) < (period / 3.2) ** 2).astype(np.float32)
    raise ValueError(f"unknown grating {kind!r}; expected 'stripes', 'checks' or 'dots'")


def blend(mask: np.ndarray, foreground: Colour, background: Colour) -> Image.Image:
    """An RGB image that is `foreground` where mask is 1 and `background` where it is 0."""
    fg = np.asarray(foreground, dtype=np.float32)
    bg = np.asarray(background, dtype=np.float32)
    pixels = mask[..., None] * fg + (1.0 - mask[..., None]) * bg
    return Image.fromarray(pixels.astype(np.uint8))
