"""saft-hf's task arithmetic and TIES beside PEFT's ``merge_utils`` and mergekit's merge methods.

n synthetic task vectors with the parameter shapes of a CLIP vision tower (ViT-B/32 by default) are
saved as saft-hf task-vector folders. Every (method, implementation) runs ``--runs`` times, each in
a fresh process; the table gives the min and median wall time and the peak RSS above the process's
resident size after imports (ru_maxrss), as a multiple of one float32 task vector.

- saft-hf: ``merge([TaskVector.from_pretrained(dir) ...], method)``, the path ``saft-merge`` takes:
  lazy reads, one parameter of every vector in memory at a time, TIES trimmed over each whole vector.
- PEFT: ``peft.utils.merge_utils.task_arithmetic`` / ``ties`` (weights = λ, TIES trims per tensor).
- mergekit: its registered ``task_arithmetic`` / ``ties`` methods (``merge_group`` on a zero base,
  weight 1 and λ for TIES, weight λ for TA; TIES trims per tensor).
Both peers are fed the same way, parameter by parameter from the same files (mergekit's own
executor also streams tensors; PEFT's utilities are per-tensor functions), so every row reads the
same bytes and holds one parameter of every vector at a time. PEFT and mergekit run under
``--peer-python`` (a separate venv holding them), saft-hf under this interpreter.

    python benchmarks/merge_peers.py --peer-python /work/venv-peers/bin/python          # ViT-B/32, 8 vectors
    python benchmarks/merge_peers.py --peer-python /work/venv-peers/bin/python --quick  # 2-layer tower, 4 vectors
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

METHODS = {
    "task_arithmetic": {"scaling": 0.3},
    "ties": {"density": 0.2, "scaling": 1.0},
}
IMPLEMENTATIONS = ("saft-hf", "peft", "mergekit")
WEIGHTS_NAME = "task_vector.safetensors"  # saft_hf.task_vector_io.WEIGHTS_NAME (not imported: peers lack saft_hf)


# ------------------------------------------------------------------------------ vectors on disk
def tower_shapes(quick: bool) -> dict[str, tuple[int, ...]]:
    """Floating-point parameter shapes of the ViT-B/32 vision tower: merge_speed.py's, so both benchmarks agree."""
    from merge_speed import tower_shapes as shapes_of  # the sibling script (benchmarks/ is on sys.path)

    return shapes_of("vit-b-32", quick)


def write_vectors(directory: Path, shapes: dict[str, tuple[int, ...]], n: int) -> list[Path]:
    """n task-vector folders of N(0, 1e-3²) values, one generator seed per vector."""
    from saft_hf import TaskVector

    paths = []
    for i in range(n):
        generator = torch.Generator().manual_seed(i)
        tensors = {name: torch.randn(shape, generator=generator) * 1e-3 for name, shape in shapes.items()}
        paths.append(TaskVector(tensors, {"task": f"task{i}"}).save_pretrained(directory / f"tv{i}", model_card=False))
        del tensors
    return paths


# ------------------------------------------------------------------------------ one measured run
def stream_parameters(paths: list[Path]):
    """(name, [that parameter of every vector]) one parameter at a time, read from the files."""
    files = [str(p / WEIGHTS_NAME) for p in paths]
    with safe_open(files[0], framework="pt") as f:
        names = list(f.keys())
    for name in names:
        tensors = []
        for file in files:
            with safe_open(file, framework="pt") as f:
                tensors.append(f.get_tensor(name))
        yield name, tensors


def run_saft(paths: list[Path], method: str) -> None:
    from saft_hf import TaskVector
    from saft_hf.merging import merge

    merged = merge([TaskVector.from_pretrained(p) for p in paths], method, **METHODS[method])
    del merged


def run_peft(paths: list[Path], method: str) -> None:
    from peft.utils import merge_utils

    args = METHODS[method]
    weights = torch.full((len(paths),), args["scaling"])
    merged = {}
    for name, tensors in stream_parameters(paths):
        if method == "ties":
            merged[name] = merge_utils.ties(tensors, weights, density=args["density"])
        else:
            merged[name] = merge_utils.task_arithmetic(tensors, weights)
    del merged


