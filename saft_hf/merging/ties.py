"""TIES-Merging (Yadav et al. 2023): trim each whole task vector, elect signs, disjoint mean."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor

from .registry import density_param, register_method, scaling_param
from .streaming import TensorReader, chunks, iter_names, order_statistics


def magnitude_thresholds(
    vectors: Sequence[Mapping[str, Tensor]],
    density: float,
    progress: bool = False,
    reader: TensorReader | None = None,
) -> list[float] | None:
    """Per task, the |τ| value at rank d − ⌊d·density⌋ of the whole vector (d = its size); None = keep all.

    Same rank as the TIES reference code (``kthvalue(d - int(d * K))``); entries with |τ| ≥ threshold
    are kept, so exact ties at the threshold are all kept.
    """
    if density >= 1.0:
        return None
    reader = reader or TensorReader(vectors)
    names = list(vectors[0].keys())

    def magnitudes() -> Iterator[list[Tensor]]:
        for name in iter_names(names, progress, "ties: top-k threshold"):
            yield reader.read(name)

    stats = order_statistics(magnitudes, len(vectors), lambda d: [d - int(d * density)], magnitude=True)
    return [row[0] for row in stats]


def elect_sign(trimmed: Tensor) -> Tensor:
    """±1 per entry: the sign of Σ_i trimmed τ_i over dim 0 (TIES step 2, "Elect").

    A sum of exactly 0 elects +1, as PEFT's ``calculate_majority_sign_mask`` does (the TIES reference
    code uses the vector-wide majority sign there instead; the case has measure zero).
    """
    return torch.where(trimmed.sum(dim=0) >= 0, 1.0, -1.0)


def disjoint_mean(trimmed: Tensor, sign: Tensor) -> Tensor:
    """Mean over dim 0 of the entries whose sign agrees with ``sign`` (TIES step 3, "Disjoint merge").

    Zeros never agree, so trimmed entries do not dilute the mean; no agreeing entry gives 0.
    """
    agree = trimmed * sign > 0
    return (trimmed * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


@register_method(
    "ties",
    params=[
        density_param(0.2, "fraction of each whole task vector's largest |τ| kept before sign election"),
        scaling_param(1.0),
    ],
    paper="Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models",
    summary="trim to top-k per task vector, elect sign, disjoint mean, × λ",
)
def ties(
    vectors: Sequence[Mapping[str, Tensor]],
    *,
    density: float = 0.2,
    scaling: float = 1.0,
    progress: bool = False,
) -> dict[str, Tensor]:
    """TIES-Merging: λ · disjoint_mean(elect_sign(trimmed τ_i)), trimming each whole vector (step 1, "Trim")."""
    reader = TensorReader(vectors)  # shared, so finiteness is checked on the first pass only
    thresholds = magnitude_thresholds(vectors, density, progress, reader)
    merged: dict[str, Tensor] = {}
    for name in iter_names(list(vectors[0].keys()), progress, "ties"):
        tensors = reader.read(name)
        shape, flat = tensors[0].shape, [t.reshape(-1) for t in tensors]
        del tensors
        out = torch.empty_like(flat[0])
        for part in chunks(out.numel()):
            trimmed = torch.stack([f[part] for f in flat])  # a fresh (n, chunk) copy: trimmed in place
            if thresholds is not None:
                trimmed.mul_(trimmed.abs() >= torch.tensor(thresholds).unsqueeze(1))
            out[part] = disjoint_mean(trimmed, elect_sign(trimmed))
        merged[name] = out.mul_(scaling).view(shape).to(reader.dtypes[name])
    return merged
