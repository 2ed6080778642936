"""Which stages of a reproduction are finished: fingerprinted markers and Trainer checkpoints checked before use.

A stage's outputs are trusted only through its marker, written last and atomically, which records the
SHA-256 of every output file and the settings the stage ran with. A missing marker, a changed file
(half written, truncated, edited) or other settings mean the stage is redone. A Trainer checkpoint is
resumed from only if its files are complete and readable; broken ones are removed.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..io_utils import atomic_write_json

__all__ = [
    "MARKER_NAME",
    "StageMismatchError",
    "checkpoint_problem",
    "fingerprint",
    "latest_valid_checkpoint",
    "read_marker",
    "remove_checkpoints",
    "write_marker",
]

MARKER_NAME = "reproduce_stage.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_CHUNK = 1 << 20


class StageMismatchError(ValueError):
    """A finished stage ran with other settings than this invocation asks for."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(root: Path, paths: Iterable[str]) -> dict[str, str]:
    """``{relative path: sha256}`` of the given files and of every file under the given folders of ``root``."""
    hashes: dict[str, str] = {}
    for relative in paths:
        path = root / relative
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            hashes[file.relative_to(root).as_posix()] = _sha256(file)
    return hashes


def write_marker(root: Path, outputs: Iterable[str], settings: Mapping[str, Any], extra: Mapping[str, Any]) -> dict:
    """Record ``root``'s finished outputs (hashed) and the settings they came from; written last, atomically."""
    marker = {"settings": dict(settings), "files": fingerprint(root, outputs), **extra}
    atomic_write_json(root / MARKER_NAME, marker)
    return marker


def read_marker(root: Path, settings: Mapping[str, Any], strict: bool = True) -> tuple[dict | None, str]:
    """The marker of a finished stage whose files are unchanged, else ``(None, why it must be redone)``.

    A stage finished with other ``settings`` raises ``StageMismatchError`` when ``strict`` (a fine-tune:
    redoing it silently would replace hours of results), else it is redone (a merge: minutes).
    """
    path = root / MARKER_NAME
    if not path.is_file():
        return None, "not run before" if not root.exists() else "no completion marker (interrupted)"
    try:
        marker = json.loads(path.read_text())
        recorded, files = marker["settings"], marker["files"]
    except (ValueError, KeyError, TypeError):
        return None, f"unreadable marker {path.name}"
    wanted = json.loads(json.dumps(dict(settings), default=str))
    if recorded != wanted:
        changed = sorted(k for k in set(recorded) | set(wanted) if recorded.get(k) != wanted.get(k))
        if not strict:
            return None, f"other settings ({', '.join(changed)})"
        raise StageMismatchError(
            f"{root} was produced with other settings ({', '.join(f'{k}: {recorded.get(k)!r} now {wanted.get(k)!r}' for k in changed)}); "
            "use a new --output_dir, or delete that folder to redo it."
        )
    if not files:
        return None, "marker lists no files"
    for relative, digest in files.items():
        file = root / relative
        if not file.is_file():
            return None, f"{relative} is missing"
        if _sha256(file) != digest:
            return None, f"{relative} differs from what was written (corrupted or half written)"
    return marker, "finished"


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a Trainer checkpoint cannot be resumed from (``None`` when it can): missing or unreadable files."""
    from safetensors import safe_open

    match = _CHECKPOINT.match(checkpoint.name)
    state_file = checkpoint / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return "trainer_state.json missing or unreadable"
    if not match or state.get("global_step") != int(match.group(1)):
        return f"trainer_state.json records step {state.get('global_step')}, not the folder's"
    for name in ("optimizer.pt", "scheduler.pt"):
        if not (checkpoint / name).is_file() or (checkpoint / name).stat().st_size == 0:
            return f"{name} missing or empty"
    # Process 0 writes its RNG state before trainer_state.json, so one is there. Another process count's
    # states (or a rank killed before writing its own) still resume, not bitwise: the Trainer warns.
    if not any(p.stat().st_size for p in checkpoint.glob("rng_state*.pth")):
        return "no RNG state (rng_state*.pth)"
    weights = sorted(checkpoint.glob("*.safetensors"))
    if not weights:
        return "no model weights (*.safetensors)"
    for file in weights:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    handle.get_tensor(key)
        except Exception as err:  # safetensors raises its own error types for truncated files
            return f"{file.name} unreadable ({type(err).__name__}: {err})"
    return None


def _checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and _CHECKPOINT.match(p.name)]
    return sorted(found, key=lambda p: int(_CHECKPOINT.match(p.name).group(1)))


def latest_valid_checkpoint(output_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that can be resumed from; broken newer ones are deleted and reported."""
    removed = []
    for checkpoint in reversed(_checkpoints(output_dir)):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint, removed
        shutil.rmtree(checkpoint, ignore_errors=True)
        removed.append(f"{checkpoint.name} ({problem})")
    return None, removed


def remove_checkpoints(output_dir: Path) -> None:
    """Delete a finished stage's Trainer checkpoints (about 3× the model size each)."""
    for checkpoint in _checkpoints(output_dir):
        shutil.rmtree(checkpoint, ignore_errors=True)
