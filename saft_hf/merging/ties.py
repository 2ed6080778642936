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
    """sign(Σ_i trimmed τ_i) over dim 0 (TIES step 2, "Elect"): ±1, and 0 where the sum is exactly 0.

    The zeros are ties, resolved once the whole vector is known (see ``DisjointMerge``).
    """
    return torch.sign(trimmed.sum(dim=0))


def disjoint_mean(trimmed: Tensor, sign: Tensor) -> Tensor:
    """Mean over dim 0 of the entries whose sign agrees with ``sign`` (TIES step 3, "Disjoint merge").

    Zeros never agree, so trimmed entries do not dilute the mean; no agreeing entry gives 0.
    """
    agree = trimmed * sign > 0
    return (trimmed * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


class DisjointMerge:
    """Steps 2-3 block by block, with ties (Σ_i τ_i = 0) decided by the whole vector's majority sign.

    The TIES authors' code (``resolve_zero_signs``, github.com/prateeksr/TIES-Merging) sets a zero
    elected sign to sign(Σ over all entries of the elected signs); if that is 0 too, the sign stays
    0 and their ``disjoint_merge`` keeps the negative entries. The majority is known only after the
    last tensor, so ``block`` writes the positive candidate and keeps the negative one for ``resolve``.
    """

    def __init__(self) -> None:
        self.majority = 0  # Σ of the elected signs so far (ties count 0)
        self._negative: dict[str, list[tuple[Tensor, Tensor]]] = {}

    def block(self, name: str, trimmed: Tensor, offset: int) -> Tensor:
        """disjoint_mean(trimmed, elected sign) of one (n, chunk) block; ``trimmed`` is overwritten.

        In place, as Σ_i max(s·τ_i, 0) · s (s = ±1): equal bitwise to the sum of the agreeing τ_i,
        since negation commutes with rounding.
        """
        sign = elect_sign(trimmed)
        self.majority += int(sign.sum())
        tie = sign == 0
        sign.masked_fill_(tie, 1.0)
        trimmed.mul_(sign)
        count = (trimmed > 0).sum(dim=0)
        # a zero sum with a positive entry has a negative one too: a real tie (all-zero columns are not)
        tied = tie.logical_and_(count > 0).nonzero().squeeze(1)
        if tied.numel():  # those columns were multiplied by +1: still the trimmed values
            negative = disjoint_mean(trimmed[:, tied], torch.tensor(-1.0))
            self._negative.setdefault(name, []).append((tied + offset, negative))
        return trimmed.clamp_(min=0).sum(dim=0).mul_(sign).div_(count.clamp_(min=1))

    def resolve(self, merged: dict[str, Tensor], scaling: float) -> None:
        """Write the negative candidates into ``merged`` (flat views) unless the majority sign is +1."""
        if self.majority > 0:
            return
        for name, parts in self._negative.items():
            flat = merged[name].view(-1)
            for index, value in parts:
                flat[index] = value * scaling


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
    threshold_column = torch.tensor(thresholds).unsqueeze(1) if thresholds is not None else None
    combine = DisjointMerge()
    merged: dict[str, Tensor] = {}
    for name in iter_names(list(vectors[0].keys()), progress, "ties"):
        tensors = reader.read(name)
        shape, flat = tensors[0].shape, [t.reshape(-1) for t in tensors]
        del tensors
        out = torch.empty_like(flat[0])
        for part in chunks(out.numel()):
            trimmed = torch.stack([f[part] for f in flat])  # a fresh (n, chunk) copy: trimmed in place
            if threshold_column is not None:
                trimmed.mul_(trimmed.abs() >= threshold_column)
            out[part] = combine.block(name, trimmed, part.start)
        merged[name] = out.mul_(scaling).view(shape)
    combine.resolve(merged, scaling)
    return merged
