"""Tensor-by-tensor merging helpers: input checks, lazy reads and exact global order statistics.

Methods never hold n whole task vectors: they read one parameter from every vector, compute, and
drop it. Statistics over a *whole* task vector (TIES' top-k threshold, PCB's quantiles) come from
an exact two-pass radix selection on float32 bit patterns (65536-bucket histograms per task).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .registry import MergeError

_LOW_31 = 0x7FFFFFFF
_BUCKETS = 1 << 16


# ------------------------------------------------------------------------------------ input checks
def _shapes_of(vector: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    """Shapes from the vector's headers when it has them (TaskVector.shapes), else from its tensors."""
    shapes = getattr(vector, "shapes", None)
    if isinstance(shapes, Mapping):
        return {name: tuple(shape) for name, shape in shapes.items()}
    return {name: tuple(vector[name].shape) for name in vector.keys()}


def check_vectors(vectors: Sequence[Mapping[str, Tensor]]) -> list[str]:
    """Validate that there are ≥ 2 mappings with one key set and shapes; return the parameter names."""
    if isinstance(vectors, Mapping) or not isinstance(vectors, Sequence):
        raise MergeError(
            f"vectors must be a list of task vectors (name → tensor mappings), got {type(vectors).__name__}."
        )
    if len(vectors) < 2:
        raise MergeError(f"merging needs at least 2 task vectors, got {len(vectors)}.")
    for index, vector in enumerate(vectors):
        if not isinstance(vector, Mapping):
            raise MergeError(
                f"task vector {index} is a {type(vector).__name__}, not a name → tensor mapping; "
                "pass dicts or TaskVector objects."
            )
    reference = _shapes_of(vectors[0])
    if not reference:
        raise MergeError("task vector 0 has no tensors; nothing to merge.")
    for index, vector in enumerate(vectors[1:], start=1):
        shapes = _shapes_of(vector)
        missing = next((name for name in reference if name not in shapes), None)
        if missing is not None:
            raise MergeError(
                f"parameter {missing!r} is in task vector 0 but missing from task vector {index}; "
                "merge vectors built from the same architecture (and the same include/exclude filters)."
            )
        extra = next((name for name in shapes if name not in reference), None)
        if extra is not None:
            raise MergeError(
                f"parameter {extra!r} is in task vector {index} but missing from task vector 0; "
                "merge vectors built from the same architecture (and the same include/exclude filters)."
            )
        for name, shape in reference.items():
            if shapes[name] != shape:
                raise MergeError(
                    f"parameter {name!r} has shape {shape} in task vector 0 but {shapes[name]} in task "
                    f"vector {index}; the vectors come from different architectures."
                )
    return list(reference)


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl, Windows)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()
TRIM_EVERY_BYTES = 64 << 20


