"""DARE (Yu et al. 2024, "Language Models are Super Mario"): drop and rescale, then TA or TIES."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor

from .basic import task_arithmetic
from .registry import MethodParam, density_param, register_method, scaling_param
from .ties import ties


def tensor_seed(seed: int, index: int, name: str) -> int:
    """A 63-bit seed for one tensor of one task vector, independent of processing order and device."""
    digest = hashlib.sha256(f"{seed}\0{index}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def drop_and_rescale(tensor: Tensor, density: float, seed: int) -> Tensor:
    """Keep each entry with probability ``density`` and divide kept ones by it (DARE, eq. 2), in float32.

    The mask is drawn on the CPU from a generator seeded with ``seed``, so it is reproducible.
    """
    values = tensor.to(torch.float32)
    if density >= 1.0:
        return values
    generator = torch.Generator(device="cpu").manual_seed(seed)
    keep = torch.rand(tuple(values.shape), generator=generator) < density
    # multiply (not torch.where) so a NaN/inf in a dropped entry still surfaces in the finiteness check
    return values * (keep.to(values.device, torch.float32) / density)


class DroppedTaskVector(Mapping[str, Tensor]):
    """Lazy view of task vector ``index`` with DARE applied per tensor on read (float32 values)."""

    def __init__(self, vector: Mapping[str, Tensor], index: int, density: float, seed: int) -> None:
        self.vector, self.index, self.density, self.seed = vector, index, density, seed
        # the merge's TensorReader checks finiteness once on the dropped values (NaN/inf survive ×)
        self._read = getattr(vector, "read_unchecked", vector.__getitem__)

    def __getitem__(self, name: str) -> Tensor:
        tensor = self._read(name)
        if not tensor.is_floating_point():
            return tensor  # left for the TensorReader to reject with the vector's index
        return drop_and_rescale(tensor, self.density, tensor_seed(self.seed, self.index, name))

    def __iter__(self) -> Iterator[str]:
        return iter(self.vector.keys())

    def __len__(self) -> int:
        return len(self.vector)


@register_method(
    "dare",
    params=[
        density_param(0.5, "DARE keep probability 1 − p (PEFT naming); kept entries are divided by it"),
        MethodParam(
            "dare_base",
            "task_arithmetic",
            "merge applied after drop-and-rescale; 'ties' = sign election + disjoint mean, no further trim",
            choices=("task_arithmetic", "ties"),
        ),
        MethodParam("seed", 0, "seed of the per-tensor drop masks (same seed → same merge)"),
        scaling_param(0.3),
    ],
    paper="Yu et al. 2024, Language Models are Super Mario (ICML)",
    summary="random drop with rate p, rescale by 1/(1−p), then task arithmetic or TIES",
)
def dare(
    vectors: Sequence[Mapping[str, Tensor]],
    *,
    density: float = 0.5,
    dare_base: str = "task_arithmetic",
    seed: int = 0,
    scaling: float = 0.3,
    progress: bool = False,
) -> dict[str, Tensor]:
    """DARE then TA (λ Σ τ̂_i) or TIES without trimming (as PEFT's ``dare_ties``), τ̂_i the dropped vectors."""
    views = [DroppedTaskVector(v, i, density, seed) for i, v in enumerate(vectors)]
    if dare_base == "ties":
        merged = ties(views, density=1.0, scaling=scaling, progress=progress)
    else:
        merged = task_arithmetic(views, scaling=scaling, progress=progress)
    return merged