def run_mergekit(paths: list[Path], method: str) -> None:
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    args = METHODS[method]
    merge_method = registry.get(method)
    ids = list(range(1, len(paths) + 1))
    if method == "ties":  # TIES: weight 1 each, disjoint mean (normalize), × λ
        options = {"weight": dict.fromkeys(ids, 1.0), "density": dict.fromkeys(ids, args["density"]),
                   "lambda": args["scaling"], "normalize": True, "rescale": False, "int8_mask": False}
    else:  # task arithmetic: Σ λ τ_i
        options = {"weight": dict.fromkeys(ids, args["scaling"]), "density": dict.fromkeys(ids, 1.0),
                   "lambda": 1.0, "normalize": False, "rescale": False, "int8_mask": False}
    merged = {}
    for name, tensors in stream_parameters(paths):
        group = TensorGroup.from_tensors([torch.zeros_like(tensors[0]), *tensors], base_index=0)
        merged[name] = merge_method.merge_group(group, **options)
    del merged


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def child(impl: str, method: str, paths: list[Path]) -> None:
    """One run in this fresh process: wall time and peak RSS above the post-import baseline."""
    run = {"saft-hf": run_saft, "peft": run_peft, "mergekit": run_mergekit}[impl]
    if impl == "saft-hf":
        import saft_hf.merging  # noqa: F401
        from saft_hf import TaskVector  # noqa: F401
    elif impl == "peft":
        import peft.utils.merge_utils  # noqa: F401
    else:
        import mergekit.merge_methods.registry  # noqa: F401
    baseline = current_rss_bytes()
    start = time.perf_counter()
    run(paths, method)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    print(json.dumps({"seconds": seconds, "peak_bytes": peak}))


def measure(python: str, impl: str, method: str, paths: list[Path]) -> dict[str, float]:
    command = [python, __file__, "--child", impl, method, *map(str, paths)]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{impl} {method} failed under {python}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------- the table
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-python", default=sys.executable,
                        help="interpreter with peft and mergekit installed (default: this one)")
    parser.add_argument("--n", type=int, default=8, help="number of task vectors (default 8)")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per row (default 3)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--impls", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    parser.add_argument("--quick", action="store_true", help="2-layer tower, 4 vectors, 1 run (a smoke test)")
    parser.add_argument("--dir", type=Path, help="keep the vectors in this folder and reuse them on later runs "
                        "(default: a temporary folder, removed at the end)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        impl, method, *paths = args.child
        child(impl, method, [Path(p) for p in paths])
        return
    if args.quick:
        args.n, args.runs = 4, 1
    shapes = tower_shapes(args.quick)
    vector_bytes = 4 * sum(math.prod(s) for s in shapes.values())
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.dir or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        paths = [directory / f"tv{i}" for i in range(args.n)]
        if not all((p / WEIGHTS_NAME).is_file() for p in paths):
            paths = write_vectors(directory, shapes, args.n)
        print(f"{args.n} vectors of {len(shapes)} tensors, {vector_bytes / 2**20:.0f} MiB each (float32); "
              f"{args.runs} fresh process(es) per row; torch threads: {torch.get_num_threads()}")
        print(f"{'method':<16}{'implementation':<16}{'min s':>8}{'median s':>10}{'peak RSS':>10}")
        for method in args.methods:
            for impl in args.impls:
                python = sys.executable if impl == "saft-hf" else args.peer_python
                runs = [measure(python, impl, method, paths) for _ in range(args.runs)]
                seconds = [r["seconds"] for r in runs]
                peak = max(r["peak_bytes"] for r in runs) / vector_bytes
                print(f"{method:<16}{impl:<16}{min(seconds):>8.2f}{statistics.median(seconds):>10.2f}"
                      f"{peak:>9.2f}x", flush=True)


if __name__ == "__main__":
    main()
