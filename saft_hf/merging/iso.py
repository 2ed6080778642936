"""Iso-C and Iso-CTS (Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging with Common
and Task-Specific Subspaces", ICML).

Iso-C:   Δ = Σ_i Δ_i = U Σ Vᵀ,   merged = α · σ̄ U Vᵀ,   σ̄ = mean of the r = min(m, n) singular values.
Iso-CTS: the top c components of Σ_i Δ_i (common subspace) plus, per task, the top s components of
         Δ_i − U_c U_cᵀ Δ_i (task-specific), U and V each orthogonalised (Procrustes), every singular
         value replaced by their mean: merged = α · σ̄ U⊥ V⊥ᵀ.
Follows the authors' code (``iso_c`` / ``iso_cts`` in github.com/danielm1405/iso-merging):
  - non-matrix parameters (and ``text_projection``) are the *mean* of the task vectors, × α;
  - c = r − round((r − ⌊r · share⌋) / T) · T with Python's round (ties to even), s = (r − c) / T, so
    the task-specific part divides evenly among the tasks; if that rounding would overshoot r,
    we round down instead (the code would then index with a negative c);
  - σ̄ is the mean over all r singular values, zeros included;
  - every 2-D tensor is a matrix, embeddings included (see ``is_task_matrix``);
  - their open_clip attention has one in_proj_weight: ``qkv="stacked"`` reproduces that on HF CLIP's
    separate q/k/v (the default, ``"separate"``, decomposes each, as FusionBench's HF port).
One addition: directions past a matrix's numerical rank are dropped (see ``numerical_rank``); the
code gives those arbitrary null-space directions the weight σ̄.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from .registry import MethodParam, check_fraction, register_method, scaling_param
from .subspaces import (
    layer_mean,
    merge_per_layer,
    numerical_rank,
    qkv_param,
    rebuild_decorrelated,
    thin_svd,
    top_components,
)
from .tsv import SUBSPACE_GRID


def isotropic_common_merge(matrices: Sequence[Tensor]) -> Tensor:
    """Iso-C of one layer: σ̄ U Vᵀ of the summed task matrices (α = 1)."""
    total = layer_mean(matrices).mul_(len(matrices))
    u, s, vh = thin_svd(total)
    keep = numerical_rank(s, total.shape)
    return (u[:, :keep] * s.mean()) @ vh[:keep]


def subspace_sizes(rank: int, n_tasks: int, common_share: float) -> tuple[int, int]:
    """(c, s): common-subspace size and per-task size, with c + T·s = r as in the authors' code."""
    common = int(rank * common_share)
    task_total = round((rank - common) / n_tasks) * n_tasks
    if task_total > rank:
        task_total -= n_tasks
    return rank - task_total, task_total // n_tasks


def isotropic_common_task_specific_merge(matrices: Sequence[Tensor], common_share: float) -> Tensor:
    """Iso-CTS of one layer: common + task-specific subspaces, orthogonalised, flat spectrum (α = 1)."""
    rows, cols = matrices[0].shape
    rank = min(rows, cols)
    common, per_task = subspace_sizes(rank, len(matrices), common_share)
    u_common, s_common, vh_common = top_components(layer_mean(matrices).mul_(len(matrices)), common)
    # each task's top components outside the common subspace, then the common ones
    specific = [top_components(m - u_common @ (u_common.T @ m), per_task) for m in matrices]
    return rebuild_decorrelated([*specific, (u_common, s_common, vh_common)], (rows, cols), isotropic_rank=rank)


@register_method(
    "iso_c",
    params=[qkv_param(), scaling_param(1.0)],
    paper="Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and "
    "Task-Specific Subspaces (ICML)",
    summary="per matrix: the summed task matrix with a flat spectrum (σ̄ U Vᵀ) × α; other parameters "
    "averaged × α; search α",
    grid=SUBSPACE_GRID,
)
def iso_c(
    vectors: Sequence[Mapping[str, Tensor]], *, qkv: str = "separate", scaling: float = 1.0, progress: bool = False
) -> dict[str, Tensor]:
    """Iso-C, one layer at a time."""
    return merge_per_layer(vectors, isotropic_common_merge, scaling, progress, "iso_c", qkv=qkv)


@register_method(
    "iso_cts",
    params=[
        MethodParam(
            "common_share", 0.8, "fraction of each matrix's rank kept for the common subspace (authors' 0.8)",
            check=check_fraction,
        ),
        qkv_param(),
        scaling_param(1.0),
    ],
    paper="Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and "
    "Task-Specific Subspaces (ICML)",
    summary="per matrix: common subspace of the sum plus task-specific subspaces, orthogonalised, flat "
    "spectrum × α; other parameters averaged × α; search α",
    grid=SUBSPACE_GRID,
)
def iso_cts(
    vectors: Sequence[Mapping[str, Tensor]],
    *,
    common_share: float = 0.8,
    qkv: str = "separate",
    scaling: float = 1.0,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Iso-CTS, one layer at a time."""

    def merge_matrices(matrices: list[Tensor]) -> Tensor:
        return isotropic_common_task_specific_merge(matrices, common_share)

    return merge_per_layer(vectors, merge_matrices, scaling, progress, "iso_cts", qkv=qkv)
