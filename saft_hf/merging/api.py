"""``merge``: validate the inputs once, then run the registered method tensor by tensor."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .registry import MergeError, get_method
from .streaming import check_vectors, input_dtypes


def merge(
    vectors: Sequence[Mapping[str, Tensor]],
    method: str = "ties",
    *,
    progress: bool = False,
    dtype: torch.dtype | None = None,
    **method_args: Any,
) -> dict[str, Tensor]:
    """Merge task vectors (dicts or TaskVectors) with a registered method; returns the merged τ.

    ``method_args`` are the method's declared parameters (``scaling`` = λ, ``density`` = kept
    fraction, as in PEFT); unknown or ill-typed ones raise a MergeError listing the valid ones.
    Methods compute and return float32; the result is cast once at the end, to ``dtype`` when given,
    else to task vector 0's dtype per tensor (so fp16 inputs with ``dtype=torch.float32`` give the
    exact float32 result, never one rounded to fp16 first).
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise MergeError(f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}.")
    spec = get_method(method)
    args = spec.resolve(method_args)
    check_vectors(vectors)
    merged = spec.fn(list(vectors), progress=progress, **args)
    targets = dict.fromkeys(merged, dtype) if dtype is not None else input_dtypes(vectors[0], merged)
    return {name: tensor.to(targets[name]) for name, tensor in merged.items()}
