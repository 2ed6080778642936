"""saft-hf: sharpness-aware fine-tuning and task-vector merging for the Hugging Face stack.

Public names are imported lazily (as transformers does) so that ``import saft_hf`` stays cheap
and the SAM math can be used without loading transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_LAZY: dict[str, str] = {
    "SAMTrainer": "trainer",
    "SAMTrainingArguments": "trainer",
    "TaskVector": "task_vectors",
    "add_scaled_": "task_vectors",
    "check_compatible": "task_vectors",
    "TaskVectorError": "task_vectors",
    "IncompatibleTaskVectorError": "task_vectors",
    "CorruptedTaskVectorError": "task_vectors",
    "provenance_config": "task_vector_io",
    "load_task_vector": "task_vectors",
    "load_task_vectors": "task_vectors",
    "load_base_state": "task_vectors",
    # base models, read as transformers reads them
    "BaseCheckpoint": "base_model",
    "resolve_base": "base_model",
    "load_base_vision_tower": "base_model",
    "push_task_vector": "hub",
    "make_model_card": "hub",
    # CLIP on the merging tasks
    "TASKS": "tasks",
    "TaskSpec": "tasks",
    "load_task": "tasks",
    "register_task": "tasks",
    "PixelNormalizer": "tasks",
    "default_num_workers": "tasks",
    "ZeroShotHead": "clip",
    "build_zero_shot_head": "clip",
    "CLIPImageClassifier": "clip",
    "load_vision_tower": "clip",
    "load_clip_model": "clip",
    "evaluate_accuracy": "clip",
    "collate_image_batch": "clip",
    # merging
    "merge": "merging",
    "search_coefficients": "merging",
    "adamerging_coefficients": "merging",
    "AdaMergingResult": "merging",
    "MergeJob": "pipeline",
    "run_merge_job": "pipeline",
    "resolve_device": "pipeline",
    # analysis
    "weight_disentanglement": "analysis",
    "cross_task_linearity": "analysis",
    "analyze_pairs": "analysis",
    # atomic outputs
    "atomic_output_dir": "io_utils",
    # resumable reproduction (examples/reproduce_saft.py)
    "StageProgress": "reproduce",
    "read_marker": "reproduce",
    "write_marker": "reproduce",
    "latest_valid_checkpoint": "reproduce",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'saft_hf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover
    from .base_model import BaseCheckpoint, load_base_vision_tower, resolve_base  # noqa: F401
    from .hub import make_model_card, push_task_vector  # noqa: F401
    from .task_vector_io import provenance_config  # noqa: F401
    from .task_vectors import (  # noqa: F401
        CorruptedTaskVectorError,
        IncompatibleTaskVectorError,
        TaskVector,
        TaskVectorError,
        add_scaled_,
        check_compatible,
        load_base_state,
        load_task_vector,
        load_task_vectors,
    )
    from .trainer import SAMTrainer, SAMTrainingArguments  # noqa: F401
