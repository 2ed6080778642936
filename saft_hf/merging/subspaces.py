"""Per-layer SVD primitives shared by the subspace merges (TSV-M, Iso-C, Iso-CTS).

Both authors' codes decompose every 2-D tensor except ``text_projection`` and average the rest; the
primitives here are small pure functions on one layer's task matrices, so a method holds at most one
layer's T matrices and their SVDs at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from .streaming import TensorReader, iter_names

_EPS = torch.finfo(torch.float32).eps


def is_task_matrix(name: str, shape: Sequence[int]) -> bool:
    """True for the tensors the subspace methods decompose: every 2-D one but ``text_projection``.

    Both authors' codes use this test (``len(shape) == 2 and "text_projection" not in key``), so 2-D
    embeddings (CLIP's position embedding) and the visual projection count as matrices; conv kernels,
    biases, norms and the class embedding do not.
    """
    return len(shape) == 2 and "text_projection" not in name


def thin_svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``U, S, Vh`` of the thin SVD of ``matrix`` (m × n), computed on its tall orientation.

    LAPACK's gesdd is ~2.5× faster on a 3072 × 768 matrix than on its 768 × 3072 transpose. When it
    fails to converge in float32 (it can on clustered singular values) it is retried in float64.
    """
    if matrix.shape[0] < matrix.shape[1]:
        u, s, vh = thin_svd(matrix.T)
        return vh.T, s, u.T
    try:
        return torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError:
        u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
        return u.to(matrix.dtype), s.to(matrix.dtype), vh.to(matrix.dtype)


def numerical_rank(singular_values: Tensor, shape: Sequence[int]) -> int:
    """Number of singular values above σ_max · max(m, n) · ε_float32 (``torch.linalg.matrix_rank``'s rule).

    Singular vectors past this rank are an arbitrary basis LAPACK picks for the null space; the
    subspace methods drop them (the authors' code keeps them, which makes a rank-deficient or
    all-zero task matrix change the merge through vectors that carry nothing).
    """
    if singular_values.numel() == 0:
        return 0
    tolerance = float(singular_values[0]) * max(shape) * _EPS
    return int((singular_values > tolerance).sum())


def top_components(matrix: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top ``min(k, rank)`` singular triplets of ``matrix``: ``U_k`` (m × k), ``S_k``, ``Vh_k`` (k × n).

    For k ≤ r/2 the top-k subspace comes from an eigendecomposition of the small Gram matrix and the
    triplets from an SVD of the k × n projection onto it (Rayleigh–Ritz), about 2× faster than a
    full SVD on ViT-B/32's 768 × 768 and 768 × 3072 matrices. The Gram matrix squares the condition
    number, so this matches the full SVD (up to signs) for components with σ above ~1e-3 · σ_max; the
    top r/T of a task matrix are such components unless the matrix is nearly rank-deficient.
    """
    rank = min(matrix.shape)
    if k <= 0:
        return matrix.new_zeros(matrix.shape[0], 0), matrix.new_zeros(0), matrix.new_zeros(0, matrix.shape[1])
    if 2 * k > rank:
        u, s, vh = thin_svd(matrix)
    elif matrix.shape[0] > matrix.shape[1]:
        vt, s, ut = top_components(matrix.T, k)
        return ut.T, s, vt.T
    else:
        _, eigenvectors = torch.linalg.eigh(matrix @ matrix.T)  # ascending eigenvalues
        basis = eigenvectors[:, -k:]
        u_small, s, vh = thin_svd(basis.T @ matrix)  # k × n: gesdd is faster on its tall transpose
        u = basis @ u_small
    keep = min(k, numerical_rank(s, matrix.shape))
    return u[:, :keep], s[:keep], vh[:keep]


def orthogonalize(columns: Tensor) -> Tensor:
    """The matrix with orthonormal columns nearest to ``columns`` (m × p, p ≤ m): ``U Vᵀ`` of its SVD.

    This is orthogonal Procrustes (Schönemann 1966), the decorrelation step of TSV-M (Gargiulo et
    al. 2025) and of Iso-CTS (Marczak et al. 2025) on concatenated singular vectors. Computed as
    ``X (XᵀX)^(-1/2)`` from a float64 eigendecomposition of the p × p Gram matrix: the columns are
    near-orthonormal, so their singular values cluster at 1, where float32 gesdd can fail to
    converge (it did on a 3072 × 768 block of 8 ViT-B/32-shaped task vectors) while ``eigh`` does
    not. Directions with a numerically zero eigenvalue (linearly dependent columns) map to 0.
    """
    gram = columns.double().T @ columns.double()
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    tolerance = float(eigenvalues[-1].clamp(min=0)) * max(columns.shape) * _EPS**2
    scale = torch.where(eigenvalues > tolerance, eigenvalues.clamp(min=tolerance).rsqrt(), 0.0)
    return columns @ ((eigenvectors * scale) @ eigenvectors.T).to(columns.dtype)


def rebuild_decorrelated(
    components: Sequence[tuple[Tensor, Tensor, Tensor]], shape: Sequence[int], isotropic_rank: int | None = None
) -> Tensor:
    """``U⊥ diag(σ) V⊥ᵀ`` from kept singular triplets ``(U_i, σ_i, Vh_i)``, U and V each orthogonalised.

    The rebuild step of TSV-M (Gargiulo et al. 2025); with ``isotropic_rank`` r every σ becomes Σσ / r,
    the flat spectrum of Iso-CTS (Marczak et al. 2025). No component kept (e.g. all-zero tasks): zeros.
    """
    singular_values = torch.cat([s for _, s, _ in components])
    if singular_values.numel() == 0:
        return torch.zeros(*shape)
    u_perp = orthogonalize(torch.cat([u for u, _, _ in components], dim=1))  # m × p
    v_perp = orthogonalize(torch.cat([vh for _, _, vh in components], dim=0).T)  # n × p
    weights = singular_values if isotropic_rank is None else singular_values.sum() / isotropic_rank
    return (u_perp * weights) @ v_perp.T


def layer_mean(tensors: Sequence[Tensor]) -> Tensor:
    """Mean of one parameter over the tasks: how both authors' codes combine non-matrix parameters."""
    total = tensors[0].clone()
    for tensor in tensors[1:]:
        total += tensor
    return total.div_(len(tensors))


def merge_per_layer(
    vectors: Sequence[Mapping[str, Tensor]],
    merge_matrices: Callable[[list[Tensor]], Tensor],
    scaling: float,
    progress: bool,
    desc: str,
) -> dict[str, Tensor]:
    """α · ``merge_matrices`` of each task matrix's T copies, α · the mean for other parameters.

    One parameter is read (as float32) at a time and cast back to the input dtype, so only one
    layer's T tensors and what ``merge_matrices`` derives from them are alive at once.
    """
    reader = TensorReader(vectors)
    merged: dict[str, Tensor] = {}
    for name in iter_names(list(vectors[0].keys()), progress, desc):
        tensors = reader.read(name)
        out = merge_matrices(tensors) if is_task_matrix(name, tensors[0].shape) else layer_mean(tensors)
        del tensors
        merged[name] = out.float().mul_(scaling)  # float32; merge() casts once to the requested dtype
    return merged


__all__ = [
    "is_task_matrix",
    "layer_mean",
    "numerical_rank",
    "orthogonalize",
    "merge_per_layer",
    "rebuild_decorrelated",
    "thin_svd",
    "top_components",
]
