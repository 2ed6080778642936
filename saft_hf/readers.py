"""Readers of the three repo kinds saft-hf merges, each a lazy store on :mod:`saft_hf.task_vector_io`.

- a saft-hf task vector (``task_vector_config.json`` + safetensors): :func:`read_task_vector_repo`;
- a full fine-tuned transformers model (``config.json`` + ``model.safetensors``), read as τ = θ_ft − θ_base
  one tensor at a time: :class:`DifferenceStore`;
- a PEFT LoRA adapter (``adapter_config.json``), read as τ = scaling·B@A: :class:`LoraStore`.

Readers work on local folders only (downloads are :mod:`saft_hf.hub`'s job) and know nothing of
``TaskVector``. Two rules live here and nowhere else: :func:`safe_name`, for every name from a
downloaded file that becomes a path, and :func:`layout_map`, the parameter-name mapping between
CLIP checkpoint layouts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from .task_vector_io import (
    CONFIG_NAME,
    FORMAT_VERSION,
    HEAD_FILES,
    INDEX_NAME,
    ST_DTYPES,
    WEIGHTS_NAME,
    CorruptedTaskVectorError,
    IncompatibleTaskVectorError,
    SafetensorsStore,
    TaskVectorError,
    damaged_advice,
    fingerprint,
    provenance_config,
    read_json,
)

__all__ = [
    "ADAPTER_CONFIG",
    "MODEL_CONFIG",
    "MODEL_INDEX",
    "MODEL_WEIGHTS",
    "DifferenceStore",
    "LoraStore",
    "RenamedStore",
    "RepoContents",
    "ZeroPaddedStore",
    "TensorStore",
    "layout_key",
    "layout_map",
    "no_safetensors_error",
    "open_checkpoint",
    "read_lora_repo",
    "read_model_repo",
    "read_repo",
    "read_task_vector_repo",
    "rename_to_base",
    "require_safetensors",
    "safe_name",
    "weight_map_of",
]

MODEL_CONFIG = "config.json"
MODEL_WEIGHTS = "model.safetensors"
MODEL_INDEX = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_INDEX = "adapter_model.safetensors.index.json"
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_PEFT_PREFIX = "base_model.model."


class TensorStore(Protocol):
    """What ``TaskVector`` reads lazily: names (in ``weight_map``'s order), shapes, dtypes, one tensor at a time."""

    source: str
    weight_map: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]

    def get(self, name: str) -> Tensor: ...


@dataclass
class RepoContents:
    """What a reader found in a folder: the lazy store, the task-vector config and the head folder (if any)."""

    store: TensorStore
    config: dict[str, Any]
    head_dir: Path | None = None


# ----------------------------------------------------------------------------- the path-safety rule
def safe_name(name: object, *, what: str, source: str) -> str:
    """``name`` if it is one plain path component (no separator, ``..``, ``.``, NUL or empty), else an error.

    Such a name joined to a folder stays inside that folder lexically, whatever the folder's own links
    are (the Hub cache links snapshot files into ``blobs/``), so no path is resolved here.
    """
    bad = not isinstance(name, str) or name in ("", ".", "..") or any(char in name for char in ("/", "\\", "\0"))
    if bad:
        raise CorruptedTaskVectorError(
            f"{what} {name!r} in {source} is not a plain name (it could point outside its folder: separators, "
            "'..', absolute paths and empty names are refused); fix the name in the file or re-create it."
        )
    return name  # type: ignore[return-value]


# ----------------------------------------------------------------------------- checkpoint layouts
def layout_key(name: str) -> str:
    """A parameter's name with the layout-specific prefix removed, the same in every CLIP checkpoint layout.

    transformers 5 saves ``CLIPVisionModel`` as ``embeddings.…``/``encoder.…``; transformers 4 saved it,
    and every generation saves ``CLIPVisionModelWithProjection`` and ``CLIPModel``, as ``vision_model.…``.
    The text tower keeps its ``text_model.`` prefix and the projections keep their names.
    """
    return name[len("vision_model.") :] if name.startswith("vision_model.") else name


