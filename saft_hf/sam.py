"""SAM and ASAM ascent step on plain tensors (no transformers import).

The Trainer glue in :mod:`saft_hf.trainer` calls these in the order
``first_step`` (w -> w + eps, keeping w) ... descent backward ... ``second_step`` (restore w).

References:
- SAM: Foret et al. 2021, "Sharpness-Aware Minimization for Efficiently Improving Generalization",
  eq. 2: eps = rho * g / ||g||_2, the norm taken over all perturbed parameters together.
- ASAM: Kwon et al. 2021, "ASAM: Adaptive Sharpness-Aware Minimization", eq. 9 with the element-wise
  normalisation operator T_w = |w| + eta of the authors' code: eps = rho * T^2 g / ||T g||_2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["adaptive_mask", "ascent_norm", "first_step", "second_step"]


def adaptive_mask(names: Sequence[str], scope: str = "weights") -> list[bool]:
    """Which parameters ASAM rescales by |w| + eta: names ending in ``weight`` (ASAM authors) or all."""
    if scope == "all":
        return [True] * len(names)
    if scope == "weights":
        return [name.endswith("weight") for name in names]
    raise ValueError(f"Unknown ASAM scope {scope!r}; expected 'weights' or 'all'.")


def _scales(params: Sequence[Tensor], adaptive: Sequence[bool], eta: float) -> list[Tensor | None]:
    """The ASAM operator T_w = |w| + eta per tensor (None means T = 1, plain SAM)."""
    return [p.detach().abs().float().add_(eta) if a else None for p, a in zip(params, adaptive, strict=True)]


@torch.no_grad()
def ascent_norm(
    params: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    adaptive: Sequence[bool] | None = None,
    eta: float = 0.01,
) -> Tensor:
    """||T g||_2 over all tensors together, computed in fp32 (T = 1 where ``adaptive`` is False)."""
    adaptive = list(adaptive) if adaptive is not None else [False] * len(params)
    scaled = [
        g.float() if t is None else g.float() * t
        for g, t in zip(grads, _scales(params, adaptive, eta), strict=True)
        if g is not None
    ]
    if not scaled:
        return torch.zeros(())
    norms = torch._foreach_norm(scaled)
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))


@torch.no_grad()
def first_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    rho: float,
    adaptive: Sequence[bool] | None = None,
    eta: float = 0.01,
) -> tuple[list[Tensor] | None, Tensor]:
    """Perturb ``params`` in place to w + eps; return (copies of w to restore, ascent norm).

    ``adaptive[i]`` selects ASAM's T = |w| + eta for parameter i (plain SAM when all False).
    When the norm is zero or not finite (e.g. an fp16 overflow) nothing is perturbed and
    ``None`` is returned in place of the copies, so the caller can count a skipped step.
    The gradients are consumed: fp32 ones are overwritten with eps to save memory.
    """
    adaptive = list(adaptive) if adaptive is not None else [False] * len(params)
    norm = ascent_norm(params, grads, adaptive, eta)
    if not torch.isfinite(norm) or norm.item() == 0.0:
        return None, norm
    backup = [p.detach().clone() for p in params]
    moved = [(p, g, a) for p, g, a in zip(params, grads, adaptive, strict=True) if g is not None]
    # eps = rho * T^2 g / ||T g||  (T = 1 for plain SAM)
    eps = [g.float() for _, g, _ in moved]
    torch._foreach_mul_(eps, (rho / norm).item())
    for e, t in zip(eps, _scales([p for p, _, _ in moved], [a for _, _, a in moved], eta), strict=True):
        if t is not None:
            e.mul_(t.square_())
    torch._foreach_add_([p for p, _, _ in moved], [e.to(p.dtype) for (p, _, _), e in zip(moved, eps, strict=True)])
    return backup, norm


@torch.no_grad()
def second_step(params: Sequence[Tensor], backup: Sequence[Tensor]) -> None:
    """Put the original weights back bitwise (copy, never ``w - eps``, which rounds in low precision)."""
    torch._foreach_copy_(list(params), list(backup))
