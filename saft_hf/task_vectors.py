"""Task vectors (fine-tuned − pre-trained weights): the in-memory / on-disk format and arithmetic.

A ``TaskVector`` is a read-only ``Mapping[str, Tensor]`` (``keys()``, ``__getitem__``, ``__len__``,
``__iter__``), so merge functions treat it and a plain ``dict`` alike. Loaded from disk it is lazy:
``names``/``shapes`` come from safetensors headers and ``tv[name]`` memory-maps one tensor.
Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023) define τ = θ_ft − θ_pre.

Imports run one way: ``task_vector_io`` (format) ← ``readers`` (repo kinds) and ``hub`` (transport,
cards) ← this module (``TaskVector``, ``load_task_vector(s)``, ``load_base_state``) ← pipeline, CLI.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .hub import make_model_card, push_task_vector, resolve_repo
from .io_utils import atomic_output_dir
from .readers import RenamedStore, TensorStore, ZeroPaddedStore, layout_map, open_checkpoint, read_repo
from .task_vector_io import (
    CONFIG_NAME,
    DEFAULT_MAX_SHARD_BYTES,
    FORMAT_VERSION,
    HEAD_FILES,
    INDEX_NAME,
    ST_DTYPES,
    WEIGHTS_NAME,
    CorruptedTaskVectorError,
    IncompatibleTaskVectorError,
    TaskVectorError,
    fingerprint,
    parse_shard_size,
    read_head,
    write_head,
    write_tensors,
)

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "HEAD_FILES",
    "INDEX_NAME",
    "WEIGHTS_NAME",
    "CorruptedTaskVectorError",
    "IncompatibleTaskVectorError",
    "TaskVector",
    "TaskVectorError",
    "add_scaled_",
    "check_compatible",
    "fingerprint",
    "load_base_state",
    "load_task_vector",
    "load_task_vectors",
]

# ----------------------------------------------------------------------------- in-place writer
def add_scaled_(
    model: nn.Module,
    base_state: Mapping[str, Tensor],
    deltas: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]],
    scales: float | Sequence[float] = 1.0,
) -> nn.Module:
    """Write θ = θ_base + Σ_i s_i·τ_i into ``model``'s parameters in place and return the model.

    Parameters of ``model`` found in ``base_state`` but in no delta are reset to base, so the same
    model can be reused across a coefficient search (task arithmetic, Ilharco et al. 2023, eq. 1).
    """
    delta_list = [deltas] if isinstance(deltas, Mapping) else list(deltas)
    scale_list = [float(scales)] * len(delta_list) if isinstance(scales, (int, float)) else list(scales)
    if len(scale_list) != len(delta_list):
        raise TaskVectorError(
            f"add_scaled_ got {len(delta_list)} task vectors but {len(scale_list)} scales; "
            "pass one scale per task vector (or a single float)."
        )
    params = dict(model.named_parameters())
    params.update({n: b for n, b in model.named_buffers() if n in base_state})
    for delta in delta_list:
        unknown = [name for name in delta.keys() if name not in params]
        if unknown:
            raise IncompatibleTaskVectorError(
                f"task vector parameter {unknown[0]!r} is not a parameter of {type(model).__name__}; "
                "build the vector against this model's architecture."
            )
    with torch.no_grad():
        for name, param in params.items():
            if name not in base_state:
                continue
            base = base_state[name]
            if tuple(base.shape) != tuple(param.shape):
                raise IncompatibleTaskVectorError(
                    f"base_state[{name!r}] has shape {tuple(base.shape)} but the model has "
                    f"{tuple(param.shape)}; pass the base state of this model."
                )
            value = base.to(device=param.device, dtype=torch.float32)
            touched = False
            for delta, scale in zip(delta_list, scale_list):
                if name in delta:
                    tensor = delta[name]
                    if tuple(tensor.shape) != tuple(param.shape):
                        raise IncompatibleTaskVectorError(
                            f"task vector parameter {name!r} has shape {tuple(tensor.shape)} but the model has "
                            f"{tuple(param.shape)}; build the vector against this model's architecture."
                        )
                    value = value + scale * tensor.to(device=param.device, dtype=torch.float32)
                    touched = True
            param.copy_(value if touched else base.to(param.device))
    return model


def _to_state(source: nn.Module | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """Parameters of a module (not buffers: only trained weights form a task vector) or a state dict."""
    if isinstance(source, nn.Module):
        return {name: p.detach() for name, p in source.named_parameters()}
    if isinstance(source, Mapping):
        return source
    raise TaskVectorError(
        f"expected an nn.Module or a Mapping[str, Tensor], got {type(source).__name__}; "
        "pass a model or its state_dict()."
    )


def _selected(name: str, include: Sequence[str] | None, exclude: Sequence[str] | None) -> bool:
    """Regex filter on parameter names (``re.search``): kept if it matches include and not exclude."""
    if include and not any(re.search(p, name) for p in include):
        return False
    return not (exclude and any(re.search(p, name) for p in exclude))


def _check_finite(name: str, tensor: Tensor, source: str) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise CorruptedTaskVectorError(
            f"tensor {name!r} of task vector {source} contains NaN or inf; the fine-tuning diverged or "
            "the file is damaged: re-create the vector (or re-download with force_download=True)."
        )


# ----------------------------------------------------------------------------- the task vector
class TaskVector(Mapping[str, Tensor]):
    """τ = θ_ft − θ_pre as a read-only ``Mapping[str, Tensor]``, in memory or lazily on disk.

    ``config`` holds provenance (base model id/revision, task, fine-tuning method, metrics) and is
    written to ``task_vector_config.json``. ``head_dir`` or ``head``/``class_names`` carry a CLIP
    zero-shot head so the merged model can be evaluated on the task.
    """

    def __init__(
        self,
        tensors: Mapping[str, Tensor] | None = None,
        config: Mapping[str, Any] | None = None,
        *,
        head: Mapping[str, Tensor] | None = None,
        class_names: Sequence[str] | None = None,
        head_dir: str | os.PathLike | None = None,
        check_finite: bool = True,
        _store: TensorStore | None = None,
    ) -> None:
        if (tensors is None) == (_store is None):
            raise TaskVectorError("TaskVector needs a mapping of tensors, e.g. TaskVector({'w': delta}).")
        self.config: dict[str, Any] = dict(config or {})
        self.check_finite = check_finite
        self._store = _store
        self._tensors: dict[str, Tensor] | None = None
        self.source = _store.source if _store else "<in memory>"
        if tensors is not None:
            self._tensors = {}
            for name, tensor in tensors.items():
                if not isinstance(tensor, Tensor):
                    raise TaskVectorError(
                        f"task vector entry {name!r} is a {type(tensor).__name__}, expected a torch.Tensor."
                    )
                if check_finite:
                    _check_finite(name, tensor, self.source)
                self._tensors[name] = tensor.detach()
        self.head_dir = Path(head_dir) if head_dir is not None else None
        if self.head_dir is not None and not (self.head_dir / HEAD_FILES[0]).is_file():
            raise TaskVectorError(
                f"head_dir {str(self.head_dir)!r} has no {HEAD_FILES[0]}; pass the directory the "
                "classifier head was saved to (head.safetensors + head_config.json)."
            )
        self._head = dict(head) if head is not None else None
        self._class_names = list(class_names) if class_names is not None else None

    # -- Mapping protocol ------------------------------------------------------------------
    def __getitem__(self, name: str) -> Tensor:
        tensor = self.read_unchecked(name)
        if self.check_finite and self._store is not None:  # in-memory tensors were checked at init
            _check_finite(name, tensor, self.source)
        return tensor

    def read_unchecked(self, name: str) -> Tensor:
        """Tensor ``name`` without the finiteness check: for merges, which check each tensor once."""
        if self._tensors is not None:
            return self._tensors[name]
        assert self._store is not None
        if name not in self._store.weight_map:
            raise KeyError(name)
        return self._store.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in (self._tensors if self._tensors is not None else self._store.weight_map)  # type: ignore[union-attr]

    def __repr__(self) -> str:
        kind = "lazy" if self._store is not None else "in-memory"
        task = self.config.get("task")
        return f"TaskVector({kind}, {len(self)} tensors, task={task!r}, source={self.source!r})"

    @property
    def names(self) -> list[str]:
        """Parameter names in stored order (from headers when lazy)."""
        return list(self._tensors if self._tensors is not None else self._store.weight_map)  # type: ignore[union-attr]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter shapes, read from safetensors headers when lazy (no tensor data is loaded)."""
        if self._tensors is not None:
            return {n: tuple(t.shape) for n, t in self._tensors.items()}
        return dict(self._store.shapes)  # type: ignore[union-attr]

    @property
    def is_lazy(self) -> bool:
        return self._store is not None

    @property
    def dtypes(self) -> dict[str, torch.dtype]:
        """Parameter dtypes, read from safetensors headers when lazy."""
        if self._tensors is not None:
            return {n: t.dtype for n, t in self._tensors.items()}
        return {n: ST_DTYPES.get(d, torch.float32) for n, d in self._store.dtypes.items()}  # type: ignore[union-attr]

    @property
    def head(self) -> dict[str, Tensor] | None:
        """The task's zero-shot head tensors (read from ``head.safetensors`` when given a directory)."""
        if self._head is None and self.head_dir is not None:
            self._head, names = read_head(self.head_dir)
            self._class_names = self._class_names if self._class_names is not None else names
        return self._head

    @property
    def class_names(self) -> list[str] | None:
        """The task's class names (from ``head_config.json`` when given a directory)."""
        if self._class_names is None and self.head_dir is not None:
            _, self._class_names = read_head(self.head_dir)
        return self._class_names

    def norm(self) -> float:
        """Global L2 norm ‖τ‖₂ over all tensors, streamed one tensor at a time."""
        total = 0.0
        for name in self.names:
            total += float(self[name].double().pow(2).sum())
        return total**0.5

    def to_dict(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """Materialise every tensor in memory (optionally cast)."""
        return {n: (self[n].to(dtype) if dtype else self[n]) for n in self.names}

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_models(
        cls,
        base: nn.Module | Mapping[str, Tensor],
        finetuned: nn.Module | Mapping[str, Tensor],
        *,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        dtype: torch.dtype | None = None,
        config: Mapping[str, Any] | None = None,
        **head_kwargs: Any,
    ) -> TaskVector:
        """τ = finetuned − base over the floating-point parameters both share (regex include/exclude)."""
        base_state, ft_state = _to_state(base), _to_state(finetuned)
        tensors: dict[str, Tensor] = {}
        for name, ft in ft_state.items():
            if name not in base_state or not ft.is_floating_point() or not _selected(name, include, exclude):
                continue
            pre = base_state[name]
            if tuple(pre.shape) != tuple(ft.shape):
                raise IncompatibleTaskVectorError(
                    f"parameter {name!r} has shape {tuple(pre.shape)} in the base but {tuple(ft.shape)} in "
                    "the fine-tuned model; both must share one architecture (or exclude it)."
                )
            delta = ft.detach().to(torch.float32) - pre.detach().to(device=ft.device, dtype=torch.float32)
            tensors[name] = delta.to(dtype or ft.dtype).cpu()
        if not tensors:
            raise TaskVectorError(
                "no floating-point parameters are common to base and fine-tuned model after include="
                f"{include!r} / exclude={exclude!r}; check the models and the patterns."
            )
        full_config = {"format_version": FORMAT_VERSION, **dict(config or {})}
        return cls(tensors, full_config, **head_kwargs)

    # -- arithmetic (results are in memory) -------------------------------------------------
    def _combine(self, other: TaskVector | Mapping[str, Tensor], sign: float) -> TaskVector:
        if not isinstance(other, Mapping):
            return NotImplemented
        check_compatible([self, other])
        if sign > 0:
            tensors = {n: self[n] + other[n] for n in self.names}
        else:
            tensors = {n: self[n] - other[n] for n in self.names}
        return TaskVector(tensors, _derived_config(self, other), check_finite=self.check_finite)

    def __add__(self, other: TaskVector | Mapping[str, Tensor]) -> TaskVector:
        return self._combine(other, 1.0)

    def __radd__(self, other: Any) -> TaskVector:
        if isinstance(other, (int, float)) and other == 0:  # lets sum([tv1, tv2]) work
            return TaskVector(self.to_dict(), dict(self.config), check_finite=self.check_finite)
        return self._combine(other, 1.0)

    def __sub__(self, other: TaskVector | Mapping[str, Tensor]) -> TaskVector:
        return self._combine(other, -1.0)

    def __mul__(self, scale: float) -> TaskVector:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            return NotImplemented
        config = {**self.config, "scale": float(scale) * float(self.config.get("scale", 1.0))}
        return TaskVector({n: self[n] * scale for n in self.names}, config, check_finite=self.check_finite)

    __rmul__ = __mul__

    def __neg__(self) -> TaskVector:
        return self * -1.0

    # -- using it ------------------------------------------------------------------------------
    def apply_to(self, base_model: nn.Module, scale: float = 1.0) -> nn.Module:
        """Write θ_base + scale·τ into ``base_model``'s parameters in place and return it."""
        params = dict(base_model.named_parameters())
        check_compatible([self], {n: tuple(p.shape) for n, p in params.items()})
        with torch.no_grad():
            for name in self.names:
                param = params[name]
                value = param.to(torch.float32) + scale * self[name].to(param.device, torch.float32)
                param.copy_(value)
        return base_model

    # -- disk / Hub ----------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES,
        dtype: torch.dtype | None = None,
        model_card: bool = True,
    ) -> Path:
        """Write tensors (sharded past ``max_shard_size``: bytes or "5GB"-style), config, head and card atomically."""
        target = Path(save_directory)
        max_shard_size = parse_shard_size(max_shard_size)  # before anything is written
        with atomic_output_dir(target, overwrite=True) as tmp:
            self._write(tmp, max_shard_size=max_shard_size, dtype=dtype)
            if model_card:
                make_model_card(self, local_name=target.resolve().name).save(tmp / "README.md")
        return target

    def _write(self, directory: Path, *, max_shard_size: int | str, dtype: torch.dtype | None) -> None:
        write_tensors(
            directory, self, self.shapes, self.dtypes, dict(self.config), max_shard_size=max_shard_size, dtype=dtype
        )
        write_head(
            directory, head_dir=self.head_dir, head=self._head, class_names=self._class_names, task=self.config.get("task")
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str | None = None,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES,
    ) -> str:
        """Save to a temp dir and ``upload_folder`` it to ``repo_id`` (created if needed); returns the commit SHA."""
        return push_task_vector(
            self,
            repo_id,
            private=private,
            token=token,
            commit_message=commit_message,
            max_shard_size=max_shard_size,
        )

    @classmethod
    def from_pretrained(
        cls,
        repo_or_dir: str | os.PathLike,
        *,
        revision: str | None = None,
        token: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        force_download: bool = False,
        check_finite: bool = True,
        base: Mapping[str, Tensor] | None = None,
        base_id: str | None = None,
    ) -> TaskVector:
        """Open a task vector lazily from a local folder or a Hub repo (safetensors only).

        The folder may hold a saft-hf task vector, a PEFT LoRA adapter or, given ``base`` (a state dict
        or name → shape mapping), a full fine-tuned model; with ``base`` the names follow its layout.
        """
        directory, source = resolve_repo(
            repo_or_dir, revision=revision, token=token, cache_dir=cache_dir, force_download=force_download
        )
        contents = read_repo(directory, source, base=base, base_id=base_id)
        return cls(config=contents.config, head_dir=contents.head_dir, check_finite=check_finite, _store=contents.store)

    def padded(self, shapes: Mapping[str, Sequence[int]]) -> TaskVector:
        """This vector with all-zero deltas for the names of ``shapes`` it lacks (parameters it left untouched).

        A LoRA vector changes only the adapted weights; merged with full vectors, the rest of its τ is zero.
        """
        extra = {name: tuple(shape) for name, shape in shapes.items() if name not in self}
        if not extra:
            return self
        if self._tensors is not None:
            zeros = {name: torch.zeros(shape) for name, shape in extra.items()}
            return TaskVector({**self._tensors, **zeros}, self.config, check_finite=self.check_finite, head=self._head,
                              class_names=self._class_names, head_dir=self.head_dir)  # fmt: skip
        store = ZeroPaddedStore(self._store, extra)  # type: ignore[arg-type]
        return TaskVector(config=self.config, head_dir=self.head_dir, check_finite=self.check_finite, _store=store)

    def to_base_layout(self, base: nn.Module | Mapping[str, Any]) -> TaskVector:
        """This vector with its names in ``base``'s checkpoint layout (``vision_model.`` or not; readers.layout_map)."""
        mapping = layout_map(self.names, list(_names_shapes(base)))
        if all(old == new for old, new in mapping.items()):
            return self
        if self._tensors is not None:
            tensors = {mapping[n]: t for n, t in self._tensors.items()}
            return TaskVector(tensors, self.config, check_finite=self.check_finite, head=self._head,
                              class_names=self._class_names, head_dir=self.head_dir)  # fmt: skip
        store = RenamedStore(self._store, mapping)  # type: ignore[arg-type]
        return TaskVector(config=self.config, head_dir=self.head_dir, check_finite=self.check_finite, _store=store)