def layout_map(names: Iterable[str], base_names: Collection[str]) -> dict[str, str]:
    """Checkpoint name → base name, across CLIP layouts; a name without exactly one match is kept as it is.

    Kept names are reported by the compatibility check (``check_compatible``), which names them.
    """
    by_key: dict[str, list[str]] = {}
    for base_name in base_names:
        by_key.setdefault(layout_key(base_name), []).append(base_name)
    mapping = {}
    for name in names:
        candidates = [name] if name in base_names else by_key.get(layout_key(name), [])
        mapping[name] = candidates[0] if len(candidates) == 1 else name
    return mapping


class RenamedStore:
    """Another store under new names (``mapping``: old → new); tensors are read from the inner store."""

    def __init__(self, store: TensorStore, mapping: Mapping[str, str]) -> None:
        self.source = store.source
        self._store = store
        self._old = {mapping.get(n, n): n for n in store.weight_map}
        if len(self._old) != len(store.weight_map):
            raise IncompatibleTaskVectorError(f"renaming the parameters of {store.source} would merge two of them.")
        self.weight_map = {new: store.weight_map[old] for new, old in self._old.items()}
        self.shapes = {new: store.shapes[old] for new, old in self._old.items()}
        self.dtypes = {new: store.dtypes[old] for new, old in self._old.items()}

    def get(self, name: str) -> Tensor:
        return self._store.get(self._old[name])


class ZeroPaddedStore:
    """Another store plus all-zero tensors for parameters it leaves untouched (a LoRA vector's frozen weights)."""

    def __init__(self, store: TensorStore, extra: Mapping[str, tuple[int, ...]], dtype: str = "F32") -> None:
        self.source = store.source
        self._store = store
        self.weight_map = {**store.weight_map, **dict.fromkeys(extra, "")}
        self.shapes = {**store.shapes, **extra}
        self.dtypes = {**store.dtypes, **dict.fromkeys(extra, dtype)}

    def get(self, name: str) -> Tensor:
        if name in self._store.weight_map:
            return self._store.get(name)
        return torch.zeros(self.shapes[name], dtype=ST_DTYPES[self.dtypes[name]])


def rename_to_base(store: TensorStore, base_names: Collection[str]) -> TensorStore:
    """``store`` with its names in the base's layout (:func:`layout_map`), or ``store`` itself if they already are."""
    mapping = layout_map(store.weight_map, base_names)
    if all(old == new for old, new in mapping.items()):
        return store
    return RenamedStore(store, mapping)


# ----------------------------------------------------------------------------- safetensors checkpoints
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


def open_checkpoint(directory: Path, source: str) -> SafetensorsStore:
    """A lazy store of a transformers checkpoint's ``model.safetensors`` (or its shards)."""
    weight_map = weight_map_of(directory, source, MODEL_WEIGHTS, MODEL_INDEX)
    if weight_map is None:
        raise no_safetensors_error(source)
    return SafetensorsStore(directory, weight_map, source)


# ----------------------------------------------------------------------------- kind 1: saft-hf task vector
def read_task_vector_repo(directory: Path, source: str) -> RepoContents:
    """A saft-hf task-vector folder: config checked (version, task name, fingerprint), tensors lazy."""
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise TaskVectorError(
            f"{source} has no {CONFIG_NAME}, so it is not a saft-hf task vector; use "
            "load_task_vector(...) for full fine-tuned models or PEFT adapters."
        )
    config = read_json(config_path, source)
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise TaskVectorError(
            f"{source} has task-vector format_version {version!r}; this saft-hf reads up to "
            f"{FORMAT_VERSION}: upgrade saft-hf."
        )
    if config.get("task") is not None:  # the task names output folders (heads/<task>) later
        safe_name(config["task"], what="task name", source=f"{CONFIG_NAME} of {source}")
    weight_map = weight_map_of(directory, source, WEIGHTS_NAME, INDEX_NAME)
    if weight_map is None:
        raise CorruptedTaskVectorError(
            f"{source} has neither {WEIGHTS_NAME} nor {INDEX_NAME}; {damaged_advice(source)}."
        )
    store = SafetensorsStore(directory, weight_map, source)
    if "fingerprint" in config and config["fingerprint"] != fingerprint(store.shapes):
        raise CorruptedTaskVectorError(
            f"the tensors of {source} do not match the fingerprint in its {CONFIG_NAME} (files mixed "
            f"from different versions?); {damaged_advice(source)}."
        )
    head_dir = directory if (directory / HEAD_FILES[0]).is_file() else None
    return RepoContents(store, config, head_dir)


