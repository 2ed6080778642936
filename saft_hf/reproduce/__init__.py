"""Pieces of ``examples/reproduce_saft.py``: stage markers and checkpoints, progress lines, the final report."""

from .progress import StageProgress, format_duration
from .report import format_table, plot_gains, summarize, write_report
from .stages import (
    MARKER_NAME,
    StageMismatchError,
    checkpoint_problem,
    fingerprint,
    latest_valid_checkpoint,
    read_marker,
    remove_checkpoints,
    write_marker,
)

__all__ = [
    "MARKER_NAME",
    "StageMismatchError",
    "StageProgress",
    "checkpoint_problem",
    "fingerprint",
    "format_duration",
    "format_table",
    "latest_valid_checkpoint",
    "plot_gains",
    "read_marker",
    "remove_checkpoints",
    "summarize",
    "write_marker",
    "write_report",
]
