"""Readers of the repo kinds saft-hf merges, and the one rule for names from downloaded files.

Every name that comes from a downloaded file (a shard in an index, a task name in a config) and
becomes a path goes through :func:`safe_name` first.
"""

from __future__ import annotations

import os
from pathlib import Path

from .task_vector_io import CorruptedTaskVectorError, SafetensorsStore, TaskVectorError, read_json

__all__ = ["MODEL_INDEX", "MODEL_WEIGHTS", "no_safetensors_error", "require_safetensors", "safe_name", "weight_map_of"]

MODEL_WEIGHTS = "model.safetensors"
MODEL_INDEX = "model.safetensors.index.json"


def safe_name(name: object, *, what: str, source: str) -> str:
    """``name`` if it is one plain path component (no separator, ``..``, ``.``, NUL or empty), else an error.

    Such a name joined to a folder stays inside that folder lexically, whatever the folder's own links
    are (the Hub cache links snapshot files into ``blobs/``), so no path is resolved here.
    """
    bad = (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or any(char in name for char in ("/", "\\", "\0"))
    )
    if bad:
        raise CorruptedTaskVectorError(
            f"{what} {name!r} in {source} is not a plain name (it could point outside its folder: separators, "
            "'..', absolute paths and empty names are refused); fix the name in the file or re-create it."
        )
    return name  # type: ignore[return-value]


def weight_map_of(directory: Path, source: str, weights: str, index: str) -> dict[str, str] | None:
    """Tensor → file map of a safetensors checkpoint (single file or sharded index), or None if neither."""
    if (directory / index).is_file():
        weight_map = read_json(directory / index, source).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CorruptedTaskVectorError(f"{index} of {source} has no 'weight_map'; re-download it.")
        where = f"{index} of {source}"
        return {n: safe_name(f, what="shard file", source=where) for n, f in weight_map.items()}
    if (directory / weights).is_file():
        store = SafetensorsStore(directory, {}, source)
        with store.open(weights) as handle:
            return dict.fromkeys(handle.keys(), weights)
    return None


def no_safetensors_error(source: str, weights: str = MODEL_WEIGHTS) -> TaskVectorError:
    """The one error for a checkpoint without safetensors weights: pickled ``*.bin`` files are never read."""
    return TaskVectorError(
        f"{source} has no {weights} (or {weights}.index.json); saft-hf reads safetensors only, never pickled "
        "*.bin weights: convert the checkpoint to safetensors (e.g. save_pretrained with safe_serialization)."
    )


def require_safetensors(path: str | os.PathLike, subfolder: str = "") -> None:
    """Raise :func:`no_safetensors_error` if the local folder ``path`` has no safetensors model weights.

    A Hub id (not a local folder) is left to ``from_pretrained(use_safetensors=True)``, which never unpickles.
    """
    directory = Path(path) / subfolder
    if directory.is_dir() and not any((directory / name).is_file() for name in (MODEL_WEIGHTS, MODEL_INDEX)):
        raise no_safetensors_error(str(directory))
