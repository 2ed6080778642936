"""Tiny CLIP vision towers for tests that need a model object (not a saved checkpoint) and a fine-tune of it."""

from __future__ import annotations

import copy

import torch
from torch import nn


def tiny_tower(seed: int = 0, num_hidden_layers: int = 2) -> nn.Module:
    """A random ``CLIPVisionModelWithProjection`` (hidden 32, image 32, patch 8, projection 16) in eval mode."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=num_hidden_layers, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=16,
    )  # fmt: skip
    return CLIPVisionModelWithProjection(config).eval()


def perturbed(model: nn.Module, seed: int, std: float = 0.01) -> nn.Module:
    """A copy of ``model`` with seeded Gaussian noise of ``std`` added to every parameter (a stand-in fine-tune)."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(std * torch.randn(param.shape, generator=generator))
    return other
