"""Cross-task linearity (CTL) per layer block.

Zhou et al. 2024 ("On the Emergence of Cross-Task Linearity in the Pretraining-Finetuning Paradigm",
task-arithmetic form): f_ℓ(θ₀ + λ(τ_s + τ_t)) ≈ ½ f_ℓ(θ₀ + 2λτ_s) + ½ f_ℓ(θ₀ + 2λτ_t) for every
block ℓ; the gap is measured as 1 − cos between the two sides, averaged over samples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..task_vectors import add_scaled_
from .defaults import DEFAULT_CTL_LAMBDA  # noqa: F401  (re-exported)
from .evaluation import Batch, FeaturesFn, at_base_afterwards, block_outputs, materialise, model_device


def cross_task_linearity(
    model: nn.Module,
    base_state: Mapping[str, Tensor],
    task_vector_s: Mapping[str, Tensor],
    task_vector_t: Mapping[str, Tensor],
    batches: Sequence[Batch],
    *,
    features_fn: FeaturesFn = block_outputs,
    lam: float = DEFAULT_CTL_LAMBDA,
    progress: bool = False,
) -> list[float]:
    """Per block ℓ: mean over samples of 1 − cos(f_ℓ(θ₀+λ(τ_s+τ_t)), ½f_ℓ(θ₀+2λτ_s) + ½f_ℓ(θ₀+2λτ_t)).

    Features are flattened per sample (tokens × width). 0 means perfectly linear across tasks. The
    three weight settings are written per batch, so memory holds one batch of features, not all.
    The model is evaluated in eval mode and left at θ₀.
    """
    tau_s, tau_t = materialise(task_vector_s), materialise(task_vector_t)
    settings = (([tau_s, tau_t], [lam, lam]), ([tau_s], [2 * lam]), ([tau_t], [2 * lam]))
    device = model_device(model)
    totals: Tensor | None = None
    count = 0
    with at_base_afterwards(model, base_state), torch.no_grad():
        for batch in tqdm(batches, desc="cross-task linearity", unit="batch", disable=not progress):
            batch = {key: value.to(device) for key, value in batch.items()}
            merged, only_s, only_t = (
                _flat_blocks(model, base_state, batch, features_fn, deltas, scales)
                for deltas, scales in settings
            )
            gaps = torch.stack(
                [1 - F.cosine_similarity(m, 0.5 * (s + t), dim=-1) for m, s, t in zip(merged, only_s, only_t)]
            )  # (blocks, batch)
            totals = gaps.sum(-1) if totals is None else totals + gaps.sum(-1)
            count += gaps.shape[-1]
    if totals is None or count == 0:
        raise ValueError("cross_task_linearity got no samples; pass at least one batch.")
    return (totals / count).tolist()


def _flat_blocks(
    model: nn.Module,
    base_state: Mapping[str, Tensor],
    batch: Batch,
    features_fn: FeaturesFn,
    deltas: list[Mapping[str, Tensor]],
    scales: list[float],
) -> list[Tensor]:
    add_scaled_(model, base_state, deltas, scales)
    return [block.flatten(1).double() for block in features_fn(model, batch)]