# ----------------------------------------------------------------------------- kind 2: full fine-tuned model
class DifferenceStore:
    """Lazy τ = θ_ft − θ_base for a full fine-tuned checkpoint, in the base's names: one tensor read at a time."""

    def __init__(self, finetuned: SafetensorsStore, base: Mapping[str, Tensor]) -> None:
        self.source = finetuned.source
        self._finetuned, self._base = finetuned, base
        floats = [n for n in finetuned.weight_map if finetuned.dtypes[n] in FLOAT_DTYPES]
        mapping = layout_map(floats, list(base.keys()))
        self._ft_name = {mapping[n]: n for n in floats if mapping[n] in base}
        if not self._ft_name:
            raise IncompatibleTaskVectorError(
                f"{self.source} shares no floating-point parameter names with the base, even across the CLIP "
                "layouts (vision_model. prefix or not); is it a model fine-tuned from this base?"
            )
        self.weight_map = {n: finetuned.weight_map[ft] for n, ft in self._ft_name.items()}
        self.shapes = {n: finetuned.shapes[ft] for n, ft in self._ft_name.items()}
        self.dtypes = {n: finetuned.dtypes[ft] for n, ft in self._ft_name.items()}

    def get(self, name: str) -> Tensor:
        finetuned = self._finetuned.get(self._ft_name[name])
        base = self._base[name]
        if tuple(base.shape) != tuple(finetuned.shape):
            raise IncompatibleTaskVectorError(
                f"parameter {name!r} has shape {tuple(finetuned.shape)} in {self.source} but "
                f"{tuple(base.shape)} in the base."
            )
        return (finetuned.to(torch.float32) - base.to(torch.float32)).to(finetuned.dtype)


def read_model_repo(
    directory: Path, source: str, base: Mapping[str, Tensor] | None, base_id: str | None
) -> RepoContents:
    """A full fine-tuned transformers model as a lazy difference against ``base``."""
    if base is None:
        raise TaskVectorError(
            f"{source} is a full fine-tuned model: pass base= (the pre-trained model, its state dict "
            "or its repo id) to compute the task vector against it."
        )
    model_config = read_json(directory / MODEL_CONFIG, source)
    store = DifferenceStore(open_checkpoint(directory, source), base)
    config = provenance_config(
        base_model=base_id, method="full", finetuned_model=source, model_type=model_config.get("model_type")
    )
    return RepoContents(store, config)


# ----------------------------------------------------------------------------- kind 3: LoRA adapter
class LoraStore:
    """Lazy LoRA deltas: τ[name.weight] = scaling · B @ A (Hu et al. 2022; rsLoRA: α/√r, Kalajdzievski 2023)."""

    def __init__(self, adapter: SafetensorsStore, config: Mapping[str, Any]) -> None:
        self.source = adapter.source
        self._adapter = adapter
        self._fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        self._pairs: dict[str, tuple[str, str, float]] = {}
        for key in adapter.weight_map:
            if ".lora_A." not in key:
                if ".lora_B." not in key:
                    raise TaskVectorError(
                        f"adapter {self.source} has a non-LoRA tensor {key!r} (modules_to_save, bias, embedding "
                        "LoRA?); only plain LoRA A/B pairs can be turned into a task vector."
                    )
                continue
            module = key.split(".lora_A.")[0]
            b_key = key.replace(".lora_A.", ".lora_B.")
            if b_key not in adapter.weight_map:
                raise CorruptedTaskVectorError(f"adapter {self.source} has {key!r} but no {b_key!r}.")
            if len(adapter.shapes[key]) != 2:
                raise TaskVectorError(
                    f"adapter {self.source} has a LoRA on {module!r} with A of shape {adapter.shapes[key]}: "
                    "only Linear LoRA layers are supported (not Conv)."
                )
            name = (module[len(_PEFT_PREFIX) :] if module.startswith(_PEFT_PREFIX) else module) + ".weight"
            self._pairs[name] = (key, b_key, lora_scaling(module, adapter.shapes[key][0], config))
        self.weight_map = {n: adapter.weight_map[a] for n, (a, _, _) in self._pairs.items()}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for name, (a_key, b_key, _) in self._pairs.items():
            shape = (adapter.shapes[b_key][0], adapter.shapes[a_key][1])
            self.shapes[name] = shape[::-1] if self._fan_in_fan_out else shape
            self.dtypes[name] = adapter.dtypes[a_key]

    def get(self, name: str) -> Tensor:
        a_key, b_key, scaling = self._pairs[name]
        lora_a, lora_b = self._adapter.get(a_key), self._adapter.get(b_key)
        delta = (lora_b.to(torch.float32) @ lora_a.to(torch.float32)) * scaling
        return (delta.T if self._fan_in_fan_out else delta).to(lora_a.dtype)