# ----------------------------------------------------------------------------- compatibility
def _names_shapes(source: Any) -> dict[str, tuple[int, ...]]:
    if isinstance(source, TaskVector):
        return source.shapes
    if isinstance(source, nn.Module):
        return {n: tuple(p.shape) for n, p in source.named_parameters()}
    if isinstance(source, Mapping):
        return {n: tuple(v.shape) if isinstance(v, Tensor) else tuple(v) for n, v in source.items()}
    raise TaskVectorError(f"cannot read parameter names/shapes from a {type(source).__name__}.")


def check_compatible(
    vectors: Iterable[Mapping[str, Tensor]],
    base: nn.Module | Mapping[str, Tensor] | Mapping[str, Sequence[int]] | None = None,
    base_id: str | None = None,
) -> None:
    """Raise ``IncompatibleTaskVectorError`` naming the first parameter (or base id) that does not match.

    Every vector must have the same parameter names and shapes as the first one, each must exist in
    ``base`` with the same shape, and a recorded ``base_model`` must equal ``base_id``.
    """
    vectors = list(vectors)
    base_shapes = _names_shapes(base) if base is not None else None
    reference: dict[str, tuple[int, ...]] | None = None
    for index, vector in enumerate(vectors):
        label = getattr(vector, "source", None) or f"vector #{index}"
        recorded = getattr(vector, "config", {}).get("base_model")
        if base_id and recorded and recorded != base_id:
            raise IncompatibleTaskVectorError(
                f"{label} was made from base model {recorded!r} but the base is {base_id!r}; "
                "merge only vectors fine-tuned from the same base."
            )
        shapes = _names_shapes(vector)
        if base_shapes is not None:
            for name, shape in shapes.items():
                if name not in base_shapes:
                    raise IncompatibleTaskVectorError(
                        f"parameter {name!r} of {label} does not exist in the base model; the vector was "
                        "made for another architecture."
                    )
                if tuple(base_shapes[name]) != tuple(shape):
                    raise IncompatibleTaskVectorError(
                        f"parameter {name!r} of {label} has shape {tuple(shape)} but the base has "
                        f"{tuple(base_shapes[name])}; the vector was made for another model size."
                    )
        if reference is None:
            reference = shapes
            continue
        for name in list(reference) + [n for n in shapes if n not in reference]:
            if name not in shapes or name not in reference:
                if base_shapes is not None:  # checked against the base: a parameter one vector left untouched is 0
                    continue
                raise IncompatibleTaskVectorError(
                    f"parameter {name!r} is in only one of vector #0 and {label}; check them against the base "
                    "(base=...), which reads a parameter a vector does not change (e.g. outside a LoRA) as a zero delta."
                )
            if tuple(shapes[name]) != tuple(reference[name]):
                raise IncompatibleTaskVectorError(
                    f"parameter {name!r} has shape {tuple(shapes[name])} in {label} but "
                    f"{tuple(reference[name])} in vector #0."
                )


