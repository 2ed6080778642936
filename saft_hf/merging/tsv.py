"""TSV-M (Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task Interference in Model Merging").

Per task matrix Δ_i = U_i Σ_i V_iᵀ (T tasks, r = min(m, n)), keep each task's top k = ⌊r / T⌋
components, concatenate U = [U_1,k … U_T,k], Σ = diag(Σ_1,k … Σ_T,k), V = [V_1,k … V_T,k],
decorrelate U and V by orthogonal Procrustes, and rebuild α · U⊥ Σ V⊥ᵀ. Follows the authors' code
(``compute_and_sum_svd_mem_reduction`` in github.com/AntoAndGar/task_singular_vectors):
  - k = ``int(r · (1/T))`` (= ⌊r/T⌋); a matrix with r < T keeps nothing and merges to 0;
  - non-matrix parameters (and ``text_projection``) are the *mean* of the task vectors, then × α,
    where the paper speaks of task arithmetic for them;
  - every 2-D tensor is a matrix, embeddings included (see ``is_task_matrix``);
  - their open_clip attention has one in_proj_weight: ``qkv="stacked"`` reproduces that on HF CLIP's
    separate q/k/v (the default, ``"separate"``, decomposes each, as FusionBench's HF port).
One addition: components past a task matrix's numerical rank are dropped (see ``numerical_rank``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from torch import Tensor

from .registry import register_method, scaling_param
from .subspaces import merge_per_layer, qkv_param, rebuild_decorrelated, top_components

logger = logging.getLogger(__name__)

# The authors evaluate α on linspace(0, 3, 31)[1:] and report α = 1.0 as the default that needs no data.
SUBSPACE_GRID = tuple(round(0.1 * i, 1) for i in range(1, 31))


def task_singular_vectors_merge(matrices: Sequence[Tensor]) -> Tensor:
    """TSV-M of one layer: the T task matrices (each m × n, float32) → their merged m × n matrix (α = 1)."""
    rows, cols = matrices[0].shape
    k = min(rows, cols) // len(matrices)
    return rebuild_decorrelated([top_components(matrix, k) for matrix in matrices], (rows, cols))


@register_method(
    "tsv_m",
    params=[qkv_param(), scaling_param(1.0)],
    paper="Gargiulo et al. 2025, Task Singular Vectors: Reducing Task Interference in Model Merging (CVPR)",
    summary="per matrix: each task's top 1/T singular components, Procrustes-decorrelated, summed × α; "
    "other parameters averaged × α",
    grid=SUBSPACE_GRID,
)
def tsv_m(
    vectors: Sequence[Mapping[str, Tensor]], *, qkv: str = "separate", scaling: float = 1.0, progress: bool = False
) -> dict[str, Tensor]:
    """TSV-M, one layer at a time: T task matrices and their SVDs are the only large live tensors."""
    empty = []

    def merge_matrices(matrices: list[Tensor]) -> Tensor:
        if min(matrices[0].shape) < len(matrices):
            empty.append(tuple(matrices[0].shape))
        return task_singular_vectors_merge(matrices)

    merged = merge_per_layer(vectors, merge_matrices, scaling, progress, "tsv_m", qkv=qkv)
    if empty:
        logger.warning(
            "tsv_m: %d matrices (e.g. of shape %s) have fewer rows or columns than the %d task vectors, so "
            "⌊r/T⌋ = 0 components are kept and they merge to zero, as in the authors' code.",
            len(empty), empty[0], len(vectors),
        )
    return merged
