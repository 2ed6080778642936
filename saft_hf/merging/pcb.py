"""PCB-Merging (Du et al. 2024, "Parameter Competition Balancing for Model Merging").

Follows the authors' released code (github.com/duguodong7/pcb-merging), which differs from the
paper's Softmax notation. The authors ship two variants; over each *whole* task vector τ_i (n tasks):
  τ̃_i      = sign(τ_i) · clamp(|τ_i|, q_lo, q_hi)     q = order statistics at c / 1 − c of |τ_i|
  intra_i  = exp(n · Norm(|τ̃_i|)²)                    Norm = per-task min-max
  inter_i  = general: tanh(τ_i ⊙ Σ_j τ_j)              raw, unclipped τ; c = 0.01%  (pcb-merging.py)
             vit:     Σ_j tanh(τ̂_i ⊙ τ̂_j)              τ̂ = sign(τ)·Norm(|τ̃|); c = 1%
                                                       (vision_source_code/pcb_ES.py, ``PCB``)
  β_i      = Norm(max(intra_i · inter_i, s_i))        s_i = score at rank ⌊d(1−r)⌋ (0-based)
  τ_merged = λ · Σ_i β_i τ̃_i / max(Σ_i β_i, 1e-12)
The two inter terms differ: tanh of a sum is not a sum of tanh, and vit compares normalised vectors.
(vision_source_code/pcb.py's script uses a third form, tanh(τ_i ⊙ Σ_j τ̂_j); ``vit`` follows the
``PCB`` function of pcb_ES.py, which the evolutionary-search ViT results come from.)
Entries scoring below the top-r fraction of their task get β = 0 ("drop"), the rest a weight in
(0, 1] ("rescale"). A Norm over a constant vector is taken as 0 (the code would give NaN).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from .registry import MergeError, MethodParam, check_fraction, register_method, scaling_param
from .streaming import TensorReader, chunks, iter_names, order_statistics

# fraction of each task's |τ| clipped at either end, per variant (see the module docstring)
CLIP_RATIOS = {"general": 1e-4, "vit": 1e-2}
# For ViTs the authors tune one λ per task *vector* (jointly, on mean validation accuracy) by evolutionary
# search inside [0.8, 1.3] starting at 1.0 (pcb_ES.py: ng.p.Array(init=[1.0]*n); its earlier
# `lams = [1.2]*n` is overwritten by the search's result), and grid-search a shared λ over 0.8–2.2 for T5;
# our shared-λ grid covers 0.4–1.5 around both, 1.0 included.
PCB_GRID = tuple(round(0.4 + 0.1 * i, 1) for i in range(12))


def _clip_ranks(clip: float) -> Callable[[int], list[int]]:
    """1-based ranks of the reference code's ``sorted[int(d·c)]`` and ``sorted[int(d·(1−c)−1)]``."""
    return lambda d: [int(d * clip) + 1, max(int(d * (1 - clip) - 1), 0) + 1]


def _normalized(values: Tensor, low: float, high: float) -> Tensor:
    """Min-max normalisation with known bounds; a constant vector maps to 0."""
    if high > low:
        return (values - low) / (high - low)
    return torch.zeros_like(values)


def competition_scores(
    block: Sequence[Tensor], bounds: Sequence[Sequence[float]], variant: str
) -> Iterator[tuple[Tensor, Tensor]]:
    """(intra · inter score, clipped magnitude) of each task for one block of the n tasks' values."""
    n = len(block)
    magnitudes = [t.abs().clamp(lo, hi) for t, (lo, hi) in zip(block, bounds, strict=True)]
    if variant == "vit":
        hats = torch.stack(
            [torch.sign(t) * _normalized(m, lo, hi) for t, m, (lo, hi) in zip(block, magnitudes, bounds, strict=True)]
        )
        inter: Callable[[int], Tensor] = lambda i: torch.tanh(hats[i] * hats).sum(dim=0)  # noqa: E731
    else:
        total = torch.stack(list(block)).sum(dim=0)
        inter = lambda i: torch.tanh(block[i] * total)  # noqa: E731
    for i, (magnitude, (lo, hi)) in enumerate(zip(magnitudes, bounds, strict=True)):
        yield torch.exp(n * _normalized(magnitude, lo, hi) ** 2) * inter(i), magnitude


@register_method(
    "pcb",
    params=[
        MethodParam(
            "ratio", 0.05, "r: fraction of each task's highest PCB scores kept (0.05 for ViTs)", check=check_fraction
        ),
        MethodParam(
            "variant",
            "general",
            "the authors' general code (clip 0.01%, tanh(τ_i ⊙ Σ_j τ_j)) or their ViT one (clip 1%, "
            "Σ_j tanh(τ̂_i ⊙ τ̂_j) on min-max normalised τ̂)",
            choices=tuple(CLIP_RATIOS),
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
    variant: str = "general",
    scaling: float = 1.0,
    progress: bool = False,
) -> dict[str, Tensor]:
    """PCB-Merging in streaming passes: clip bounds, score threshold/max, then the weighted mean."""
    n = len(vectors)
    if n > 80:  # exp(n) overflows float32 beyond ~88
        raise MergeError(f"pcb supports at most 80 task vectors (exp(n·…) overflows float32), got {n}.")
    reader = TensorReader(vectors)
    names = list(vectors[0].keys())

    def magnitudes() -> Iterator[list[Tensor]]:
        for name in iter_names(names, progress, "pcb: clip bounds"):
            yield reader.read(name)

    bounds = order_statistics(magnitudes, n, _clip_ranks(CLIP_RATIOS[variant]), magnitude=True)

    def scores() -> Iterator[Iterator[Tensor]]:
        # block by block, like the final pass: same-sized temporaries keep the allocator from
        # fragmenting (whole-tensor temporaries of every size grew peak RSS to ~6x one vector)
        for name in iter_names(names, progress, "pcb: score threshold"):
            flat = [t.reshape(-1) for t in reader.read(name)]
            for part in chunks(flat[0].numel()):
                yield (score for score, _ in competition_scores([f[part] for f in flat], bounds, variant))

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
            weighted, weight_sum = torch.zeros_like(block[0]), torch.zeros_like(block[0])
            for i, (score, magnitude) in enumerate(competition_scores(block, bounds, variant)):
                low, high = score_bounds[i]
                beta = _normalized(score.clamp_(min=low), low, high)
                weighted += beta * torch.sign(block[i]) * magnitude
                weight_sum += beta
            out[part] = weighted.div_(weight_sum.clamp_(min=1e-12))
        merged[name] = out.mul_(scaling).view(shape)
    return merged
