"""Weight-disentanglement error ξ(α₁, α₂) and the joint-task loss on one grid of coefficients.

Ortiz-Jimenez et al. 2023 ("Task Arithmetic in the Tangent Space", eq. 5):
    ξ(α₁, α₂) = Σ_t E_{x∼D_t}[ dist(f(x; θ₀ + α_t τ_t), f(x; θ₀ + α₁τ₁ + α₂τ₂)) ],
with dist = prediction disagreement 1[argmax differs]. The SAFT paper (Lee et al. 2025, Figs. 1-2, 4-5)
shows ξ and L(θ; D₁) + L(θ; D₂) on such grids, also inside a merge of all tasks ("others").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..task_vectors import add_scaled_
from .defaults import DEFAULT_ALPHAS, DEFAULT_OTHERS_SCALE  # noqa: F401  (re-exported)
from .evaluation import Batch, LogitsFn, at_base_afterwards, evaluate_task, materialise, sum_vectors

# Cheap default: 9 × 9 points, step 0.25, containing 0 and 1 (the pre-trained and fine-tuned ends).
# Coefficient of the other tasks' vectors in the merged variant: the usual task-arithmetic optimum
# for eight ViT tasks (Ilharco et al. 2023 search λ ∈ [0, 1]; ~0.3 is typical).


@dataclass
class PairGrid:
    """ξ and losses on an α₁ × α₂ grid; ``[i][j]`` holds the value at (alphas[i], alphas[j])."""

    tasks: tuple[str, str]
    alphas: list[float]
    xi: list[list[float]]
    xi_per_task: dict[str, list[list[float]]]
    joint_loss: list[list[float]]
    loss_per_task: dict[str, list[list[float]]]
    num_samples: dict[str, int]
    others_scale: float | None = None
    num_others: int = 0
    reference_includes_others: bool = False

    def to_dict(self) -> dict:
        """A JSON-serialisable copy."""
        out = asdict(self)
        out["tasks"] = list(self.tasks)
        return out


def check_alphas(alphas: Sequence[float]) -> list[float]:
    """Validate a coefficient grid: finite, strictly increasing, at least one value."""
    values = [float(a) for a in alphas]
    if not values or not all(math.isfinite(a) for a in values):
        raise ValueError(f"alphas must be a non-empty list of finite numbers, got {list(alphas)!r}.")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"alphas must be strictly increasing (for the heatmap axes), got {values!r}; sort them.")
    return values


def weight_disentanglement(
    model: nn.Module,
    base_state: Mapping[str, Tensor],
    task_vectors: Sequence[Mapping[str, Tensor]],
    data: Mapping[str, Sequence[Batch]],
    logits_fn: LogitsFn,
    *,
    tasks: Sequence[str],
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    others: Sequence[Mapping[str, Tensor]] = (),
    others_scale: float = DEFAULT_OTHERS_SCALE,
    reference_includes_others: bool = False,
    progress: bool = True,
) -> PairGrid:
    """ξ(α₁, α₂) and L(θ; D₁) + L(θ; D₂) at θ = θ₀ + α₁τ₁ + α₂τ₂ (+ λ Σ_others τ_k) over ``alphas``².

    With ``others``, the merged model carries the other tasks at ``others_scale`` (the SAFT paper's
    "eight-task-merged" view). By default it is compared with the single-task model θ₀ + α_tτ_t, which
    is eq. 5 of Ortiz-Jimenez et al. applied to all tasks with the others held at λ: ξ then counts
    interference from every task. ``reference_includes_others=True`` compares with
    θ₀ + α_tτ_t + λΣτ_k instead, isolating the pair's interference inside the merge.
    The model is evaluated in eval mode and left at θ₀.
    """
    if len(task_vectors) != 2 or len(tasks) != 2:
        raise ValueError(
            f"weight_disentanglement needs exactly two task vectors and two task names, got "
            f"{len(task_vectors)} vectors and tasks={list(tasks)!r}."
        )
    missing = [task for task in tasks if task not in data]
    if missing:
        raise KeyError(f"no evaluation data for task(s) {missing}; data has {sorted(data)}.")
    values = check_alphas(alphas)
    taus = [materialise(tv) for tv in task_vectors]
    extra = [sum_vectors(others)] if others else []
    extra_scales = [float(others_scale)] * len(extra)
    ref_extra, ref_scales = (extra, extra_scales) if reference_includes_others else ([], [])
    n = len(values)
    bar = tqdm(total=2 * n + n * n, desc="disentanglement grid", unit="pt", disable=not progress)
    with at_base_afterwards(model, base_state), bar:
        # Single-task predictions depend only on α_t: computed once per (task, α), not per grid point.
        reference: dict[tuple[int, int], Tensor] = {}
        for t, (task, tau) in enumerate(zip(tasks, taus)):
            for k, alpha in enumerate(values):
                add_scaled_(model, base_state, [tau, *ref_extra], [alpha, *ref_scales])
                reference[t, k] = evaluate_task(model, data[task], logits_fn, task)[0]
                bar.update()
        xi_t = torch.zeros(2, n, n, dtype=torch.float64)
        loss_t = torch.zeros(2, n, n, dtype=torch.float64)
        for i, alpha_1 in enumerate(values):
            for j, alpha_2 in enumerate(values):
                add_scaled_(model, base_state, [*taus, *extra], [alpha_1, alpha_2, *extra_scales])
                for t, task in enumerate(tasks):
                    predictions, loss = evaluate_task(model, data[task], logits_fn, task)
                    single = reference[t, i if t == 0 else j]
                    xi_t[t, i, j] = (predictions != single).double().mean()
                    loss_t[t, i, j] = loss
                bar.update()
    return PairGrid(
        tasks=(tasks[0], tasks[1]),
        alphas=values,
        xi=xi_t.sum(0).tolist(),
        xi_per_task={task: xi_t[t].tolist() for t, task in enumerate(tasks)},
        joint_loss=loss_t.sum(0).tolist(),
        loss_per_task={task: loss_t[t].tolist() for t, task in enumerate(tasks)},
        num_samples={task: len(reference[t, 0]) for t, task in enumerate(tasks)},
        others_scale=float(others_scale) if others else None,
        num_others=len(others),
        reference_includes_others=bool(reference_includes_others and others),
    )
