"""PCB-Merging (Du et al. 2024, "Parameter Competition Balancing for Model Merging").

Follows the authors' released code (github.com/duguodong7/pcb-merging, ``PCB_merge``), which
differs from the paper's Softmax notation: over each *whole* task vector τ_i (n tasks),
  τ̃_i      = sign(τ_i) · clamp(|τ_i|, q_lo, q_hi)            q = order statistics at 0.01% / 99.99%
  intra_i  = exp(n · Norm(|τ̃_i|)²)                           Norm = per-task min-max
  inter_i  = tanh(τ_i ⊙ Σ_j τ_j)  (= the code's form of Σ_j tanh(τ_i ⊙ τ_j); raw, unclipped τ)
  β_i      = Norm(max(intra_i · inter_i, s_i))               s_i = score at rank ⌊d(1−r)⌋ (0-based)
  τ_merged = λ · Σ_i β_i τ̃_i / max(Σ_i β_i, 1e-12)
so entries scoring below the top-r fraction of their task get β = 0 ("drop"), the rest a weight in
(0, 1] ("rescale"). A Norm over a constant vector is taken as 0 (the code would give NaN).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor

from .registry import MergeError, MethodParam, check_fraction, register_method, scaling_param
from .streaming import TensorReader, chunks, iter_names, order_statistics

CLIP_RATIO = 1e-4
# The authors tune one λ per task by evolutionary search inside [0.8, 1.3] (start 1.2) for ViTs and
# grid-search a shared λ over 0.8–2.2 for T5; our shared-λ grid covers 0.4–1.5 around both.
PCB_GRID = tuple(round(0.4 + 0.1 * i, 1) for i in range(12))


def _clip_ranks(d: int) -> list[int]:
    """1-based ranks of the reference code's ``sorted[int(d·1e-4)]`` and ``sorted[int(d·(1−1e-4)−1)]``."""
    return [int(d * CLIP_RATIO) + 1, max(int(d * (1 - CLIP_RATIO) - 1), 0) + 1]


def _normalized(values: Tensor, low: float, high: float) -> Tensor:
    """Min-max normalisation with known bounds; a constant vector maps to 0."""
    if high > low:
        return (values - low) / (high - low)
    return torch.zeros_like(values)


def competition_score(tensor: Tensor, total: Tensor, bounds: Sequence[float], n: int) -> tuple[Tensor, Tensor]:
    """(intra · inter score, clipped magnitude) of one task's parameter; ``total`` = Σ_j τ_j."""
    magnitude = tensor.abs().clamp(bounds[0], bounds[1])
    intra = torch.exp(n * _normalized(magnitude, bounds[0], bounds[1]) ** 2)
    return intra * torch.tanh(tensor * total), magnitude


@register_method(
    "pcb",
    params=[
        MethodParam(
            "ratio", 0.05, "r: fraction of each task's highest PCB scores kept (0.05 for ViTs)", check=check_fraction
        ),
        scaling_param(1.0),
    ],
    paper="Du et al. 2024, Parameter Competition Balancing for Model Merging (NeurIPS)",
    summary="clip, intra/inter-task balancing scores, drop all but top-r, weighted mean, × λ",
    grid=PCB_GRID,
)
def pcb(
    vectors: Sequence[Mapping[str, Tensor]],
    *,
    ratio: float = 0.05,
    scaling: float = 1.0,
    progress: bool = False,
) -> dict[str, Tensor]:
    """PCB-Merging in streaming passes: clip bounds, score threshold/max, then the weighted mean."""
    n = len(vectors)
    if n > 80:  # exp(n) overflows float32 beyond ~88
        raise MergeError(f"pcb supports at most 80 task vectors (exp(n·…) overflows float32), got {n}.")
    reader = TensorReader(vectors)
    names = list(vectors[0].keys())

    # streams yield generators so that only one task's temporaries are alive at a time
    def magnitudes() -> Iterator[Iterator[Tensor]]:
        for name in iter_names(names, progress, "pcb: clip bounds"):
            yield reader.read(name)

    bounds = order_statistics(magnitudes, n, _clip_ranks, magnitude=True)

    def scores() -> Iterator[Iterator[Tensor]]:
        # block by block, like the final pass: same-sized temporaries keep the allocator from
        # fragmenting (whole-tensor temporaries of every size grew peak RSS to ~6x one vector)
        for name in iter_names(names, progress, "pcb: score threshold"):
            flat = [t.reshape(-1) for t in reader.read(name)]
            for part in chunks(flat[0].numel()):
                block = [f[part] for f in flat]
                total = torch.stack(block).sum(dim=0)
                yield (competition_score(t, total, bounds[i], n)[0] for i, t in enumerate(block))

    # [threshold s_i, max score] per task: the bounds of the min-max Norm applied after the drop
    score_bounds = order_statistics(scores, n, lambda d: [int(d * (1 - ratio)) + 1, d])
    if not all(math.isfinite(v) for row in score_bounds for v in row):
        raise MergeError("pcb scores overflowed float32; merge fewer task vectors at once.")

    merged: dict[str, Tensor] = {}
    for name in iter_names(names, progress, "pcb"):
        tensors = reader.read(name)
        shape, flat = tensors[0].shape, [t.reshape(-1) for t in tensors]
        del tensors
        out = torch.empty_like(flat[0])
        for part in chunks(out.numel()):
            block = [f[part] for f in flat]
            total = torch.stack(block).sum(dim=0)
            weighted, weight_sum = torch.zeros_like(total), torch.zeros_like(total)
            for i, tensor in enumerate(block):
                score, magnitude = competition_score(tensor, total, bounds[i], n)
                low, high = score_bounds[i]
                beta = _normalized(score.clamp_(min=low), low, high)
                weighted += beta * torch.sign(tensor) * magnitude
                weight_sum += beta
            out[part] = weighted.div_(weight_sum.clamp_(min=1e-12))
        merged[name] = out.mul_(scaling).view(shape)
    return merged
