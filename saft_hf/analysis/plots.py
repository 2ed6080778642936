"""PNG figures in the style of the SAFT paper: side-by-side heatmaps and per-block CTL curves.

Figures are drawn with the Agg backend (no display) and written to a temporary file that is then
renamed, so a half-written PNG never replaces a good one.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ..io_utils import atomic_file  # noqa: E402
from .defaults import DEFAULT_SEARCH_REGION  # noqa: F401  (re-exported)

# The square a task-arithmetic coefficient search covers (λ from 0.05 to 1); outlined on heatmaps.
PANEL_INCHES = 4.0
COLORBAR_INCHES = 1.0
DEFAULT_DPI = 100


def heatmap_figure_size(num_panels: int, dpi: int = DEFAULT_DPI) -> tuple[int, int]:
    """Pixel (width, height) of a heatmap figure with ``num_panels`` panels."""
    return round((PANEL_INCHES * num_panels + COLORBAR_INCHES) * dpi), round(PANEL_INCHES * dpi)


def plot_heatmaps(
    panels: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    alphas: Sequence[float],
    title: str,
    search_region: tuple[float, float] | None = DEFAULT_SEARCH_REGION,
    cmap: str = "viridis",
    dpi: int = DEFAULT_DPI,
    colorbar_label: str = "",
) -> Path:
    """One heatmap per label (values[i][j] at α₁=alphas[i], α₂=alphas[j]), one shared, labelled colour scale.

    The search region is outlined as a red square [lo, hi]², as in the papers' figures; a title too long
    for the figure is wrapped rather than cut off.
    """
    if not panels:
        raise ValueError("plot_heatmaps needs at least one panel (label -> grid of values).")
    grids = {label: np.asarray(values, dtype=float) for label, values in panels.items()}
    axis = np.asarray(alphas, dtype=float)
    for label, grid in grids.items():
        if grid.shape != (len(axis), len(axis)):
            raise ValueError(f"panel {label!r} has shape {grid.shape}, expected {(len(axis), len(axis))}.")
    vmin = min(float(np.nanmin(g)) for g in grids.values())
    vmax = max(float(np.nanmax(g)) for g in grids.values())
    width, height = heatmap_figure_size(len(grids), dpi)
    fig, axes = plt.subplots(
        1, len(grids), figsize=(width / dpi, height / dpi), dpi=dpi, squeeze=False, layout="constrained"
    )
    try:
        for ax, (label, grid) in zip(axes[0], grids.items()):
            # pcolormesh wants C[y, x]: rows are α₂, columns α₁.
            mesh = ax.pcolormesh(axis, axis, grid.T, shading="nearest", cmap=cmap, vmin=vmin, vmax=vmax)
            if search_region is not None:
                lo, hi = search_region
                ax.add_patch(Rectangle((lo, lo), hi - lo, hi - lo, fill=False, edgecolor="red", linewidth=1.5))
            ax.set(title=label, xlabel="α₁", aspect="equal")
        axes[0][0].set_ylabel("α₂")
        fig.suptitle(_wrapped(title, width / dpi))
        fig.colorbar(mesh, ax=list(axes[0]), shrink=0.8, label=colorbar_label)
        return _save_png(fig, path, dpi)
    finally:
        plt.close(fig)


def plot_ctl(
    curves: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    *,
    title: str = "Cross-task linearity (1 − cos, lower is more linear)",
    dpi: int = DEFAULT_DPI,
    figsize: tuple[float, float] = (6.0, 4.0),
) -> Path:
    """One line per label: the CTL gap of every block (x = block index, starting at 1)."""
    if not curves:
        raise ValueError("plot_ctl needs at least one curve (label -> per-block values).")
    fig, ax = plt.subplots(figsize=figsize, dpi=dpi, layout="constrained")
    try:
        for label, values in curves.items():
            ax.plot(range(1, len(values) + 1), values, marker="o", label=label)
        ax.set(title=_wrapped(title, figsize[0]), xlabel="block", ylabel="1 − cos similarity")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
        ax.grid(alpha=0.3)
        return _save_png(fig, path, dpi)
    finally:
        plt.close(fig)


def plot_coefficients(
    coefficients: Sequence[Sequence[float]],
    tasks: Sequence[str],
    blocks: Sequence[str],
    path: str | os.PathLike,
    *,
    title: str = "AdaMerging coefficients λ",
    dpi: int = DEFAULT_DPI,
) -> Path:
    """Heatmap of learned merging coefficients, tasks × blocks (AdaMerging, Yang et al. 2024, Fig. 3 style)."""
    grid = np.asarray(coefficients, dtype=float)
    if grid.shape != (len(tasks), len(blocks)):
        raise ValueError(f"coefficients have shape {grid.shape}, expected (tasks, blocks) = {(len(tasks), len(blocks))}.")
    width = min(max(4.0, 0.12 * len(blocks) + 2.5), 24.0)
    fig, ax = plt.subplots(figsize=(width, 1.0 + 0.45 * len(tasks)), dpi=dpi, layout="constrained")
    try:
        mesh = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_yticks(range(len(tasks)), labels=list(tasks))
        if len(blocks) == 1:
            ax.set_xticks([0], labels=list(blocks))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(title=title, xlabel="block (parameter tensor, in model order)" if len(blocks) > 1 else "")
        fig.colorbar(mesh, ax=ax, shrink=0.8)
        return _save_png(fig, path, dpi)
    finally:
        plt.close(fig)


def _wrapped(title: str, width_inches: float) -> str:
    """``title`` broken into lines that fit ``width_inches`` at the default title size (~9 characters/inch)."""
    return "\n".join(textwrap.wrap(title, width=max(20, int(width_inches * 9)))) or title


def _save_png(fig: plt.Figure, path: str | os.PathLike, dpi: int) -> Path:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)
