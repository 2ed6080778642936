"""``saft-merge``: merge task vectors (Hub ids or folders) into one CLIP vision tower, optionally choosing λ.

Parsing and printing only; the work is in :mod:`saft_hf.pipeline`.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .options import GRID_SYNTAX, comma_list, disable_library_progress_bars, parse_grid, unwritable_output

if TYPE_CHECKING:
    from ..pipeline import MergeJob

EPILOG = """\
merge methods: task_arithmetic, ties, pcb, dare, weight_average, tsv_m, iso_c, iso_cts, adamerging;
  `saft-merge --list-methods` prints each one's paper and parameters (it loads torch: a few seconds).

examples:
  saft-merge --repos user/tv-cars,user/tv-dtd,user/tv-eurosat --method ties --scaling 1.0 --output merged/
  saft-merge --repos user/tv-cars,./tv-dtd --method task_arithmetic --search --eval \\
      --max-eval-samples 512 --output merged-ta/ --push-to-hub user/clip-merged-ta
  saft-merge --repos user/tv-cars,user/tv-dtd --method adamerging --method-arg ties=true --eval --output merged-ada/
  saft-merge --repos user/tv-cars,user/tv-dtd --revisions v1.0,main --method ties --search \\
      --grid 0.1:1.0:0.1 --select normalized --data-dir data/ --output merged-ties/ --no-progress
"""


def _revisions(text: str) -> list[str]:
    """Comma-separated revisions, one per repo; an empty entry means the repo's default branch."""
    return [item.strip() for item in text.split(",")]