# ----------------------------------------------------------------------------- file helpers
def _derived_config(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> dict[str, Any]:
    ca, cb = getattr(a, "config", {}), getattr(b, "config", {})
    config: dict[str, Any] = {"format_version": FORMAT_VERSION, "derived_from": [ca.get("task"), cb.get("task")]}
    if ca.get("base_model") and ca.get("base_model") == cb.get("base_model"):
        config["base_model"] = ca["base_model"]
        if ca.get("base_model_revision") == cb.get("base_model_revision"):
            config["base_model_revision"] = ca.get("base_model_revision")
    return config


# ----------------------------------------------------------------------------- loading against a base
def _base_state(
    base: nn.Module | Mapping[str, Tensor] | str | os.PathLike | None, base_id: str | None, token: str | None
) -> tuple[Mapping[str, Tensor] | None, str | None]:
    if isinstance(base, (str, os.PathLike)):
        return load_base_state(base, token=token), base_id or str(base)
    if isinstance(base, nn.Module):
        return {n: p.detach() for n, p in base.named_parameters()}, base_id
    return base, base_id


def load_base_state(
    repo_or_dir: str | os.PathLike, *, revision: str | None = None, token: str | None = None
) -> Mapping[str, Tensor]:
    """A base model's weights as a ``Mapping[str, Tensor]``: memory-mapped safetensors, else read as transformers
    reads a base (:func:`saft_hf.base_model.resolve_base`: conversion branch, then its ``weights_only`` loader)."""
    from .base_model import base_state_dict, resolve_base

    checkpoint = resolve_base(repo_or_dir, revision=revision, token=token)
    if not checkpoint.safetensors:
        return base_state_dict(checkpoint)
    store = open_checkpoint(checkpoint.directory, checkpoint.id)
    return TaskVector(config={"base_model": str(repo_or_dir)}, check_finite=False, _store=store)


def load_task_vector(
    repo_or_dir: str | os.PathLike,
    *,
    base: nn.Module | Mapping[str, Tensor] | str | None = None,
    base_id: str | None = None,
    revision: str | None = None,
    token: str | None = None,
    force_download: bool = False,
) -> TaskVector:
    """Load a task-vector, full fine-tuned model or LoRA adapter repo/dir as a lazy ``TaskVector``.

    ``base`` (a model, a state dict, or a repo id/dir) is needed for full models and is used to check
    names/shapes for every kind; pass the same mapping to many calls to load the base only once.
    """
    base_state, base_id = _base_state(base, base_id, token)
    vector = TaskVector.from_pretrained(
        repo_or_dir, revision=revision, token=token, force_download=force_download, base=base_state, base_id=base_id
    )
    if base_state is not None or base_id is not None:
        check_compatible([vector], base_state, base_id=base_id)
    return vector


def load_task_vectors(
    repos: Sequence[str | os.PathLike],
    *,
    base: nn.Module | Mapping[str, Tensor] | str | None = None,
    base_id: str | None = None,
    revisions: Sequence[str | None] | None = None,
    token: str | None = None,
) -> list[TaskVector]:
    """Load several task vectors against one base (loaded once) and check they are mutually compatible."""
    if revisions is not None and len(revisions) != len(repos):
        raise TaskVectorError(f"got {len(repos)} repos but {len(revisions)} revisions; pass one per repo.")
    base_state, base_id = _base_state(base, base_id, token)
    vectors = [
        load_task_vector(repo, base=base_state, base_id=base_id, revision=rev, token=token)
        for repo, rev in zip(repos, revisions or [None] * len(repos))
    ]
    check_compatible(vectors, base_state, base_id=base_id)
    return vectors
