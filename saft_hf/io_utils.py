"""Atomic outputs: files and folders appear complete or not at all, never half written.

Everything is written to a temporary path beside the target (same file system) and renamed into
place, so an interrupted run never replaces a good output with a partial one. Before the rename the
output gets the modes a plain ``mkdir``/``open`` would give under the user's umask: temp folders
start private (0700) and safetensors writes files 0600, which must not leak into final outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import Tensor

__all__ = [
    "apply_umask_modes",
    "atomic_file",
    "atomic_output_dir",
    "atomic_save_file",
    "atomic_write_json",
    "atomic_write_text",
    "cache_root",
    "current_umask",
    "folder_sha256",
    "local_label",
    "replace_dir",
]


def cache_root() -> Path:
    """saft-hf's own cache: ``$SAFT_HF_CACHE``, else ``$XDG_CACHE_HOME/saft_hf``, else ``~/.cache/saft_hf``."""
    root = os.environ.get("SAFT_HF_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "saft_hf")
    return Path(root).expanduser()


def local_label(path: str | os.PathLike) -> str:
    """How published files name a local input: its folder name, never the path (which shows the machine)."""
    return Path(path).resolve().name


def folder_sha256(folder: str | os.PathLike, suffixes: tuple[str, ...] = (".safetensors", ".json", ".bin")) -> str:
    """SHA-256 over each weight/config file's name and SHA-256 (the Hub's LFS id): a local input's identity."""
    root = Path(folder)
    outer = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in suffixes):
        inner = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                inner.update(chunk)
        outer.update(f"{path.relative_to(root).as_posix()}\0{inner.hexdigest()}\n".encode())
    return outer.hexdigest()


def _temp_beside(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{suffix}")


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but only a fallback)
    os.umask(mask)
    return mask


def apply_umask_modes(path: str | os.PathLike) -> None:
    """Give ``path`` (and, for a folder, everything under it) the modes of a plain mkdir/open: 0777/0666 & ~umask.

    Files keep execute bits only if they had them; links are left alone.
    """
    mask = current_umask()
    root = Path(path)
    entries = [root, *root.rglob("*")] if root.is_dir() and not root.is_symlink() else [root]
    for entry in entries:
        if entry.is_symlink():
            continue
        mode = entry.stat().st_mode
        executable = stat.S_ISDIR(mode) or mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        os.chmod(entry, (0o777 if executable else 0o666) & ~mask)


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
    tmp = _temp_beside(target, ".tmp")
    tmp.mkdir(mode=0o700)  # private while incomplete; apply_umask_modes opens it up before the rename
    try:
        yield tmp
        if target.exists() and not overwrite:  # created by someone else meanwhile
            raise FileExistsError(f"output folder {str(target)!r} appeared while writing; not replacing it.")
        apply_umask_modes(tmp)
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
        apply_umask_modes(tmp)
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
