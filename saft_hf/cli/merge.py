"""``saft-merge``: merge task vectors (Hub ids or folders) into one CLIP vision tower, optionally choosing λ.

Parsing and printing only; the work is in :mod:`saft_hf.pipeline`.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..pipeline import MergeJob

EXAMPLES = """\
examples:
  saft-merge --repos user/tv-cars,user/tv-dtd,user/tv-eurosat --method ties --scaling 1.0 --output merged/
  saft-merge --repos user/tv-cars,./tv-dtd --method task_arithmetic --search --eval \\
      --max-eval-samples 512 --output merged-ta/ --push-to-hub user/clip-merged-ta
  saft-merge --repos user/tv-cars,user/tv-dtd --method adamerging --method-arg ties=true --eval --output merged-ada/
"""


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",")]


def _grid(text: str) -> list[float]:
    """``start:stop:step`` (stop included) or a comma-separated list of λ values."""
    try:
        if ":" in text:
            start, stop, step = (float(part) for part in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError("need step > 0 and stop ≥ start")
            count = int(round((stop - start) / step)) + 1
            return [round(start + i * step, 10) for i in range(count)]
        return [float(item) for item in _items(text)]
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"bad --grid {text!r} ({err}); use start:stop:step like 0.05:1.0:0.05 or a list like 0.1,0.2,0.3."
        ) from err


def methods_epilog() -> str:
    """Every registered merge method, its paper and its parameters with defaults and help."""
    from ..merging import METHODS

    lines = ["merge methods (--method NAME, parameters with --method-arg KEY=VALUE, repeatable):"]
    for name in sorted(METHODS):
        spec = METHODS[name]
        grid = f"\n    --search grid: {spec.grid[0]}…{spec.grid[-1]}" if spec.grid else ""
        lines.append(textwrap.indent(spec.describe(), "  ") + grid)
    return "\n".join(lines) + "\n\n" + EXAMPLES


def build_parser() -> argparse.ArgumentParser:
    """The ``saft-merge`` argument parser; its epilog is generated from the merging registry."""
    parser = argparse.ArgumentParser(
        prog="saft-merge",
        description="Merge task vectors (saft-hf task-vector repos, full fine-tuned models or PEFT LoRA adapters; "
        "Hub ids or local folders, mixed) into the pre-trained CLIP vision tower, evaluate, save and push.",
        epilog=methods_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument("--repos", required=True, type=_items, help="comma-separated task vectors: a,b[,c...]")
    inputs.add_argument("--revisions", type=_items, help="one revision per repo (branch, tag or SHA); empty = default")
    inputs.add_argument("--base", help="pre-trained CLIP (Hub id or folder); default: recorded in the task vectors")
    inputs.add_argument("--base-revision", help="revision of --base (default: recorded in the task vectors)")
    merging = parser.add_argument_group("merging")
    merging.add_argument("--method", default="ties", help="merge method (see below; default: ties)")
    merging.add_argument(
        "--method-arg", action="append", default=[], metavar="KEY=VALUE",
        help="a parameter of the method, e.g. density=0.2 (repeatable)",
    )  # fmt: skip
    merging.add_argument("--scaling", type=float, help="fixed λ (> 0): merged τ is multiplied by it")
    merging.add_argument("--search", action="store_true", help="choose λ by mean validation accuracy")
    merging.add_argument("--grid", type=_grid, help="λ values for --search: 0.05:1.0:0.05 (default) or 0.1,0.3")
    merging.add_argument(
        "--select", choices=["absolute", "normalized"], default="absolute",
        help="--search score: mean accuracy, or mean accuracy / fine-tuned accuracy (default: absolute)",
    )  # fmt: skip
    merging.add_argument(
        "--adapt-split", choices=["test", "validation"],
        help="--method adamerging: split whose unlabeled inputs λ is learned on (labels never read; default: test, "
        "as in the paper)",
    )  # fmt: skip
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--eval", action="store_true", help="report accuracy per task on the test split")
    evaluation.add_argument("--data-dir", help="local task data, one folder per task (default: the Hub)")
    evaluation.add_argument("--max-eval-samples", type=int, help="evaluate at most this many examples per task")
    evaluation.add_argument("--batch-size", type=int, default=64, help="evaluation batch size (default: 64)")
    evaluation.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: cpu)")
    outputs = parser.add_argument_group("outputs")
    outputs.add_argument("--output", required=True, help="output folder (written atomically)")
    outputs.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    outputs.add_argument("--push-to-hub", metavar="REPO", help="upload the output folder to this Hub repo")
    outputs.add_argument("--private", action="store_true", default=None, help="create the --push-to-hub repo private")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return parser


def _job(args: argparse.Namespace) -> MergeJob:
    from ..merging import MergeError, parse_method_args
    from ..pipeline import MergeJob, MergeUsageError

    try:
        method_args = parse_method_args(args.method, args.method_arg)
    except MergeError as err:
        raise MergeUsageError(str(err)) from None
    return MergeJob(
        repos=args.repos, output=args.output, base=args.base, base_revision=args.base_revision,
        revisions=args.revisions, method=args.method, method_args=method_args, scaling=args.scaling,
        search=args.search, grid=args.grid, select=args.select, evaluate=args.eval, data_dir=args.data_dir,
        max_eval_samples=args.max_eval_samples, batch_size=args.batch_size, device=args.device,
        overwrite=args.overwrite, push_to_hub=args.push_to_hub, private=args.private,
        progress=not args.no_progress, adapt_split=args.adapt_split,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``saft-merge``: 0 on success, 2 for usage errors, 1 for other failures."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    from huggingface_hub.errors import HfHubHTTPError

    from ..pipeline import MergeUsageError, run_merge_job

    try:
        outcome = run_merge_job(_job(args))
    except MergeUsageError as err:
        if args.debug:
            raise
        parser.print_usage(sys.stderr)
        print(f"saft-merge: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, KeyError, OSError, HfHubHTTPError) as err:
        if args.debug:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"saft-merge: error: {message}", file=sys.stderr)
        return 1
    if outcome.search is not None:
        print(outcome.search.format_table())
        print(f"chosen λ = {outcome.search.best_scaling}")
    if outcome.adamerging is not None:
        entropy = outcome.adamerging.entropy
        print(f"adamerging: mean entropy {entropy[0]:.4f} → {entropy[-1]:.4f} over {len(entropy)} steps; "
              f"λ in {outcome.output / 'adamerging_coefficients.json'}")  # fmt: skip
    if outcome.report is not None:
        print(outcome.report.format_table())
    print(f"wrote {outcome.output}")
    if outcome.commit_url:
        print(f"pushed to {outcome.commit_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