class ListMethods(argparse.Action):
    """``--list-methods``: print every registered merge method with its paper and parameters, then exit."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)  # type: ignore[arg-type]

    def __call__(self, parser: argparse.ArgumentParser, namespace: object, values: object, option: object = None) -> None:
        print(methods_help())
        parser.exit()


def methods_help() -> str:
    """Every registered merge method, its paper and its parameters with defaults and help (imports torch)."""
    from ..merging import METHODS

    lines = ["merge methods (--method NAME, parameters with --method-arg KEY=VALUE, repeatable):"]
    for name in sorted(METHODS):
        spec = METHODS[name]
        grid = f"\n    --search grid: {spec.grid[0]}…{spec.grid[-1]}" if spec.grid else ""
        lines.append(textwrap.indent(spec.describe(), "  ") + grid)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The ``saft-merge`` argument parser (no torch import: ``--help`` and usage errors are instant)."""
    parser = argparse.ArgumentParser(
        prog="saft-merge",
        description="Merge task vectors (saft-hf task-vector repos, full fine-tuned models or PEFT LoRA adapters; "
        "Hub ids or local folders, mixed) into the pre-trained CLIP vision tower, evaluate, save and push.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--list-methods", action=ListMethods, help="print the merge methods and their parameters, exit")
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument(
        "--repos", required=True, type=comma_list,
        help="comma-separated task vectors a,b[,c...]: Hub ids or local folders of saft-hf task vectors, full "
        "fine-tuned CLIP vision models or PEFT LoRA adapters",
    )  # fmt: skip
    inputs.add_argument(
        "--revisions", type=_revisions,
        help="one revision per repo, comma-separated, in the order of --repos (branch, tag or commit SHA; an empty "
        "entry, as in v1,,main, means that repo's default branch)",
    )  # fmt: skip
    inputs.add_argument(
        "--tasks", type=comma_list,
        help="the task of each repo, comma-separated, in the order of --repos (e.g. Cars,DTD); needed for repos that "
        "record none, unless the repo is named like FusionBench's (…_stanford-cars, …_dtd)",
    )  # fmt: skip
    inputs.add_argument(
        "--base",
        help="pre-trained CLIP (Hub id or folder; read from model.safetensors, else the Hub's safetensors conversion "
        "branch, else pytorch_model.bin through transformers' weights_only loader); default: recorded in the vectors",
    )  # fmt: skip
    inputs.add_argument("--base-revision", help="revision of --base (default: recorded in the task vectors)")
    merging = parser.add_argument_group("merging")
    merging.add_argument("--method", default="ties", help="merge method (--list-methods shows them; default: ties)")
    merging.add_argument(
        "--method-arg", action="append", default=[], metavar="KEY=VALUE",
        help="a parameter of the method, e.g. density=0.2 (repeatable)",
    )  # fmt: skip
    merging.add_argument("--scaling", type=float, help="fixed λ (> 0): merged τ is multiplied by it")
    merging.add_argument(
        "--search", action="store_true",
        help="choose λ on the tasks' validation splits (needs task data: --data-dir or the Hub)",
    )  # fmt: skip
    merging.add_argument(
        "--grid", type=parse_grid, metavar="GRID",
        help=f"λ values for --search, at least two: {GRID_SYNTAX} (default: the method's grid, 0.05:1.0:0.05)",
    )  # fmt: skip
    merging.add_argument(
        "--select", choices=["absolute", "normalized", "per-task"], default="absolute",
        help="--search score: mean validation accuracy (absolute), or mean of validation accuracy / the "
        "fine-tuned model's validation accuracy recorded in each task vector (normalized; falls back to "
        "absolute, and says so, when a vector records none) (default: absolute). per-task: the SAFT paper's "
        "released protocol, each task's own λ on its own validation split (task_arithmetic/ties: their grid "
        "0.1,0.3,0.5,0.7,0.9,1.0; ties also density 0.3/0.2/0.1 = their mask rates 0.7/0.8/0.9) - NOT one "
        "merged model: writes the choices and accuracies, no weights",
    )  # fmt: skip
    merging.add_argument(
        "--adapt-split", choices=["test", "validation"],
        help="--method adamerging: split whose unlabeled inputs λ is learned on (labels never read; default: test, "
        "as in the paper)",
    )  # fmt: skip
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument(
        "--eval", action="store_true",
        help="report test accuracy per task, also normalised by the fine-tuned test accuracy the vectors record",
    )  # fmt: skip
    evaluation.add_argument(
        "--data-dir", help="local task data, one folder per task (default: $SAFT_DATA_DIR, else the Hub)"
    )
    evaluation.add_argument("--max-eval-samples", type=int, help="evaluate at most this many examples per task")
    evaluation.add_argument("--batch-size", type=int, default=128, help="evaluation batch size (default: 128)")
    evaluation.add_argument(
        "--device", default="auto",
        help="torch device for merging, λ search, evaluation and AdaMerging: auto (CUDA when available, else "
        "CPU), cpu, cuda or cuda:N (default: auto)",
    )  # fmt: skip
    outputs = parser.add_argument_group("outputs")
    outputs.add_argument(
        "--output", required=True,
        help="output folder, written to a temporary folder beside it and renamed when complete",
    )  # fmt: skip
    outputs.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    outputs.add_argument("--push-to-hub", metavar="REPO", help="upload the output folder to this Hub repo")
    outputs.add_argument("--private", action="store_true", default=None, help="create the --push-to-hub repo private")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars (e.g. in logs and CI)")
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
        revisions=args.revisions, tasks=args.tasks, method=args.method, method_args=method_args, scaling=args.scaling,
        search=args.search, grid=args.grid, select=args.select, evaluate=args.eval, data_dir=args.data_dir,
        max_eval_samples=args.max_eval_samples, batch_size=args.batch_size, device=args.device,
        overwrite=args.overwrite, push_to_hub=args.push_to_hub, private=args.private,
        progress=not args.no_progress, adapt_split=args.adapt_split,
    )  # fmt: skip


def _interrupted(output: str, existed: bool) -> int:
    """One line on Ctrl-C instead of a traceback; exit status 130 (128 + SIGINT), as shells expect."""
    if not existed and Path(output).exists():
        where = f"{output!r} was written before the interrupt; the Hub upload, if any, did not finish"
    else:
        where = f"{output!r} was not written or changed"
    print(f"saft-merge: interrupted (Ctrl-C); {where}.", file=sys.stderr)
    return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``saft-merge``: 0 on success, 2 for usage errors, 1 for other failures, 130 on Ctrl-C."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    existed = Path(args.output).exists()
    try:
        return _run(parser, args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        return _interrupted(args.output, existed)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    problem = unwritable_output(args.output)
    if problem is not None:
        parser.print_usage(sys.stderr)
        print(f"saft-merge: error: {problem}", file=sys.stderr)
        return 2
    if args.no_progress:
        disable_library_progress_bars()
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
    for note in outcome.notes:
        print(f"note: {note}")
    if outcome.results.get("selection") == "per-task":
        for task, choice in outcome.results["per_task"].items():
            print(f"{task}: λ = {choice['scaling']:g} {choice['method_args'] or ''}".rstrip())
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