def release_freed_memory() -> None:
    """Hand memory that glibc keeps after ``free`` back to the OS (a no-op without glibc).

    A streaming pass frees temporaries of every size; glibc's heap keeps them, and the peak RSS of
    a PCB merge of 8 ViT-B/32 vectors varied from 1.3x to 6.6x one vector between identical runs.
    Trimming every ``TRIM_EVERY_BYTES`` read keeps it near the live size (measured 1.2x).
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class TensorReader:
    """Reads one parameter from every vector as float32, checking finiteness once per tensor per merge.

    Vectors that offer ``read_unchecked(name)`` (TaskVector) are read through it: they would
    otherwise check finiteness on every read, i.e. once per pass of a multi-pass method.
    """

    def __init__(self, vectors: Sequence[Mapping[str, Tensor]]) -> None:
        self.vectors = vectors
        self.dtypes: dict[str, torch.dtype] = {}
        self._readers = [getattr(vector, "read_unchecked", vector.__getitem__) for vector in vectors]
        self._bytes_since_trim = 0

    def read(self, name: str) -> list[Tensor]:
        """Parameter ``name`` of every vector as float32 (the input dtype is kept in ``dtypes``)."""
        if self._bytes_since_trim >= TRIM_EVERY_BYTES:
            release_freed_memory()  # the previous parameter's temporaries are gone by now
            self._bytes_since_trim = 0
        first_read = name not in self.dtypes
        tensors = []
        for index, read in enumerate(self._readers):
            tensor = read(name)
            if index == 0:
                self.dtypes.setdefault(name, tensor.dtype)
            if not tensor.is_floating_point():
                raise MergeError(
                    f"tensor {name!r} of task vector {index} has dtype {tensor.dtype}; task vectors must "
                    "be floating point (exclude integer buffers when building them)."
                )
            tensor = tensor.to(torch.float32)
            if first_read and not _all_finite(tensor):
                source = getattr(self.vectors[index], "source", None)
                raise MergeError(
                    f"tensor {name!r} of task vector {index}{f' ({source})' if source else ''} contains NaN "
                    "or inf; the fine-tuning diverged or the file is damaged: re-create that task vector."
                )
            tensors.append(tensor)
            self._bytes_since_trim += tensor.numel() * 4
        return tensors


def _all_finite(tensor: Tensor) -> bool:
    """True when no entry is NaN/inf: one sum (NaN/inf propagate), confirmed exactly only if it overflows."""
    return math.isfinite(float(tensor.sum())) or bool(torch.isfinite(tensor).all())


def input_dtypes(vector: Mapping[str, Tensor], names: Iterable[str]) -> dict[str, torch.dtype]:
    """The dtype of each parameter of ``vector``: from its ``dtypes`` (TaskVector headers) or its tensors."""
    known = getattr(vector, "dtypes", None)
    known = known if isinstance(known, Mapping) else {}
    return {name: known[name] if name in known else vector[name].dtype for name in names}


def iter_names(names: Sequence[str], progress: bool, desc: str) -> Iterable[str]:
    """``names`` wrapped in a tqdm bar over tensors when ``progress`` is set."""
    return tqdm(names, desc=desc, unit="tensor", disable=not progress, leave=False)


# elements per block when combining the n tensors of one parameter: (n, 65536) float32 blocks stay in
# cache and in malloc's heap; 1 << 20 made the TIES merge pass ~2x slower (page faults, memory traffic)
CHUNK = 1 << 16


def chunks(numel: int, size: int | None = None) -> Iterator[slice]:
    """Consecutive slices covering ``range(numel)``: bounds the temporaries of per-entry combines."""
    size = size or CHUNK
    for start in range(0, numel, size):
        yield slice(start, min(start + size, numel))


# --------------------------------------------------------------------------- exact order statistics
def ordered_keys(values: Tensor, magnitude: bool = False) -> Tensor:
    """int32 keys whose signed order equals the float32 order of ``values`` (or of |values|), flattened.

    Non-negative floats already compare like their int32 bit patterns; for negative ones the 31
    magnitude bits are flipped so that larger magnitudes give smaller keys. Clearing the sign bit
    gives the keys of |values| without computing ``abs``.
    """
    bits = values.to(torch.float32).contiguous().view(-1).view(torch.int32)
    if magnitude:
        return bits & _LOW_31
    return bits ^ ((bits >> 31) & _LOW_31)


def key_to_value(key: int) -> float:
    """Inverse of ``ordered_keys`` for one key (the map is an involution on the bit pattern)."""
    bits = key ^ ((key >> 31) & _LOW_31)
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32).item())


def _high_bins(values: Tensor, magnitude: bool) -> Tensor:
    """Top 16 bits of ``ordered_keys(values)`` as bins: [0, 32768) for magnitudes, else [0, 65536).

    Read straight from the upper int16 half of each float32 (little-endian), so no int32 key tensor
    is built: magnitudes drop the sign bit; signed keys flip the 15 low bits of negative values.
    """
    high = values.to(torch.float32).contiguous().view(-1).view(torch.int16)[1::2]
    if magnitude:
        return high & 0x7FFF
    keys = high.to(torch.int32)
    return keys.bitwise_xor_((keys >> 15) & 0x7FFF).add_(_BUCKETS // 2)


def _low_bins(values: Tensor, select: Tensor, negative: bool) -> Tensor:
    """Low 16 bits of the keys of ``values[select]`` (negative keys have them flipped), as int32."""
    low = values.to(torch.float32).contiguous().view(-1).view(torch.int16)[0::2][select].to(torch.int32)
    return low.bitwise_and_(_BUCKETS - 1).bitwise_xor_(_BUCKETS - 1 if negative else 0)


class _Histograms:
    """``slots`` histograms of 65536 bins, filled per call or, for small inputs, in batches."""

    FLUSH = 1 << 20  # small inputs are concatenated to ~1M values per bincount call

    def __init__(self, slots: int) -> None:
        self.counts = torch.zeros(slots, _BUCKETS, dtype=torch.int64)
        self._pending: list[list[Tensor]] = [[] for _ in range(slots)]
        self._sizes = [0] * slots

    def add(self, slot: int, bins: Tensor, offset: int = 0) -> None:
        """Count ``bins`` (non-negative ints) into ``slot``, each shifted by ``offset`` bins."""
        if bins.numel() >= self.FLUSH // 16:
            self._count(slot, bins, offset)
            return
        self._pending[slot].append(bins)
        self._sizes[slot] += bins.numel()
        if self._sizes[slot] >= self.FLUSH:
            self._flush(slot, offset)

    def _count(self, slot: int, bins: Tensor, offset: int) -> None:
        counted = torch.bincount(bins, minlength=_BUCKETS - offset)
        self.counts[slot, offset:] += counted

    def _flush(self, slot: int, offset: int) -> None:
        if self._pending[slot]:
            self._count(slot, torch.cat(self._pending[slot]), offset)
            self._pending[slot], self._sizes[slot] = [], 0

    def result(self, offset: int = 0) -> Tensor:
        for slot in range(len(self._pending)):
            self._flush(slot, offset)
        return self.counts


def order_statistics(
    stream: Callable[[], Iterator[Iterable[Tensor]]],
    n_tasks: int,
    ranks: Callable[[int], Sequence[int]],
    magnitude: bool = False,
) -> list[list[float]]:
    """Exact k-th smallest values (1-based ``ranks(count)``) of each task's values, in two passes.

    ``stream()`` yields, per parameter, an iterable of one tensor of values per task, in task order
    (recomputed on each pass; a generator keeps one task's values alive at a time).
    Pass 1 histograms the top 16 key bits per task, pass 2 the low 16 bits inside the buckets that
    hold the wanted ranks; memory is a few 65536-bin histograms per task whatever the vector size.
    With ``magnitude`` the statistics are those of |values| (no ``abs`` pass needed).
    """
    # magnitude bins cover the upper half of the key range: counted with an offset of 32768
    offset = _BUCKETS // 2 if magnitude else 0
    first = _Histograms(n_tasks)
    for values in stream():
        for task, value in enumerate(values):
            first.add(task, _high_bins(value, magnitude), offset)
    high = first.result(offset)
    release_freed_memory()  # the pass's temporaries, before the next pass allocates its own
    counts = high.sum(dim=1).tolist()
    cumulative = high.cumsum(dim=1)
    # per task: [(slot of its high bucket in pass 2, rank inside that bucket)] for each wanted rank
    targets: list[list[tuple[int, int]]] = []
    slots: list[dict[int, int]] = []  # per task: high bucket -> pass-2 slot
    n_slots = 0
    for task in range(n_tasks):
        wanted = list(ranks(counts[task]))
        bad = [k for k in wanted if not 1 <= k <= counts[task]]
        if bad:
            raise MergeError(f"rank {bad[0]} is outside 1..{counts[task]} for task {task}.")
        row = cumulative[task]
        buckets = torch.searchsorted(row, torch.tensor(wanted, dtype=torch.int64)).tolist()
        task_slots: dict[int, int] = {}
        task_targets = []
        for bucket, k in zip(buckets, wanted, strict=True):
            if bucket not in task_slots:
                task_slots[bucket], n_slots = n_slots, n_slots + 1
            task_targets.append((bucket, task_slots[bucket], k - (int(row[bucket - 1]) if bucket > 0 else 0)))
        targets.append(task_targets)
        slots.append(task_slots)
    second = _Histograms(n_slots)
    for values in stream():
        for task, value in enumerate(values):
            if not slots[task]:
                continue
            buckets = _high_bins(value, magnitude)
            for bucket, slot in slots[task].items():
                select = buckets == bucket - offset
                second.add(slot, _low_bins(value, select, bucket < _BUCKETS // 2))
    low = second.result().cumsum(dim=1)
    release_freed_memory()
    return [
        [
            key_to_value(((bucket - _BUCKETS // 2) << 16) | int(torch.searchsorted(low[slot], torch.tensor(rank))))
            for bucket, slot, rank in task_targets
        ]
        for task_targets in targets
    ]
