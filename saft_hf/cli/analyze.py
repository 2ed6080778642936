"""``saft-analyze``: weight disentanglement, joint-task loss and cross-task linearity of task-vector pairs.

Example::

    saft-analyze --base openai/clip-vit-base-patch32 --vectors user/tv-cars,user/tv-dtd \
        --compare user/saft-cars,user/saft-dtd --output analysis/cars-dtd --max-samples 256

Parsing and printing only; the work is in :mod:`saft_hf.analysis`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _names(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}.")
    return items


def _grid(text: str) -> list[float]:
    """``start:stop:num`` (inclusive linspace) or an explicit comma-separated list of coefficients."""
    try:
        if ":" in text:
            start, stop, num = text.split(":")
            return [round(float(a), 10) for a in np.linspace(float(start), float(stop), int(num))]
        return [float(item) for item in _names(text)]
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"bad --grid {text!r} ({err}); use start:stop:num like -0.5:1.5:9 or a list like 0,0.5,1."
        ) from err


def _region(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(item) for item in _names(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"bad --search-region {text!r}; use lo,hi like 0.05,1.0.") from err
    if not lo < hi:
        raise argparse.ArgumentTypeError(f"--search-region needs lo < hi, got {text!r}.")
    return lo, hi


def build_parser() -> argparse.ArgumentParser:
    """The ``saft-analyze`` argument parser."""
    from ..analysis import DEFAULT_ALPHAS, DEFAULT_CTL_LAMBDA, DEFAULT_OTHERS_SCALE, DEFAULT_SEARCH_REGION

    parser = argparse.ArgumentParser(
        prog="saft-analyze",
        description="Weight-disentanglement error, joint-task loss maps and cross-task linearity (SAFT paper "
        "diagnostics) for a pair of task vectors, optionally side by side with a second pair (e.g. SAFT).",
    )
    parser.add_argument("--base", required=True, help="pre-trained CLIP model: Hub id or local directory")
    parser.add_argument("--vectors", required=True, type=_names, help="two task-vector repos/dirs: a,b")
    parser.add_argument("--compare", type=_names, help="a second pair c,d (e.g. SAFT vectors) shown side by side")
    parser.add_argument("--labels", type=_names, default=["standard", "SAFT"], help="names of the two pairs")
    parser.add_argument("--tasks", type=_names, help="task names A,B (default: from the vectors' config)")
    parser.add_argument("--data-dir", help="local data root (one folder per task); default: the Hub")
    parser.add_argument("--split", default="test", help="evaluation split (default: test)")
    parser.add_argument("--others", type=_names, default=[], help="other tasks' vectors for the merged variant")
    parser.add_argument("--compare-others", type=_names, help="others for the --compare pair (default: --others)")
    parser.add_argument("--others-scale", type=float, default=DEFAULT_OTHERS_SCALE, help="coefficient λ of --others")
    parser.add_argument(
        "--reference-includes-others", action="store_true",
        help="compare with θ₀+α_tτ_t+λΣothers instead of the single-task model θ₀+α_tτ_t",
    )  # fmt: skip
    parser.add_argument(
        "--grid", type=_grid, default=list(DEFAULT_ALPHAS),
        help="coefficients α for both axes: start:stop:num or a list; write --grid=-0.5:1.5:9 when it starts with -",
    )  # fmt: skip
    parser.add_argument(
        "--search-region", type=_region, default=DEFAULT_SEARCH_REGION,
        help="square outlined on the heatmaps and summarised: lo,hi (default: 0.05,1.0)",
    )  # fmt: skip
    parser.add_argument("--ctl-lambda", type=float, default=DEFAULT_CTL_LAMBDA, help="λ of cross-task linearity")
    parser.add_argument("--no-ctl", action="store_true", help="skip cross-task linearity")
    parser.add_argument("--max-samples", type=int, help="evaluate at most this many examples per task")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output", required=True, help="output folder (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``saft-analyze``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if Path(args.output).exists() and not args.overwrite:
        parser.error(f"--output {args.output!r} already exists; pass --overwrite to replace it.")
    if args.max_samples is not None and args.max_samples < 1:
        parser.error(f"--max-samples must be positive, got {args.max_samples}.")
    labels = args.labels
    if len(labels) != 2 or labels[0] == labels[1]:
        parser.error(f"--labels needs two different names, got {args.labels!r}.")

    from ..analysis import analyze_pairs, block_outputs, summarize, write_report
    from ..analysis.inputs import load_analysis_inputs

    pairs = {labels[0]: args.vectors}
    others = {labels[0]: args.others} if args.others else {}
    if args.compare:
        pairs[labels[1]] = args.compare
        compare_others = args.compare_others if args.compare_others is not None else args.others
        if compare_others:
            others[labels[1]] = compare_others
    try:
        inputs = load_analysis_inputs(
            args.base, pairs, tasks=args.tasks, others=others, data_dir=args.data_dir, split=args.split,
            max_samples=args.max_samples, batch_size=args.batch_size,
        )  # fmt: skip
        report = analyze_pairs(
            inputs.model, inputs.base_state, inputs.pairs, inputs.data, inputs.logits_fns,
            tasks=inputs.tasks, alphas=args.grid, others=inputs.others, others_scale=args.others_scale,
            reference_includes_others=args.reference_includes_others,
            features_fn=None if args.no_ctl else block_outputs, ctl_lambda=args.ctl_lambda,
            progress=not args.no_progress,
        )  # fmt: skip
        summary = summarize(report, args.search_region)
        report = {**report, "summary": summary, "search_region": list(args.search_region)}
        output = write_report(report, args.output, overwrite=args.overwrite, search_region=args.search_region)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, OSError) as err:
        print(f"saft-analyze: error: {err}", file=sys.stderr)
        return 1
    samples = next(iter(report["pairs"].values()))["grid"]["num_samples"]
    print(f"tasks: {' + '.join(inputs.tasks)}; samples per task: {json.dumps(samples)}")
    lo, hi = args.search_region
    for label, row in summary.items():
        parts = [f"{key}={value:.4f}" for key, value in row.items() if key != "points"]
        print(f"{label}: inside [{lo}, {hi}]² ({int(row['points'])} points): {', '.join(parts)}")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
