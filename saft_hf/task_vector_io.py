"""The task-vector file format: names, errors, lazy safetensors reads, shard planning and writing.

A task-vector folder holds ``task_vector_config.json``, ``task_vector.safetensors`` (or shards plus
``task_vector.safetensors.index.json``, the transformers layout) and optionally a zero-shot head
(``head.safetensors`` + ``head_config.json``). Reads memory-map one tensor at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

FORMAT_VERSION = 1
CONFIG_NAME = "task_vector_config.json"
WEIGHTS_NAME = "task_vector.safetensors"
INDEX_NAME = "task_vector.safetensors.index.json"
HEAD_FILES = ("head.safetensors", "head_config.json")
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class TaskVectorError(ValueError):
    """Base class for task-vector problems (bad input, bad files, incompatible vectors)."""


class IncompatibleTaskVectorError(TaskVectorError):
    """A task vector does not match the base model (names, shapes or base id)."""


class CorruptedTaskVectorError(TaskVectorError):
    """A task-vector file is unreadable, non-finite or points outside its directory."""


def damaged_advice(source: str) -> str:
    """What to do about a damaged file of ``source``: a download is fetched again, a local folder re-created."""
    if Path(source).exists():
        return "re-create (or copy again) that local folder"
    return "re-download with force_download=True"


def fingerprint(shapes: Mapping[str, Sequence[int]]) -> str:
    """SHA-256 over sorted ``name:shape`` lines: a cheap identity for an architecture's parameter set."""
    text = "\n".join(f"{name}:{list(shape)}" for name, shape in sorted(shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def plain_value(value: Any) -> Any:
    """``value`` with enums (e.g. transformers' ``SchedulerType.COSINE``) replaced by their plain values, recursively."""
    if isinstance(value, Enum):
        return plain_value(value.value)
    if isinstance(value, Mapping):
        return {str(k): plain_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    return value


def provenance_config(
    *,
    task: str | None = None,
    dataset: str | None = None,
    base_model: str | None = None,
    base_model_revision: str | None = None,
    method: str | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A task-vector config in the one schema that model cards and ``saft-merge`` read.

    ``method``/``hyperparameters`` go under ``finetuning``, ``metrics`` under ``metrics``: ``accuracy`` is the
    fine-tuned model's test accuracy (normalises the merged test report), ``validation_accuracy`` its
    validation accuracy (normalises ``--select normalized``, which must not see test data); ``extra``
    keys are kept as they are. Unset fields are left out.
    """
    config: dict[str, Any] = {"format_version": FORMAT_VERSION}
    for key, value in (
        ("task", task),
        ("dataset", dataset),
        ("base_model", base_model),
        ("base_model_revision", base_model_revision),
    ):
        if value is not None:
            config[key] = value
    if method is not None or hyperparameters:
        config["finetuning"] = {"method": method or "unknown", "hyperparameters": plain_value(hyperparameters or {})}
    if metrics:
        config["metrics"] = dict(metrics)
    config.update(plain_value(extra))
    return config


# ----------------------------------------------------------------------------- lazy reads
class SafetensorsStore:
    """Reads tensors one at a time from (possibly sharded) safetensors files; headers only at open."""

    def __init__(self, directory: Path, weight_map: Mapping[str, str], source: str) -> None:
        self.directory = directory
        self.source = source
        self.weight_map = dict(weight_map)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for filename in dict.fromkeys(self.weight_map.values()):
            with self.open(filename) as handle:
                for name in handle.keys():
                    if self.weight_map.get(name) == filename:
                        tensor_slice = handle.get_slice(name)
                        self.shapes[name] = tuple(tensor_slice.get_shape())
                        self.dtypes[name] = str(tensor_slice.get_dtype())
        missing = [n for n in self.weight_map if n not in self.shapes]
        if missing:
            raise CorruptedTaskVectorError(
                f"tensor {missing[0]!r} is listed in the index of {source} but missing from "
                f"{self.weight_map[missing[0]]}; {damaged_advice(source)}."
            )

    def open(self, filename: str) -> Any:
        """A fresh ``safe_open`` handle of one file, to use in a ``with`` block.

        Handles are not kept: pages a handle has read stay resident until it closes, so keeping them
        would grow memory with every tensor read from a lazy task vector.
        """
        path = self.directory / filename
        if not path.is_file():
            raise CorruptedTaskVectorError(
                f"file {filename!r} of task vector {self.source} is missing; {damaged_advice(self.source)}, or "
                "check the repo contents."
            )
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as err:
            raise CorruptedTaskVectorError(
                f"cannot read {path} ({err}); the file is truncated or corrupted: {damaged_advice(self.source)}."
            ) from err

    def get(self, name: str) -> Tensor:
        filename = self.weight_map[name]
        try:
            with self.open(filename) as handle:
                return handle.get_tensor(name)
        except SafetensorError as err:
            raise CorruptedTaskVectorError(
                f"cannot read tensor {name!r} from {self.directory / filename} ({err}); "
                f"{damaged_advice(self.source)}."
            ) from err


def read_json(path: Path, source: str) -> dict[str, Any]:
    """A JSON object from ``path``, or a CorruptedTaskVectorError naming the file of ``source``."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptedTaskVectorError(
            f"cannot parse {path.name} of {source} ({err}); {damaged_advice(source)}."
        ) from err
    if not isinstance(data, dict):
        raise CorruptedTaskVectorError(f"{path.name} of {source} is not a JSON object.")
    return data


# ----------------------------------------------------------------------------- writing
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B)?", re.IGNORECASE)
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


def parse_shard_size(size: int | str) -> int:
    """Bytes from an int or a size string as ``PreTrainedModel.save_pretrained`` reads it ("5GB", "500MiB").

    As in transformers, KB/MB/GB/TB are powers of 10, KiB/MiB/GiB/TiB powers of 2, and a lower-case
    final ``b`` ("5Gb") means bits.
    """
    match = _SIZE.fullmatch(size.strip()) if isinstance(size, str) else None
    if isinstance(size, int) and not isinstance(size, bool):
        nbytes = size
    elif match:
        unit = match.group(2) or ""
        nbytes = int(float(match.group(1)) * _UNITS[unit[:-1].upper()])
        nbytes = nbytes // 8 if unit.endswith("b") else nbytes
    else:
        nbytes = 0
    if nbytes <= 0:
        raise TaskVectorError(
            f"max_shard_size must be a positive number of bytes or a size string, got {size!r}; e.g. '5GB', "
            "'500MB', '2GiB' or 2000000000."
        )
    return nbytes


def plan_shards(
    shapes: Mapping[str, Sequence[int]], dtypes: Mapping[str, torch.dtype], max_bytes: int | str
) -> list[list[str]]:
    """Greedy split of names into shards of at most ``max_bytes`` (a tensor larger than that is alone)."""
    max_bytes = parse_shard_size(max_bytes)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = int(torch.Size(shape).numel()) * dtypes[name].itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def shard_name(index: int, total: int) -> str:
    return f"task_vector-{index:05d}-of-{total:05d}.safetensors"


def write_tensors(
    directory: Path,
    tensors: Mapping[str, Tensor],
    shapes: Mapping[str, Sequence[int]],
    dtypes: Mapping[str, torch.dtype],
    config: dict[str, Any],
    *,
    max_shard_size: int | str,
    dtype: torch.dtype | None,
) -> None:
    """Write ``tensors`` (read lazily, one shard in memory at a time), the index and the config JSON."""
    config.update(
        format_version=FORMAT_VERSION,
        fingerprint=fingerprint(shapes),
        num_tensors=len(shapes),
        num_parameters=sum(int(torch.Size(s).numel()) for s in shapes.values()),
    )
    shards = plan_shards(shapes, {n: dtype or dtypes[n] for n in shapes}, max_shard_size)
    weight_map: dict[str, str] = {}
    metadata = {"format": "pt", "saft_task_vector": json.dumps({"fingerprint": config["fingerprint"]})}
    for index, names in enumerate(shards, start=1):
        filename = WEIGHTS_NAME if len(shards) == 1 else shard_name(index, len(shards))
        shard = {n: (tensors[n].to(dtype) if dtype else tensors[n]).contiguous() for n in names}
        save_file(shard, str(directory / filename), metadata=metadata)
        weight_map.update(dict.fromkeys(names, filename))
        config.setdefault("dtype", str(next(iter(shard.values())).dtype).replace("torch.", ""))
    if len(shards) > 1:
        total = sum(os.path.getsize(directory / f) for f in set(weight_map.values()))
        index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_NAME).write_text(json.dumps(index_json, indent=2))
    (directory / CONFIG_NAME).write_text(json.dumps(plain_value(config), indent=2, sort_keys=True, default=str))


def write_head(
    directory: Path,
    *,
    head_dir: Path | None,
    head: Mapping[str, Tensor] | None,
    class_names: Sequence[str] | None,
    task: str | None,
) -> None:
    """Copy the head files from ``head_dir``, or write ``head`` tensors and their ``head_config.json``."""
    if head_dir is not None:
        for filename in HEAD_FILES:
            if (head_dir / filename).is_file():
                shutil.copyfile(head_dir / filename, directory / filename)
    elif head is not None:
        save_file({k: v.contiguous() for k, v in head.items()}, str(directory / HEAD_FILES[0]))
        head_config = {"class_names": list(class_names) if class_names is not None else None, "task": task}
        (directory / HEAD_FILES[1]).write_text(json.dumps(head_config, indent=2))


def read_head(head_dir: Path) -> tuple[dict[str, Tensor], list[str] | None]:
    """Head tensors and class names from a folder holding ``head.safetensors`` (+ ``head_config.json``)."""
    with safe_open(str(head_dir / HEAD_FILES[0]), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    names = None
    if (head_dir / HEAD_FILES[1]).is_file():
        names = json.loads((head_dir / HEAD_FILES[1]).read_text()).get("class_names")
    return tensors, list(names) if names is not None else None
