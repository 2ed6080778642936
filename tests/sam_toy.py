"""A tiny model, data and a hand-written SAM/ASAM reference, shared by the trainer tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
from datasets import Dataset
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

IN, HIDDEN, CLASSES = 6, 8, 3


class ToyClassifier(nn.Module):
    """Two-layer MLP returning a Trainer-style output (loss, logits)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(IN, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        logits = self.fc2(torch.tanh(self.norm(self.fc1(x))))
        loss = nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def toy_dataset(n: int = 32, seed: int = 1) -> Dataset:
    """Linearly separable-ish data so that the loss can fall."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g)
    labels = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return Dataset.from_dict({"x": x.tolist(), "labels": labels.tolist()}).with_format("torch")


def micro_batches(dataset: Dataset, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """The batches a sequential sampler yields, in order."""
    return [dataset[i : i + batch_size] for i in range(0, len(dataset), batch_size)]


def reference_sam(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    *,
    steps: int,
    accumulation: int,
    rho: float,
    lr: float,
    adaptive: bool = False,
    eta: float = 0.01,
    interval: int = 1,
    looksam_alpha: float | None = None,
    perturb: Callable[[str], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """SAM/ASAM with plain SGD written out by hand: per-micro-batch perturbation, summed descent grads.

    ``interval`` k: SAM on steps 0, k, 2k, ... and plain gradient steps otherwise (SAM-k, Liu et al. 2022).
    ``looksam_alpha``: LookSAM (Liu et al. 2022, Alg. 1) instead of plain steps in between, in float64 on
    the flattened step gradients g = sum_i grad L_i(w), g_s = sum_i grad L_i(w + eps_i) / accumulation:
    g_v = g_s - ||g_s|| cos(g, g_s) g / ||g||, then g_s = g + alpha ||g|| / ||g_v|| g_v in between.
    ``perturb(name)``: only those parameters get eps, the norm taken over them (SAM-ON, Mueller et al. 2023).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    perturbed = [perturb is None or perturb(n) for n, _ in named]
    it = iter(batches)
    g_v = None
    for step in range(steps):
        sam_step = step % interval == 0
        total = [torch.zeros_like(p) for p in params]
        plain_total = [torch.zeros_like(p) for p in params]
        for _ in range(accumulation):
            batch = next(it)
            grads = torch.autograd.grad(model(batch["x"], batch["labels"]).loss, params)
            if not sam_step:
                total = [t + g / accumulation for t, g in zip(total, grads)]
                continue
            plain_total = [t + g for t, g in zip(plain_total, grads)]
            # ASAM (Kwon et al. 2021): T = |w| + eta on weights, 1 on biases; SAM: T = 1.
            scales = [
                (p.detach().abs() + eta) if adaptive and n.endswith("weight") else torch.ones_like(p)
                for n, p in named
            ]
            norm = torch.sqrt(sum(((t * g) ** 2).sum() for t, g, keep in zip(scales, grads, perturbed) if keep))
            eps = [rho * t * t * g / norm if keep else torch.zeros_like(g) for t, g, keep in zip(scales, grads, perturbed)]
            with torch.no_grad():
                original = [p.clone() for p in params]
                for p, e in zip(params, eps):
                    p.add_(e)
            descent = torch.autograd.grad(model(batch["x"], batch["labels"]).loss / accumulation, params)
            with torch.no_grad():
                for p, o in zip(params, original):
                    p.copy_(o)
            total = [t + g for t, g in zip(total, descent)]
        if looksam_alpha is not None:
            flat = torch.cat([t.reshape(-1).double() for t in total])
            if sam_step:
                g = torch.cat([t.reshape(-1).double() for t in plain_total])
                cos = (g @ flat) / (g.norm() * flat.norm())
                g_v = flat - flat.norm() * cos * g / g.norm()
            else:
                flat = flat + looksam_alpha * flat.norm() / g_v.norm() * g_v
                sizes = [t.numel() for t in total]
                total = [c.view_as(t).to(t.dtype) for c, t in zip(flat.split(sizes), total)]
        with torch.no_grad():
            for p, g in zip(params, total):
                p.sub_(lr * g)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def sgd_args(output_dir: str, args_cls=None, **overrides):
    """SAMTrainingArguments (or ``args_cls``) for a reproducible plain-SGD run in the reference's order."""
    from saft_hf import SAMTrainingArguments

    args_cls = args_cls or SAMTrainingArguments

    kwargs = dict(
        output_dir=output_dir,
        optim="sgd",
        learning_rate=0.1,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=4,
        train_sampling_strategy="sequential",
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return args_cls(**kwargs)


class TinyCLIPClassifier(nn.Module):
    """A tiny HF CLIP vision tower with a fixed linear head: a real transformer for the trainer tests."""

    def __init__(self, seed: int = 0, num_classes: int = CLASSES) -> None:
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        super().__init__()
        torch.manual_seed(seed)
        config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=16, patch_size=8, projection_dim=16)
        self.tower = CLIPVisionModelWithProjection(config)
        self.register_buffer("head", torch.randn(num_classes, 16))

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        logits = self.tower(pixel_values=pixel_values).image_embeds @ self.head.T
        loss = nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def image_dataset(n: int = 16, seed: int = 2) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 3, 16, 16, generator=g)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    return Dataset.from_dict({"pixel_values": pixels.tolist(), "labels": labels.tolist()}).with_format("torch")
