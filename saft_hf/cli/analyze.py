"""``saft-analyze``: weight disentanglement, joint-task loss and cross-task linearity of task-vector pairs.

Example::

    saft-analyze --base openai/clip-vit-base-patch32 --vectors user/tv-cars,user/tv-dtd \
        --compare user/saft-cars,user/saft-dtd --output analysis/cars-dtd --max-samples 256 --grid 0:1:0.25

Parsing and printing only; the work is in :mod:`saft_hf.analysis`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .options import (
    GRID_SYNTAX,
    attach_negative_values,
    comma_list,
    disable_library_progress_bars,
    parse_grid,
    unwritable_output,
)


def _region(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(item) for item in comma_list(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"bad --search-region {text!r}; use lo,hi like 0.05,1.0.") from err
    if not lo < hi:
        raise argparse.ArgumentTypeError(f"--search-region needs lo < hi, got {text!r}.")
    return lo, hi


def _missing_data_problem(data_dir: str | None) -> str | None:
    """Why the task data cannot be found before anything is loaded, or None."""
    from huggingface_hub import is_offline_mode

    from ..tasks import DATA_DIR_ENV

    if data_dir is not None:
        if not Path(data_dir).is_dir():
            return f"--data-dir {data_dir!r} is not a folder; point it at the task data (one sub-folder per task)."
        return None
    datasets_offline = os.environ.get("HF_DATASETS_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    if not os.environ.get(DATA_DIR_ENV) and (is_offline_mode() or datasets_offline):
        return (
            f"saft-analyze evaluates on task data, but no --data-dir (or ${DATA_DIR_ENV}) is given and the Hub is "
            "offline; pass --data-dir DIR with one folder per task, or go online to load the datasets from the Hub."
        )
    return None


def build_parser() -> argparse.ArgumentParser:
    """The ``saft-analyze`` argument parser."""
    from ..analysis import DEFAULT_ALPHAS, DEFAULT_CTL_LAMBDA, DEFAULT_OTHERS_SCALE, DEFAULT_SEARCH_REGION

    parser = argparse.ArgumentParser(
        prog="saft-analyze",
        description="Weight-disentanglement error, joint-task loss maps and cross-task linearity (SAFT paper "
        "diagnostics) for a pair of task vectors, optionally side by side with a second pair (e.g. SAFT).",
    )
    parser.add_argument("--base", required=True, help="pre-trained CLIP model: Hub id or local directory")
    parser.add_argument("--vectors", required=True, type=comma_list, help="two task-vector repos/dirs: a,b")
    parser.add_argument("--compare", type=comma_list, help="a second pair c,d (e.g. SAFT vectors) shown side by side")
    parser.add_argument(
        "--labels", type=comma_list,
        help="names of the --vectors and --compare pairs in figures and results, e.g. standard,SAFT (default: the "
        "fine-tuning method each pair's task vectors record, e.g. standard, SAM, ASAM)",
    )  # fmt: skip
    parser.add_argument("--tasks", type=comma_list, help="task names A,B (default: from the vectors' config)")
    parser.add_argument(
        "--data-dir", help="local task data, one folder per task (default: $SAFT_DATA_DIR, else the Hub; required offline)"
    )
    parser.add_argument("--split", default="test", help="evaluation split (default: test)")
    parser.add_argument("--others", type=comma_list, default=[], help="other tasks' vectors for the merged variant")
    parser.add_argument("--compare-others", type=comma_list, help="others for the --compare pair (default: --others)")
    parser.add_argument("--others-scale", type=float, default=DEFAULT_OTHERS_SCALE, help="coefficient λ of --others")
    parser.add_argument(
        "--reference-includes-others", action="store_true",
        help="compare with θ₀+α_tτ_t+λΣothers instead of the single-task model θ₀+α_tτ_t",
    )  # fmt: skip
    parser.add_argument(
        "--grid", type=parse_grid, default=list(DEFAULT_ALPHAS), metavar="GRID",
        help=f"coefficients α for both axes: {GRID_SYNTAX}, negative values allowed "
        f"(default: {DEFAULT_ALPHAS[0]:g}:{DEFAULT_ALPHAS[-1]:g}:{DEFAULT_ALPHAS[1] - DEFAULT_ALPHAS[0]:g})",
    )  # fmt: skip
    parser.add_argument(
        "--search-region", type=_region, default=DEFAULT_SEARCH_REGION,
        help="square outlined on the heatmaps and summarised: lo,hi (default: 0.05,1.0)",
    )  # fmt: skip
    parser.add_argument("--ctl-lambda", type=float, default=DEFAULT_CTL_LAMBDA, help="λ of cross-task linearity")
    parser.add_argument("--no-ctl", action="store_true", help="skip cross-task linearity")
    parser.add_argument("--max-samples", type=int, help="evaluate at most this many examples per task")
    parser.add_argument("--batch-size", type=int, default=32, help="evaluation batch size (default: 32)")
    parser.add_argument(
        "--device", default="auto",
        help="torch device of the model: auto (CUDA when available, else CPU), cpu, cuda or cuda:N (default: auto)",
    )  # fmt: skip
    parser.add_argument(
        "--output", required=True, help="output folder, written to a temporary folder beside it and renamed when complete"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``saft-analyze``."""
    parser = build_parser()
    args = parser.parse_args(attach_negative_values(sys.argv[1:] if argv is None else argv, ("--grid",)))
    if Path(args.output).exists() and not args.overwrite:
        parser.error(f"--output {args.output!r} already exists; pass --overwrite to replace it.")
    if args.max_samples is not None and args.max_samples < 1:
        parser.error(f"--max-samples must be positive, got {args.max_samples}.")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be positive, got {args.batch_size}.")
    if args.labels is not None and (len(args.labels) != 2 or args.labels[0] == args.labels[1]):
        parser.error(f"--labels needs two different names, got {args.labels!r}.")
    problem = unwritable_output(args.output) or _missing_data_problem(args.data_dir)
    if problem is not None:
        parser.error(problem)
    from ..pipeline.evaluation import resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    if args.no_progress:
        disable_library_progress_bars()

    from ..analysis import analyze_pairs, block_outputs, summarize, write_report
    from ..analysis.inputs import load_analysis_inputs
    from ..analysis.report import pair_labels

    keys = ["--vectors", "--compare"]  # until the pairs are loaded and their recorded methods known
    pairs = {keys[0]: args.vectors}
    others = {keys[0]: args.others} if args.others else {}
    if args.compare:
        pairs[keys[1]] = args.compare
        compare_others = args.compare_others if args.compare_others is not None else args.others
        if compare_others:
            others[keys[1]] = compare_others
    try:
        inputs = load_analysis_inputs(
            args.base, pairs, tasks=args.tasks, others=others, data_dir=args.data_dir, split=args.split,
            max_samples=args.max_samples, batch_size=args.batch_size,
        )  # fmt: skip
        inputs.model.to(device)  # θ₀ stays on the CPU; add_scaled_ writes onto the model's device
        labels = args.labels or pair_labels(list(inputs.pairs.values()), list(inputs.pairs))
        rename = dict(zip(inputs.pairs, labels))
        inputs.pairs = {rename[k]: v for k, v in inputs.pairs.items()}
        inputs.logits_fns = {rename[k]: v for k, v in inputs.logits_fns.items()}
        inputs.others = {rename[k]: v for k, v in inputs.others.items()}
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
    except (ValueError, KeyError, OSError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"saft-analyze: error: {message}", file=sys.stderr)
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
