"""SAM and ASAM ascent step on plain tensors (no transformers import).

The Trainer glue in :mod:`saft_hf.trainer` calls these in the order
``first_step`` (w -> w + eps, keeping w) ... descent backward ... ``second_step`` (restore w).

References:
- SAM: Foret et al. 2021, "Sharpness-Aware Minimization for Efficiently Improving Generalization",
  eq. 2: eps = rho * g / ||g||_2, the norm taken over all perturbed parameters together.
- ASAM: Kwon et al. 2021, "ASAM: Adaptive Sharpness-Aware Minimization", eq. 9 with the element-wise
  normalisation operator T_w = |w| + eta of the authors' code: eps = rho * T^2 g / ||T g||_2.
- LookSAM: Liu et al. 2022, "Towards Efficient and Scalable Sharpness-Aware Minimization" (CVPR), Alg. 1:
  on a SAM step keep g_v, the part of the SAM gradient g_s orthogonal to the plain gradient g; in between,
  descend along g + alpha * ||g|| / ||g_v|| * g_v (one pass). ``looksam_direction`` / ``looksam_reuse``.
- SAM-ON: Mueller et al. 2023, "Normalization Layers Are All That Sharpness-Aware Minimization Needs"
  (NeurIPS): perturb only a subset of parameters, the norm taken over that subset (``select``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "adaptive_mask",
    "ascent_norm",
    "first_step",
    "looksam_direction",
    "looksam_reuse",
    "method_name",
    "second_step",
    "select",
]


def select(names: Sequence[str], include: Sequence[str] | None = None, exclude: Sequence[str] | None = None) -> list[bool]:
    """Which parameters SAM perturbs: names matching an ``include`` regex (all if None), minus ``exclude`` matches.

    Restricting the perturbation to the normalisation layers is SAM-ON (Mueller et al. 2023); the ascent
    norm is then taken over the selected parameters only, as there.
    """
    keep = [re.compile(p) for p in include] if include is not None else None
    drop = [re.compile(p) for p in exclude or []]
    return [
        (keep is None or any(p.search(name) for p in keep)) and not any(p.search(name) for p in drop)
        for name in names
    ]


def adaptive_mask(names: Sequence[str], scope: str = "weights") -> list[bool]:
    """Which parameters ASAM rescales by |w| + eta: names ending in ``weight`` (ASAM authors) or all."""
    if scope == "all":
        return [True] * len(names)
    if scope == "weights":
        return [name.endswith("weight") for name in names]
    raise ValueError(f"Unknown ASAM scope {scope!r}; expected 'weights' or 'all'.")


def method_name(rho: float, adaptive: bool) -> str:
    """How a run fine-tuned, as task-vector configs and reports record it: standard, SAM or ASAM."""
    return "standard" if rho == 0 else ("ASAM" if adaptive else "SAM")


def _scale(param: Tensor, adaptive: bool, eta: float) -> Tensor | None:
    """ASAM's operator T_w = |w| + eta for one tensor, in fp32 (None means T = 1, plain SAM).

    Built one tensor at a time so ASAM never holds a second full copy of the weights.
    """
    return param.detach().abs().float().add_(eta) if adaptive else None


@torch.no_grad()
def ascent_norm(
    params: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    adaptive: Sequence[bool] | None = None,
    eta: float = 0.01,
) -> Tensor:
    """||T g||_2 over all tensors together, computed in fp32 (T = 1 where ``adaptive`` is False)."""
    adaptive = list(adaptive) if adaptive is not None else [False] * len(params)
    plain = [g for g, a in zip(grads, adaptive, strict=True) if g is not None and not a]
    norms = list(torch._foreach_norm(plain, 2, dtype=torch.float32)) if plain else []
    for p, g, a in zip(params, grads, adaptive, strict=True):
        if g is not None and a:
            t = _scale(p, True, eta)
            norms.append(torch.linalg.vector_norm(t.mul_(g.float())))
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))


@torch.no_grad()
def first_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    rho: float,
    adaptive: Sequence[bool] | None = None,
    eta: float = 0.01,
    backup: Sequence[Tensor] | None = None,
) -> tuple[list[Tensor] | None, Tensor]:
    """Perturb ``params`` in place to w + eps; return (copies of w to restore, ascent norm).

    ``adaptive[i]`` selects ASAM's T = |w| + eta for parameter i (plain SAM when all False).
    When the norm is zero or not finite (e.g. an fp16 overflow) nothing is perturbed and
    ``None`` is returned in place of the copies, so the caller can count a skipped step.
    The gradients are consumed: ASAM scales fp32 ones by T^2 in place to save memory.
    ``backup``, when given, are buffers shaped like ``params`` that receive the copies: reusing them
    across steps saves allocating (and on CPU page-faulting) a full copy of the weights per micro-batch.
    When ``backup`` *is* ``grads`` (the same tensors), each gradient's storage takes the copy of its
    weight once the step is applied, so one buffer set serves as ascent gradient and backup.
    """
    adaptive = list(adaptive) if adaptive is not None else [False] * len(params)
    norm = ascent_norm(params, grads, adaptive, eta)
    if not torch.isfinite(norm) or norm.item() == 0.0:
        return None, norm
    if backup is not None and all(b is g for b, g in zip(backup, grads, strict=True)):
        return _perturb_into_gradients(params, grads, adaptive, eta, (rho / norm).item()), norm
    if backup is None:
        backup = [p.detach().clone() for p in params]
    else:
        backup = list(backup)
        torch._foreach_copy_(backup, [p.detach() for p in params])
    scale = (rho / norm).item()
    # eps = rho * T^2 g / ||T g||  (Kwon et al. 2021; T = 1 gives SAM, Foret et al. 2021)
    fused_params: list[Tensor] = []
    fused_steps: list[Tensor] = []
    for p, g, a in zip(params, grads, adaptive, strict=True):
        if g is None:
            continue
        t = _scale(p, a, eta)
        step = g if t is None else g.float().mul_(t.square_())
        if step.dtype == p.dtype and step.device == p.device:
            fused_params.append(p)
            fused_steps.append(step)
        else:
            p.add_((step.float() * scale).to(device=p.device, dtype=p.dtype))
    if fused_params:
        torch._foreach_add_(fused_params, fused_steps, alpha=scale)  # one pass: w += scale * T^2 g
    return backup, norm


def _perturb_into_gradients(
    params: Sequence[Tensor], grads: Sequence[Tensor | None], adaptive: Sequence[bool], eta: float, scale: float
) -> list[Tensor]:
    """w += scale * T^2 g, then g's storage <- the old w (bitwise), one tensor at a time via a scratch copy."""
    largest = max((p.numel() for p in params), default=0)
    scratch: dict[tuple[torch.dtype, torch.device], Tensor] = {}
    for p, g, a in zip(params, grads, adaptive, strict=True):
        if g is None or g.dtype != p.dtype or g.device != p.device or g.shape != p.shape:
            raise ValueError("backup=grads needs every gradient present and shaped, typed and placed like its weight")
        key = (p.dtype, p.device)
        if key not in scratch:
            scratch[key] = torch.empty(largest, dtype=p.dtype, device=p.device)
        old = scratch[key][: p.numel()].view_as(p).copy_(p)
        t = _scale(p, a, eta)
        step = g if t is None else g.float().mul_(t.square_())
        if step.dtype == p.dtype:
            p.add_(step, alpha=scale)
        else:
            p.add_((step.float() * scale).to(p.dtype))
        g.copy_(old)
    return list(grads)  # type: ignore[arg-type]