def lora_scaling(module: str, rank: int, config: Mapping[str, Any]) -> float:
    """α/r, or α/√r with rsLoRA; per-module α from ``alpha_pattern`` matched as PEFT does."""
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return alpha / (rank**0.5 if config.get("use_rslora") else rank)


# Provenance beside a LoRA adapter (task, method SAM/ASAM/standard, rank, ...), in the task-vector config schema.
LORA_PROVENANCE_NAME = "saft_provenance.json"


def read_lora_repo(directory: Path, source: str) -> RepoContents:
    """A PEFT LoRA adapter folder as lazy deltas; DoRA and other PEFT types are refused."""
    config = read_json(directory / ADAPTER_CONFIG, source)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise TaskVectorError(
            f"{source} is a PEFT {peft_type or 'unknown'} adapter; only LoRA adapters can be read as task "
            "vectors (merge it into the model and pass the full model instead)."
        )
    if config.get("use_dora"):
        raise TaskVectorError(
            f"{source} is a DoRA adapter: its delta is not scaling·B@A; merge_and_unload() it and pass the "
            "full fine-tuned model instead."
        )
    weight_map = weight_map_of(directory, source, ADAPTER_WEIGHTS, ADAPTER_INDEX)
    if weight_map is None:
        raise no_safetensors_error(source, ADAPTER_WEIGHTS)
    store = LoraStore(SafetensorsStore(directory, weight_map, source), config)
    tv_config = provenance_config(
        base_model=config.get("base_model_name_or_path"),
        base_model_revision=config.get("revision"),
        method="lora",
        hyperparameters={k: config.get(k) for k in ("r", "lora_alpha", "use_rslora") if k in config},
    )
    if (directory / LORA_PROVENANCE_NAME).is_file():  # written by examples/train_saft.py --lora_r
        recorded = read_json(directory / LORA_PROVENANCE_NAME, source)
        if recorded.get("task") is not None:
            safe_name(recorded["task"], what="task name", source=f"{source}/{LORA_PROVENANCE_NAME}")
        tv_config = {**tv_config, **{k: v for k, v in recorded.items() if k != "format_version"}}
    head_dir = directory if (directory / HEAD_FILES[0]).is_file() else None  # a head saved beside the adapter
    return RepoContents(store, tv_config, head_dir)


# ----------------------------------------------------------------------------- dispatch
def read_repo(
    directory: Path, source: str, base: Mapping[str, Tensor] | None = None, base_id: str | None = None
) -> RepoContents:
    """Read whichever kind ``directory`` holds; with a ``base``, names are put in the base's layout."""
    if (directory / CONFIG_NAME).is_file():
        contents = read_task_vector_repo(directory, source)
    elif (directory / ADAPTER_CONFIG).is_file():
        contents = read_lora_repo(directory, source)
    elif (directory / MODEL_CONFIG).is_file():
        contents = read_model_repo(directory, source, base, base_id)
    else:
        raise TaskVectorError(
            f"{source} has none of {CONFIG_NAME}, {ADAPTER_CONFIG} or {MODEL_CONFIG}: it is not a task "
            "vector, a PEFT adapter or a transformers model."
        )
    if base is not None:
        contents.store = rename_to_base(contents.store, list(base.keys()))
    return contents
