"""Time and peak memory of saft-hf's streaming merges against PEFT's in-memory merge utilities.

n synthetic task vectors with the parameter shapes of a CLIP vision tower (ViT-B/32 by default) are
written as safetensors files; every (method, implementation) runs in a fresh subprocess that
reports the median wall time of a few repeats and its peak RSS (ru_maxrss) above its resident
size after imports. PEFT's ``merge_utils`` work on stacked in-memory tensors, so its timing includes
loading all vectors; note that PEFT's ``ties`` trims per tensor while ours trims each whole vector.
The SVD methods (TSV-M, Iso-C, Iso-CTS) are reported as a multiple of TIES's time in the same run.

    python benchmarks/merge_speed.py            # ViT-B/32, 8 vectors, 3 repeats
    python benchmarks/merge_speed.py --quick    # 2-layer tower, 4 vectors, 1 repeat
    python benchmarks/merge_speed.py --shapes vit-l-14 --no-peft
    python benchmarks/merge_speed.py --no-peft --repeats 1 --methods ties tsv_m iso_c iso_cts
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

TOWERS = {
    "vit-b-32": {},  # CLIPVisionConfig() defaults are the ViT-B/32 vision tower
    "vit-l-14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     patch_size=14, projection_dim=768),
}
SAFT_METHODS = {
    "task_arithmetic": {"scaling": 0.3},
    "ties": {"density": 0.2, "scaling": 1.0},
    "pcb": {"ratio": 0.05, "scaling": 1.0},
    "dare": {"density": 0.5, "scaling": 0.3},
    "tsv_m": {"scaling": 1.0},
    "iso_c": {"scaling": 1.0},
    "iso_cts": {"common_share": 0.8, "scaling": 1.0},
}
SVD_METHODS = ("tsv_m", "iso_c", "iso_cts")  # per-layer SVDs: timed against TIES in the same run
PEFT_METHODS = ("task_arithmetic", "ties")


def tower_shapes(shapes: str, quick: bool) -> dict[str, tuple[int, ...]]:
    """Floating-point parameter shapes of CLIPVisionModelWithProjection, built on the meta device."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(**TOWERS[shapes], **({"num_hidden_layers": 2} if quick else {}))
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def write_vectors(directory: Path, shapes: Mapping[str, tuple[int, ...]], n: int) -> list[Path]:
    paths = []
    for i in range(n):
        generator = torch.Generator().manual_seed(i)
        tensors = {name: torch.randn(shape, generator=generator) * 1e-3 for name, shape in shapes.items()}
        paths.append(directory / f"task_vector_{i}.safetensors")
        tmp = paths[-1].with_suffix(".tmp")
        save_file(tensors, str(tmp))
        tmp.rename(paths[-1])
        del tensors
    return paths


