"""Metrics shipped with saft-hf as ``evaluate`` modules, so they load with ``HF_HUB_OFFLINE=1``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["ACCURACY_PATH", "load_accuracy"]

ACCURACY_PATH = Path(__file__).parent / "accuracy"


def load_accuracy(**kwargs: Any) -> Any:
    """``evaluate.load`` on the shipped accuracy module (no Hub access); kwargs go to ``evaluate.load``."""
    import evaluate

    return evaluate.load(str(ACCURACY_PATH), **kwargs)
