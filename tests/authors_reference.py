"""A hand transcription of the SAFT authors' training loop (BAIKLAB/SAFT-Merge sgd_saft/src/finetune.py + sam.py).

Plain PyTorch, in their order: ``loss.backward()`` per micro-batch, at the accumulation boundary
``clip_grad_norm_(params, clip)`` then ``optimizer.step()`` (AdamW) or ``SAM.step(closure)``
(first_step(zero_grad=True) -> closure on the last micro-batch -> second_step, which restores w and steps
AdamW), and no ``zero_grad`` anywhere else. Each quirk can be switched off to show the tests see it.
The learning rate is constant (their cosine_lr is not part of what this checks).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn


def authors_reference(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    *,
    steps: int,
    accumulation: int = 1,
    rho: float = 0.0,
    adaptive: bool = False,
    lr: float = 1e-2,
    weight_decay: float = 0.1,
    clip: float = 1.0,
    zero_grad: bool = False,  # True: the Q1 defect removed (zeroed after every step)
    clip_descent: bool = False,  # True: the Q2 quirk removed (the descent gradient clipped too)
    decay_all: bool = True,  # False: the Q4 quirk removed (no decay on biases / LayerNorm)
) -> dict[str, torch.Tensor]:
    """Final weights after ``steps`` optimizer steps of the authors' loop on ``batches`` (cycled in order)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_all:
        groups = [{"params": params, "weight_decay": weight_decay}]
    else:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        decay = [p for n, p in named if n.endswith("weight") and "norm" not in n]
        rest = [p for n, p in named if not (n.endswith("weight") and "norm" not in n)]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    stream = itertools.cycle(batches)

    def loss_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(batch["x"], batch["labels"]).loss

    for _ in range(steps):
        for _ in range(accumulation):
            batch = next(stream)
            loss_of(batch).backward()  # summed into whatever .grad holds
        torch.nn.utils.clip_grad_norm_(params, clip)
        if rho == 0:
            optimizer.step()
        else:
            with torch.no_grad():  # SAM.first_step (their sam.py): eps = rho * (|w|^2 if ASAM) * g / (||(|w|) g|| + 1e-12)
                norm = torch.norm(torch.stack([((p.abs() if adaptive else 1.0) * p.grad).norm(p=2) for p in params]), p=2)
                scale = rho / (norm + 1e-12)
                old = [p.detach().clone() for p in params]
                for p in params:
                    p.add_((p.pow(2) if adaptive else 1.0) * p.grad * scale)
            optimizer.zero_grad()  # first_step(zero_grad=True)
            loss_of(batch).backward()  # closure() on the last micro-batch, at w + eps
            if clip_descent:
                torch.nn.utils.clip_grad_norm_(params, clip)
            with torch.no_grad():  # second_step: p.data = old_p, base_optimizer.step(), no zeroing
                for p, o in zip(params, old):
                    p.copy_(o)
            optimizer.step()
        if zero_grad:
            optimizer.zero_grad()
    return {n: p.detach().clone() for n, p in model.state_dict().items()}
