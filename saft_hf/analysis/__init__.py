"""The SAFT paper's diagnostics: weight disentanglement, joint-task loss maps, cross-task linearity."""

from .disentanglement import DEFAULT_ALPHAS, DEFAULT_OTHERS_SCALE, PairGrid, weight_disentanglement
from .evaluation import block_outputs, evaluate_task, heads_logits_fn, image_embeds, prepare_eval_data
from .linearity import DEFAULT_CTL_LAMBDA, cross_task_linearity
from .plots import DEFAULT_SEARCH_REGION, plot_coefficients, plot_ctl, plot_heatmaps
from .report import analyze_pairs, summarize, write_report

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