class SafetensorsVector(Mapping[str, torch.Tensor]):
    """Lazy name → tensor view of one safetensors file: headers at open, one tensor per read.

    The file is re-opened per read: a handle kept open keeps every page it touched mapped, which
    counts in RSS (as file pages) until the handle closes.
    """

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        with safe_open(self.path, framework="pt") as f:
            self._names = list(f.keys())
            self.shapes = {name: tuple(f.get_slice(name).get_shape()) for name in self._names}

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(self.path, framework="pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def run_saft(paths: list[Path], method: str) -> None:
    from saft_hf.merging import merge

    merged = merge([SafetensorsVector(p) for p in paths], method, **SAFT_METHODS[method])
    del merged


def run_peft(paths: list[Path], method: str) -> None:
    from peft.utils import merge_utils

    vectors = [load_file(str(p)) for p in paths]  # PEFT's utilities need every tensor in memory
    weights = torch.full((len(vectors),), SAFT_METHODS[method]["scaling"])
    merged = {}
    for name in vectors[0]:
        tensors = [v[name] for v in vectors]
        if method == "ties":
            merged[name] = merge_utils.ties(tensors, weights, density=SAFT_METHODS["ties"]["density"])
        else:
            merged[name] = merge_utils.task_arithmetic(tensors, weights)
    del merged, vectors


def current_rss_kib() -> int:
    """Resident set size now (Linux /proc), falling back to the peak so far elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() // 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process: median time of ``repeats`` runs, peak RSS above baseline."""
    import peft.utils.merge_utils  # noqa: F401  (import both stacks before the baseline)

    import saft_hf.merging  # noqa: F401

    paths = [Path(p) for p in args.paths]
    run = run_saft if args.impl == "saft" else run_peft
    baseline = current_rss_kib()
    times, cpu_times = [], []
    for _ in range(args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        run(paths, args.method)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline  # KiB on Linux
    # CPU seconds beside wall seconds: on a machine shared with other jobs the wall time is inflated
    print(json.dumps({"seconds": statistics.median(times), "cpu_seconds": statistics.median(cpu_times),
                      "peak_mib": peak / 1024}))


def measure(impl: str, method: str, paths: list[Path], repeats: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", impl, method, "--repeats", str(repeats), "--paths", *map(str, paths)]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{impl} {method} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=sorted(TOWERS), default="vit-b-32")
    parser.add_argument("--n", type=int, default=None, help="number of task vectors (default 8; 4 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 3)")
    parser.add_argument("--methods", nargs="+", choices=sorted(SAFT_METHODS), default=list(SAFT_METHODS))
    parser.add_argument("--quick", action="store_true", help="2-layer tower, 4 vectors, 1 repeat")
    parser.add_argument("--no-peft", action="store_true", help="skip the in-memory PEFT baseline")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the vectors (default: a temp dir)")
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--paths", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.impl, args.method = args.child
        args.repeats = args.repeats or 1
        return child(args)

    n = args.n or (4 if args.quick else 8)
    repeats = args.repeats or (1 if args.quick else 3)
    shapes = tower_shapes(args.shapes, args.quick)
    numel = sum(torch.Size(s).numel() for s in shapes.values())
    vector_mib = numel * 4 / 2**20
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        paths = write_vectors(Path(tmp), shapes, n)
        print(f"{n} task vectors, {args.shapes}{' (2 layers)' if args.quick else ''}: {len(shapes)} tensors, "
              f"{numel / 1e6:.1f} M params, {vector_mib:.0f} MiB each (float32); median of {repeats}; "
              f"torch threads {torch.get_num_threads()}")
        rows = []
        for method in args.methods:
            impls = ["saft"] + (["peft"] if method in PEFT_METHODS and not args.no_peft else [])
            for impl in impls:
                rows.append((impl, method, measure(impl, method, paths, repeats)))
                print(f"  {impl} {method}: {json.dumps(rows[-1][2])}", flush=True)  # kept if a later row fails
    print(f"\n{'impl':<5} {'method':<16} {'seconds':>8} {'CPU s':>8} {'peak MiB':>9} {'peak/vector':>11}")
    for impl, method, r in rows:
        print(f"{impl:<5} {method:<16} {r['seconds']:>8.2f} {r['cpu_seconds']:>8.2f} {r['peak_mib']:>9.0f} "
              f"{r['peak_mib'] / vector_mib:>10.2f}x")
    results = {(impl, method): r for impl, method, r in rows}
    print()
    for method in PEFT_METHODS:
        if ("saft", method) in results and ("peft", method) in results:
            s, p = results["saft", method], results["peft", method]
            print(f"{method}: saft/peft time {s['seconds'] / p['seconds']:.2f}x, "
                  f"peak RSS {s['peak_mib']:.0f} vs {p['peak_mib']:.0f} MiB ({s['peak_mib'] / p['peak_mib']:.2f}x)")
    if ("saft", "ties") in results:
        ties_seconds = results["saft", "ties"]["seconds"]
        for method in SVD_METHODS:
            if ("saft", method) in results:
                ties_cpu = results["saft", "ties"]["cpu_seconds"]
                print(f"{method}: {results['saft', method]['seconds'] / ties_seconds:.2f}x the wall time of TIES, "
                      f"{results['saft', method]['cpu_seconds'] / ties_cpu:.2f}x its CPU time (target ≤ 3x for "
                      "tsv_m and iso_c)")
    over = [f"{m}" for i, m, r in rows if i == "saft" and r["peak_mib"] > 3 * vector_mib]
    print(f"peak RSS ≤ 3× one task vector ({3 * vector_mib:.0f} MiB): "
          + ("all saft methods" if not over else "EXCEEDED by " + ", ".join(over)))


if __name__ == "__main__":
    main()
