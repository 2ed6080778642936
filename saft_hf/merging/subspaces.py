"""Per-layer SVD primitives shared by the subspace merges (TSV-M, Iso-C, Iso-CTS).

Both authors' codes decompose every 2-D tensor except ``text_projection`` and average the rest; the
primitives here are small pure functions on one layer's task matrices, so a method holds at most one
layer's T matrices and their SVDs at a time.
"""

from __future__ import annotations

import re
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


# How attention's query/key/value weights meet the SVD. HF CLIP keeps q_proj / k_proj / v_proj apart,
# so 'separate' decomposes each (as FusionBench's HF port of TSV-M / Iso-C/CTS does); the authors of both
# ran open_clip, whose attention holds one in_proj_weight = [W_q; W_k; W_v] (3d × d), so 'stacked' stacks
# the three rows-wise for the SVD and splits the merged matrix back, as their numbers were made.
QKV_MODES = ("separate", "stacked")
_QKV = re.compile(r"^(?P<prefix>.*)\.(?P<which>[qkv])_proj\.weight$")


def qkv_groups(names: Sequence[str]) -> dict[str, tuple[str, str, str]]:
    """Each attention's (q, k, v) weight names, keyed by each of the three, for layers that have all three."""
    found: dict[str, dict[str, str]] = {}
    for name in names:
        match = _QKV.match(name)
        if match:
            found.setdefault(match["prefix"], {})[match["which"]] = name
    groups: dict[str, tuple[str, str, str]] = {}
    for parts in found.values():
        if set(parts) == {"q", "k", "v"}:
            group = (parts["q"], parts["k"], parts["v"])
            groups.update({name: group for name in group})
    return groups


def merge_per_layer(
    vectors: Sequence[Mapping[str, Tensor]],
    merge_matrices: Callable[[list[Tensor]], Tensor],
    scaling: float,
    progress: bool,
    desc: str,
    qkv: str = "separate",
) -> dict[str, Tensor]:
    """α · ``merge_matrices`` of each task matrix's T copies, α · the mean for other parameters.

    One parameter is read (as float32) at a time and cast back to the input dtype, so only one
    layer's T tensors and what ``merge_matrices`` derives from them are alive at once (with
    ``qkv="stacked"``, one attention's three). See ``QKV_MODES``.
    """
    if qkv not in QKV_MODES:
        raise ValueError(f"qkv must be one of {QKV_MODES}, got {qkv!r}")
    reader = TensorReader(vectors)
    names = list(vectors[0].keys())
    groups = qkv_groups(names) if qkv == "stacked" else {}
    merged: dict[str, Tensor] = {}
    for name in iter_names(names, progress, desc):
        if name in merged:  # merged with its attention's q/k/v group
            continue
        if name in groups:
            parts = [reader.read(member) for member in groups[name]]  # [q, k, v] × T tasks
            rows = [p[0].shape[0] for p in parts]
            stacked = [torch.cat([p[t] for p in parts], dim=0) for t in range(len(vectors))]
            del parts
            for member, block in zip(groups[name], merge_matrices(stacked).split(rows, dim=0), strict=True):
                merged[member] = block.float().mul_(scaling)
            continue
        tensors = reader.read(name)
        out = merge_matrices(tensors) if is_task_matrix(name, tensors[0].shape) else layer_mean(tensors)
        del tensors
        merged[name] = out.float().mul_(scaling)  # float32; merge() casts once to the requested dtype
    return {name: merged[name] for name in names}


def qkv_param():
    """The ``qkv`` method parameter of the subspace merges (see ``QKV_MODES``)."""
    from .registry import MethodParam

    return MethodParam(
        "qkv", "separate",
        "attention q/k/v weights: 'separate' (one SVD each, HF CLIP's layout, FusionBench's port) or 'stacked' "
        "(one SVD of [W_q; W_k; W_v], open_clip's in_proj_weight, as the method's authors ran it)",
        choices=QKV_MODES,
    )  # fmt: skip


__all__ = [
    "is_task_matrix",
    "layer_mean",
    "numerical_rank",
    "orthogonalize",
    "merge_per_layer",
    "qkv_groups",
    "qkv_param",
    "rebuild_decorrelated",
    "thin_svd",
    "top_components",
]