@torch.no_grad()
def second_step(params: Sequence[Tensor], backup: Sequence[Tensor]) -> None:
    """Put the original weights back bitwise (copy, never ``w - eps``, which rounds in low precision)."""
    torch._foreach_copy_(list(params), list(backup))


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """<a, b> over all elements, accumulated in fp32."""
    return torch.dot(a.reshape(-1).float(), b.reshape(-1).float())


@torch.no_grad()
def looksam_direction(sam_grads: Sequence[Tensor | None], plain_grads: Sequence[Tensor]) -> Tensor | None:
    """Overwrite ``plain_grads`` (g) with LookSAM's unit g_v / ||g_v||; return ||g_v||, or None if undefined.

    g_v = g_s - ||g_s|| cos(g, g_s) g / ||g|| = g_s - (<g_s, g> / ||g||^2) g: the part of the SAM gradient
    g_s orthogonal to the plain gradient g (Liu et al. 2022, Alg. 1), over all tensors together as in the
    paper (some unofficial implementations project tensor by tensor instead). A missing g_s counts as 0.
    Storing the unit direction makes the reuse step invariant to an fp16 loss scale. Returns None (and
    leaves ``plain_grads`` unspecified) when ||g|| or ||g_v|| is zero or not finite.
    """
    pairs = [(s, g) for s, g in zip(sam_grads, plain_grads, strict=True) if s is not None]
    g_sq = sum((_dot(g, g) for g in plain_grads), torch.zeros(()))
    s_dot_g = sum((_dot(s, g) for s, g in pairs), torch.zeros(()))
    if not (torch.isfinite(g_sq) and torch.isfinite(s_dot_g)) or g_sq.item() == 0.0:
        return None
    coef = (s_dot_g / g_sq).item()
    for s, g in zip(sam_grads, plain_grads, strict=True):
        g.mul_(-coef)
        if s is not None:
            g.add_(s.to(g.dtype))
    norm = ascent_norm(plain_grads, plain_grads)
    if not torch.isfinite(norm) or norm.item() == 0.0:
        return None
    torch._foreach_mul_(list(plain_grads), 1.0 / norm.item())
    return norm


@torch.no_grad()
def looksam_reuse(grads: Sequence[Tensor | None], direction: Sequence[Tensor], alpha: float) -> Tensor:
    """LookSAM's in-between step in place: g += alpha * ||g|| * u, u = g_v / ||g_v|| from the last SAM step.

    (Liu et al. 2022, Alg. 1: g_s = g + alpha ||g|| / ||g_v|| g_v.) Returns ||g|| in fp32; nothing changes
    when it is zero or not finite (e.g. an fp16 overflow, whose optimizer step the scaler skips anyway).
    """
    pairs = [(g, u) for g, u in zip(grads, direction, strict=True) if g is not None]
    norm = ascent_norm([g for g, _ in pairs], [g for g, _ in pairs])
    if pairs and torch.isfinite(norm) and norm.item() != 0.0:
        scale = alpha * norm.item()
        same = [(g, u) for g, u in pairs if g.dtype == u.dtype and g.device == u.device]
        if same:
            torch._foreach_add_([g for g, _ in same], [u for _, u in same], alpha=scale)
        for g, u in pairs:
            if g.dtype != u.dtype or g.device != u.device:
                g.add_((u.float() * scale).to(device=g.device, dtype=g.dtype))
    return norm
