"""The SAFT paper's diagnostics: weight disentanglement, joint-task loss maps, cross-task linearity.

Names load on first use (as transformers' lazy modules do), so ``saft-analyze --help`` and the
defaults it prints need no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .defaults import DEFAULT_ALPHAS, DEFAULT_CTL_LAMBDA, DEFAULT_OTHERS_SCALE, DEFAULT_SEARCH_REGION

_LAZY: dict[str, str] = {
    "PairGrid": "disentanglement",
    "weight_disentanglement": "disentanglement",
    "block_outputs": "evaluation",
    "evaluate_task": "evaluation",
    "heads_logits_fn": "evaluation",
    "image_embeds": "evaluation",
    "prepare_eval_data": "evaluation",
    "cross_task_linearity": "linearity",
    "plot_coefficients": "plots",
    "plot_ctl": "plots",
    "plot_heatmaps": "plots",
    "analyze_pairs": "report",
    "summarize": "report",
    "write_report": "report",
}

__all__ = [
    "DEFAULT_ALPHAS",
    "DEFAULT_CTL_LAMBDA",
    "DEFAULT_OTHERS_SCALE",
    "DEFAULT_SEARCH_REGION",
    "PairGrid",
    "analyze_pairs",
    "block_outputs",
    "cross_task_linearity",
    "evaluate_task",
    "heads_logits_fn",
    "image_embeds",
    "plot_coefficients",
    "plot_ctl",
    "plot_heatmaps",
    "prepare_eval_data",
    "summarize",
    "weight_disentanglement",
    "write_report",
]

if TYPE_CHECKING:
    from .disentanglement import PairGrid, weight_disentanglement
    from .evaluation import block_outputs, evaluate_task, heads_logits_fn, image_embeds, prepare_eval_data
    from .linearity import cross_task_linearity
    from .plots import plot_coefficients, plot_ctl, plot_heatmaps
    from .report import analyze_pairs, summarize, write_report


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
