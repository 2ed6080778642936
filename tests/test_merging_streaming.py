"""The streaming engine: exact radix-selected order statistics, lazy reads, bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from saft_hf.merging import METHODS, MergeError, merge, streaming
from saft_hf.merging.streaming import key_to_value, order_statistics, ordered_keys


def stream_of(rows: list[list[torch.Tensor]]):
    """rows[task][j]: the j-th tensor of each task, yielded parameter by parameter."""

    def stream() -> Iterator[list[torch.Tensor]]:
        for j in range(len(rows[0])):
            yield [row[j] for row in rows]

    return stream


def test_ordered_keys_sort_like_the_floats_and_invert():
    values = torch.tensor(
        [-float("inf"), -3e38, -1.5, -1e-40, -0.0, 0.0, 1e-45, 1e-40, 2.0, 3e38, float("inf")]
    )
    keys = ordered_keys(values)
    assert torch.all(keys[1:] > keys[:-1])
    assert [key_to_value(int(k)) for k in keys] == values.tolist()


@pytest.mark.parametrize("magnitude", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_order_statistics_equal_kthvalue_on_mixed_values(seed, magnitude):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for task in range(3):
        a = torch.randn(74000, generator=g) * 10 ** (task - 1)  # the last tensor is counted directly
        a[:50] = 0.0
        a[50:60] = -0.0
        a[60:300] = 0.125  # a block of exact ties
        rows.append([a[:1000].reshape(10, 100), a[1000:1001], a[1001:]])
    ranks = lambda d: [1, 2, 55, 200, d // 2, d - int(d * 0.2), d - 1, d]  # noqa: E731
    got = order_statistics(stream_of(rows), 3, ranks, magnitude=magnitude)
    for task, row in enumerate(rows):
        flat = torch.cat([t.reshape(-1) for t in row])
        flat = flat.abs() if magnitude else flat
        assert got[task] == [flat.kthvalue(k).values.item() for k in ranks(flat.numel())]


def test_order_statistics_reject_ranks_outside_the_vector():
    rows = [[torch.ones(5)], [torch.ones(5)]]
    with pytest.raises(MergeError, match=r"rank 6 is outside 1..5"):
        order_statistics(stream_of(rows), 2, lambda d: [d + 1])


@pytest.mark.parametrize("method", ["ties", "pcb"])
def test_chunked_combination_equals_whole_tensor_combination(method, monkeypatch):
    g = torch.Generator().manual_seed(5)
    vs = [{"w": torch.randn(40, 25, generator=g), "b": torch.randn(13, generator=g)} for _ in range(3)]
    whole = merge(vs, method)
    monkeypatch.setattr(streaming, "CHUNK", 7)  # 1000 entries in 143 blocks, the last one partial
    chunked = merge(vs, method)
    for k in whole:
        torch.testing.assert_close(chunked[k], whole[k], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------- lazy mappings
class LazyFile(Mapping[str, torch.Tensor]):
    """A file-backed mapping (like TaskVector) that counts how many tensors it handed out are alive."""

    alive = 0
    peak = 0
    reads = 0

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        with safe_open(self.path, framework="pt") as f:
            self._keys = list(f.keys())
            self.shapes = {k: tuple(f.get_slice(k).get_shape()) for k in self._keys}

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(self.path, framework="pt") as f:
            tensor = f.get_tensor(name)
        LazyFile.alive += 1
        LazyFile.reads += 1
        LazyFile.peak = max(LazyFile.peak, LazyFile.alive)
        weakref.finalize(tensor, LazyFile._release)
        return tensor

    @staticmethod
    def _release() -> None:
        LazyFile.alive -= 1

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


@pytest.mark.parametrize("method", sorted(m for m in METHODS if not METHODS[m].needs_data))
def test_lazy_vectors_merge_like_dicts_holding_one_parameter_at_a_time(method, tmp_path):
    g = torch.Generator().manual_seed(0)
    dicts = [{f"layer{j}.w": torch.randn(30, 20, generator=g) for j in range(12)} for _ in range(4)]
    paths = []
    for i, d in enumerate(dicts):
        paths.append(tmp_path / f"tv{i}.safetensors")
        save_file(d, str(paths[-1]))
    lazy = [LazyFile(p) for p in paths]
    LazyFile.alive = LazyFile.peak = LazyFile.reads = 0
    from_files = merge(lazy, method, progress=True)
    expected = merge(dicts, method)
    for k in expected:
        torch.testing.assert_close(from_files[k], expected[k], atol=0, rtol=0)
    # every tensor was read, yet at most two parameters' worth of inputs were alive at once
    assert LazyFile.reads >= 4 * 12
    assert LazyFile.peak <= 2 * len(lazy)


def test_peak_memory_stays_near_one_task_vector(tmp_path):
    """6 vectors of 16 MiB on disk: a merge that loaded them all would need ≥ 96 MiB."""
    n, tensors, numel = 6, 32, 128 * 1024
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        save_file({f"p{j}": torch.randn(numel, generator=g) for j in range(tensors)}, str(tmp_path / f"{i}.st"))
    vector_mib = tensors * numel * 4 / 2**20
    child = textwrap.dedent(
        f"""
        import json, sys, torch
        torch.set_num_threads(1)
        sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
        from saft_hf.merging import merge
        from tests.test_merging_streaming import LazyFile

        def kib(field):
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith(field))

        vectors = [LazyFile({str(tmp_path)!r} + f"/{{i}}.st") for i in range({n})]
        merge([{{"w": torch.ones(4)}}, {{"w": torch.ones(4)}}], "pcb")  # warm up lazy inits
        peaks = {{}}
        for method in ("ties", "pcb"):
            base = kib("VmRSS:")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak (VmHWM) to the current RSS
            merged = merge(vectors, method)
            peaks[method] = (kib("VmHWM:") - base) / 1024
            del merged
        print(json.dumps(peaks))
        """
    )
    # a fixed mmap threshold makes glibc return freed tensors to the OS, so the peak shows live
    # memory rather than what the allocator keeps cached for reuse
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True, env=env)
    peaks = json.loads(out.stdout.strip().splitlines()[-1])
    assert peaks["ties"] >= vector_mib * 0.9  # the merged output itself is measured
    for method, mib in peaks.items():
        assert mib <= 3 * vector_mib, f"{method} used {mib:.0f} MiB above baseline (vector = {vector_mib:.0f} MiB)"


# ------------------------------------------------------------------------- finiteness, once per merge
def _saved_task_vectors(tmp_path, n=3, bad=None):
    from saft_hf import TaskVector

    g = torch.Generator().manual_seed(1)
    paths = []
    for i in range(n):
        tensors = {f"layer{j}.w": torch.randn(20, 30, generator=g) for j in range(4)}
        if i == bad:
            tensors["layer2.w"][3, 4] = float("nan")
        vector = TaskVector(tensors, {"task": f"t{i}"}, check_finite=False)
        paths.append(vector.save_pretrained(tmp_path / f"tv{i}", model_card=False))
    return [TaskVector.from_pretrained(p) for p in paths]


@pytest.mark.parametrize("method", sorted(m for m in METHODS if not METHODS[m].needs_data))
def test_lazy_task_vectors_are_checked_for_finiteness_once_per_tensor_per_merge(method, tmp_path, monkeypatch):
    import saft_hf.task_vectors as task_vectors

    vectors = _saved_task_vectors(tmp_path)
    checks: list[str] = []
    monkeypatch.setattr(task_vectors, "_check_finite", lambda name, *a: checks.append(name))
    original = streaming._all_finite
    monkeypatch.setattr(streaming, "_all_finite", lambda t: checks.append("merge") or original(t))
    merge(vectors, method)
    # TIES and PCB read every tensor in three passes; each (vector, tensor) is checked once
    assert checks == ["merge"] * (len(vectors) * 4)


def test_non_finite_lazy_task_vector_is_still_refused_by_name(tmp_path):
    vectors = _saved_task_vectors(tmp_path, bad=1)
    for method in ("ties", "task_arithmetic"):
        with pytest.raises(MergeError, match=r"tensor 'layer2.w' of task vector 1 \(.*tv1\) contains NaN or inf"):
            merge(vectors, method)
