"""Atomic outputs: files and folders appear complete or not at all, never half written.

Everything is written to a temporary path beside the target (same file system) and renamed into
place, so an interrupted run never replaces a good output with a partial one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import Tensor

__all__ = ["atomic_file", "atomic_output_dir", "atomic_save_file", "atomic_write_json", "atomic_write_text", "replace_dir"]


def _temp_beside(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{suffix}")


def replace_dir(new: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Swap the finished folder ``new`` into ``target`` by renames; an old ``target`` is removed only after."""
    new, target = Path(new), Path(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{str(target)!r} exists and is not a folder; choose another output path.")
    backup = _temp_beside(target, ".old")
    if target.exists():
        os.replace(target, backup)
    try:
        os.replace(new, target)
    except BaseException:
        if backup.exists():
            os.replace(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)
    return target


@contextmanager
def atomic_output_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside ``target``; on success it becomes ``target``, on failure it is removed.

    An existing ``target`` is refused (before any work) unless ``overwrite``; it is replaced only once
    the new folder is complete.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"output folder {str(target)!r} already exists; pass overwrite=True (--overwrite) to replace it, "
            "or choose another path."
        )
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{str(target)!r} exists and is not a folder; choose another output path.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        if target.exists() and not overwrite:  # created by someone else meanwhile
            raise FileExistsError(f"output folder {str(target)!r} appeared while writing; not replacing it.")
        replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; it replaces ``path`` only if the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path, ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` via a temp file and a rename."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented, key-sorted JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def atomic_save_file(
    tensors: Mapping[str, Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """``safetensors.torch.save_file`` through a temp file and a rename (tensors made contiguous, on CPU)."""
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
            str(tmp),
            metadata=dict(metadata) if metadata is not None else None,
        )
    return Path(path)
