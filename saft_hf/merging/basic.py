"""Linear merges: weight averaging and task arithmetic, one parameter at a time."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from .registry import register_method, scaling_param
from .streaming import TensorReader, iter_names


def _summed(vectors: Sequence[Mapping[str, Tensor]], factor: float, progress: bool, desc: str) -> dict[str, Tensor]:
    """factor · Σ_i τ_i in float32, computed tensor by tensor (``merge`` casts the result)."""
    reader = TensorReader(vectors)
    merged: dict[str, Tensor] = {}
    for name in iter_names(list(vectors[0].keys()), progress, desc):
        tensors = reader.read(name)
        total = tensors[0].clone()
        for tensor in tensors[1:]:
            total += tensor
        merged[name] = total.mul_(factor)
    return merged


@register_method(
    "weight_average",
    paper="Wortsman et al. 2022, model soups",
    summary="mean of the fine-tuned models: merged τ = (1/n) Σ τ_i (no λ)",
)
def weight_average(vectors: Sequence[Mapping[str, Tensor]], *, progress: bool = False) -> dict[str, Tensor]:
    """Uniform average of the fine-tuned weights, expressed as a task vector: mean of the τ_i."""
    return _summed(vectors, 1.0 / len(vectors), progress, "weight_average")


@register_method(
    "task_arithmetic",
    params=[scaling_param(0.3)],
    paper="Ilharco et al. 2023, Editing Models with Task Arithmetic",
    summary="merged τ = λ Σ τ_i",
)
def task_arithmetic(
    vectors: Sequence[Mapping[str, Tensor]], *, scaling: float = 0.3, progress: bool = False
) -> dict[str, Tensor]:
    """Task arithmetic (Ilharco et al. 2023, eq. 1): the scaled sum of the task vectors."""
    return _summed(vectors, scaling, progress, "task_arithmetic")
