"""`saft-demo`: the offline, CPU-sized SAFT-vs-standard merging benchmark (parsing and printing only)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from transformers import HfArgumentParser

from ..demo.config import DEMO_METHODS, PRESETS, DemoArguments


def parse_args(argv: Sequence[str] | None = None) -> DemoArguments:
    """`DemoArguments` from the command line (`--sam-rho` and `--sam_rho` both work)."""
    parser = HfArgumentParser(
        DemoArguments,
        description="Offline, CPU-sized SAFT benchmark: pre-train (or load from cache) a small CLIP-style vision "
        "tower, fine-tune eight small tasks with AdamW and with SAMTrainer, merge their task vectors with every method "
        f"of --methods (default: {', '.join(DEMO_METHODS)}), and write the accuracy table, results.json and the "
        "analysis figures to --output.",
        epilog="Example: saft-demo --seeds 3 --output saft-demo-3seeds",
    )
    _describe_negations(parser)
    argv = list(argv) if argv is not None else sys.argv[1:]
    preset, _ = _preset_parser().parse_known_args(argv)
    parser.set_defaults(**PRESETS[preset.preset])  # explicit flags still win over the preset's defaults
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return args


def _preset_parser() -> argparse.ArgumentParser:
    """Reads only --preset, so its bundle of defaults can be applied before the full parse."""
    pre = argparse.ArgumentParser(prog="saft-demo", add_help=False)
    pre.add_argument("--preset", default="default", choices=list(PRESETS))
    return pre


NEGATION_HELP = {"progress": "Hide the progress bars (for logs and CI)."}


def _describe_negations(parser: HfArgumentParser) -> None:
    """HfArgumentParser gives ``--no_X`` the help of ``--X`` (``--no_progress``: "Show ... bars"); fix that."""
    for action in parser._actions:
        if action.option_strings and action.option_strings[0].startswith("--no_"):
            name = action.option_strings[0][len("--no_") :]
            action.help = NEGATION_HELP.get(name, f"Set --{name} to false.")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo and print its tables; the output folder holds results.json, results.md and figures."""
    try:
        args = parse_args(argv)
    except ValueError as error:  # bad values are reported by DemoArguments.__post_init__
        print(f"saft-demo: error: {error}", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    from ..demo.pipeline import combine_outputs, run_demo  # heavy imports only once the arguments are valid

    hf_logging.disable_progress_bar()  # per-load "Loading weights" bars; the demo draws its own

    if args.combine:
        try:
            results = combine_outputs(args)
        except (FileExistsError, FileNotFoundError, ValueError) as error:
            print(f"saft-demo: error: {error}", file=sys.stderr)
            return 2
        print(results["table"])
        print(f"\nWrote {args.output}/results.json and results.md ({len(results['seeds'])} seeds).")
        return 0
    try:
        results = run_demo(args)
    except FileExistsError as error:
        print(f"saft-demo: error: {error}", file=sys.stderr)
        return 2
    print(results["table"])
    timings = results["timings_s"]
    print(
        f"\nbase: {'pre-trained now' if results['base']['pretrained_this_run'] else 'reused from cache'} "
        f"({results['base']['path']}, {timings['base']:.0f} s); total {timings['total']:.0f} s"
    )
    print(f"Wrote {args.output}/results.json, results.md, task_vectors/ and analysis/.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
