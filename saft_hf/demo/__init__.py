"""`saft-demo`: an offline, CPU-sized analogue of the SAFT paper's eight-task merging benchmark.

A small CLIP vision tower is pre-trained on a pretext task and cached; eight procedurally generated
tasks are fine-tuned standard and SAFT (SAM) through `SAMTrainer`, saved as task vectors, merged
(task arithmetic, TIES, PCB) and analysed. Entry point: :func:`saft_hf.demo.pipeline.run_demo`.
"""

from .config import DemoArguments
from .spec import TASK_NAMES

__all__ = ["DemoArguments", "TASK_NAMES", "build_task", "run_demo"]


def __getattr__(name: str):  # noqa: ANN202  (torch, datasets and the trainer stack load on use, not on --help)
    if name == "run_demo":
        from .pipeline import run_demo

        return run_demo
    if name == "build_task":
        from .data import build_task

        return build_task
    raise AttributeError(f"module 'saft_hf.demo' has no attribute {name!r}")
