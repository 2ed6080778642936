"""The eight merging tasks (Cars, DTD, EuroSAT, GTSRB, MNIST, RESISC45, SUN397, SVHN) as data, plus loaders.

``TASKS`` maps a task name (case-insensitive) to a frozen ``TaskSpec``; ``load_task`` returns
``DatasetDict(train, validation, test)`` from the Hub or a local copy (``data_dir`` / ``$SAFT_DATA_DIR``).
A custom task is added with ``register_task`` or a ``task_spec.json`` beside its local data.
"""

from .loading import (
    DATA_DIR_ENV,
    ImageTransform,
    PixelNormalizer,
    decode_image,
    default_num_workers,
    load_task,
    resolve_task,
    split_train_validation,
    with_image_transform,
)
from .registry import TASK_SPEC_FILE, TASKS, TaskSpec, get_task, register_task

__all__ = [
    "DATA_DIR_ENV",
    "TASKS",
    "TASK_SPEC_FILE",
    "ImageTransform",
    "PixelNormalizer",
    "TaskSpec",
    "decode_image",
    "default_num_workers",
    "get_task",
    "load_task",
    "register_task",
    "resolve_task",
    "split_train_validation",
    "with_image_transform",
]
