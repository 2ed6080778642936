"""Option syntax shared by the command-line tools: lists, coefficient grids and output paths.

Kept free of torch and transformers so that ``--help`` and argument errors come back at once.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

GRID_SYNTAX = "start:stop:step (stop included) like 0.05:1.0:0.05, or a list like 0.1,0.3,0.5"


def attach_negative_values(argv: Sequence[str], options: Sequence[str]) -> list[str]:
    """``--grid -0.5:1.5:0.25`` → ``--grid=-0.5:1.5:0.25``: argparse takes a value starting with ``-`` for an option."""
    out: list[str] = []
    items = list(argv)
    index = 0
    while index < len(items):
        item = items[index]
        following = items[index + 1] if index + 1 < len(items) else ""
        if item in options and len(following) > 1 and following[0] == "-" and (following[1].isdigit() or following[1] == "."):
            out.append(f"{item}={following}")
            index += 2
            continue
        out.append(item)
        index += 1
    return out


def comma_list(text: str) -> list[str]:
    """Split ``a,b,c`` into stripped items; an empty item is an error."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list like a,b, got {text!r}.")
    return items


def _grid_range(text: str, start: float, stop: float, step: float) -> list[float]:
    if not all(math.isfinite(v) for v in (start, stop, step)):
        raise ValueError("start, stop and step must be finite numbers")
    if step <= 0:
        raise ValueError(f"the step must be > 0, got {step:g}")
    if stop < start:
        raise ValueError(f"stop {stop:g} is below start {start:g}")
    intervals = (stop - start) / step
    count = round(intervals)
    if abs(intervals - count) > 1e-6 * max(1.0, intervals):
        hint = ""
        if step >= 2 and step == int(step):  # e.g. 0.05:1.0:20 written as start:stop:num
            num = int(step)
            hint = (
                f"; the third number is a step, not a count: for {num} values from {start:g} to {stop:g} write "
                f"{start:g}:{stop:g}:{(stop - start) / (num - 1):g}"
            )
        raise ValueError(f"steps of {step:g} from {start:g} do not land on stop {stop:g}{hint}")
    if count + 1 > 10_000:
        raise ValueError(f"{count + 1} values is too many; use a larger step")
    return [round(start + i * step, 10) for i in range(count + 1)]


def parse_grid(text: str) -> list[float]:
    """The one coefficient-grid syntax of every command: ``start:stop:step`` or ``a,b,c``."""
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) != 3:
                raise ValueError("a range needs exactly three numbers")
            start, stop, step = (float(part) for part in parts)
            return _grid_range(text, start, stop, step)
        values = [float(item) for item in comma_list(text)]
        if not all(math.isfinite(v) for v in values):
            raise ValueError("values must be finite numbers")
        return values
    except (ValueError, argparse.ArgumentTypeError) as err:
        raise argparse.ArgumentTypeError(f"bad grid {text!r} ({err}); use {GRID_SYNTAX}.") from None


def unwritable_output(output: str | os.PathLike) -> str | None:
    """Why ``output`` cannot be created (its nearest existing parent is not a writable folder), or None.

    Probed by creating and removing a temporary folder there, which is what the atomic write does.
    """
    parent = Path(os.path.abspath(output)).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"the output's parent {str(parent)!r} is not a folder; choose another output path."
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".saft-write-check.", dir=parent))
    except OSError as err:
        reason = err.strerror or type(err).__name__
        return (
            f"cannot write the output {str(output)!r}: its parent folder {str(parent)!r} is not writable "
            f"({reason}); choose an output under a folder you can write to."
        )
    return None


def disable_library_progress_bars() -> None:
    """``--no-progress``: also silence the bars transformers, huggingface_hub and datasets draw themselves."""
    import datasets
    import huggingface_hub
    import transformers

    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    datasets.disable_progress_bars()
