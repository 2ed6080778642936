"""Shared fixtures: tiny CLIP models, tokenizers and image datasets built offline (see saft_hf.testing).

``tiny_clip_dir``: a 2-layer CLIP (image 32, patch 8, projection 16) with a hand-written byte-level
tokenizer and a 32-pixel image processor, so ``from_pretrained(tiny_clip_dir)`` works for all three.
``tiny_task_data_dir``: two tiny image tasks saved with ``save_to_disk`` under ``<dir>/<TaskName>/``,
each with a ``task_spec.json`` (class names, templates, columns) that ``load_task`` reads.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from saft_hf.testing import TINY_TASKS, TINY_TEMPLATES, build_tiny_clip, build_tiny_task

__all__ = ["TINY_TASKS", "TINY_TEMPLATES", "tiny_clip_dir", "tiny_task_data_dir"]


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CLIP checkpoint directory: model, tokenizer and image processor, all offline."""
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def tiny_task_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root with ``TinyColors/`` (4 classes) and ``TinyPatterns/`` (3 classes), 64 train / 32 test."""
    root = tmp_path_factory.mktemp("tiny_tasks")
    for seed, task in enumerate(TINY_TASKS):
        build_tiny_task(root, task, seed=seed)
    return root
