"""Time per AdaMerging adaptation step and peak memory, on a random-init CLIP vision tower (no download).

T synthetic task vectors (generated lazily per tensor from a seed, so they cost no memory until
AdaMerging stacks them, as lazily read safetensors vectors would), one zero-shot head per task with
10 classes, random pixel inputs. Reports the median wall time of the steps after the first, the
part of a step spent outside the model (building the one merged copy, projecting dL/dθ on the
vectors), and the peak RSS above the resident size before the call, as a multiple of one fp32
task vector.

    python benchmarks/adamerging_step.py                                   # tiny CLIP, 2 tasks, batch 16
    python benchmarks/adamerging_step.py --shapes vit-b-32 --tasks 8 --batch-size 1 --steps 3
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
import zlib
from collections.abc import Iterator, Mapping

import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from saft_hf.clip import ZeroShotHead
from saft_hf.merging import adamerging_coefficients
from saft_hf.merging.adamerging import BATCHES_PER_TASK, entropy_gradient, stack_vectors

TOWERS = {
    # the vision part of saft_hf.testing's tiny CLIP
    "tiny": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                 patch_size=8, projection_dim=16),
    "vit-b-32": dict(projection_dim=512),  # CLIPVisionConfig() defaults are the ViT-B/32 vision tower
}


class RandomVector(Mapping[str, torch.Tensor]):
    """A task vector whose tensors are drawn on read from a per-(task, name) seed: same values on every read."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], task: int) -> None:
        self.shapes = dict(shapes)
        self.task = task

    def __getitem__(self, name: str) -> torch.Tensor:
        seed = zlib.crc32(f"{self.task}/{name}".encode())
        return 1e-3 * torch.randn(self.shapes[name], generator=torch.Generator().manual_seed(seed))

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=sorted(TOWERS), default="tiny")
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6, help="steps to run; the first is a warm-up")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = CLIPVisionConfig(**TOWERS[args.shapes])
    model = CLIPVisionModelWithProjection(config).eval()
    base = {n: p.detach() for n, p in model.named_parameters()}
    shapes = {n: tuple(p.shape) for n, p in base.items()}
    vector_bytes = 4 * sum(p.numel() for p in base.values())
    vectors = [RandomVector(shapes, i) for i in range(args.tasks)]
    g = torch.Generator().manual_seed(0)
    heads = {f"task{i}": ZeroShotHead.from_prototypes(torch.randn(10, config.projection_dim, generator=g))
             for i in range(args.tasks)}  # fmt: skip
    images = BATCHES_PER_TASK * args.batch_size
    size = config.image_size
    inputs = {task: torch.randn(images, 3, size, size, generator=g) for task in heads}

    before = rss_bytes()
    stamps: list[tuple[float, float]] = []  # (wall, this process's CPU time): the machine may be shared

    def stamp(step: int, entropy: float) -> None:
        stamps.append((time.perf_counter(), time.process_time()))

    start = time.perf_counter()
    adamerging_coefficients(model, base, vectors, heads, inputs, progress=False, steps=args.steps,
                            batch_size=args.batch_size, callback=stamp)  # fmt: skip
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    steps = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
    cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])]
    first = stamps[0][0] - start  # reading and stacking the vectors, then the first step

    # the part of a step outside the model: the merged copy (no batches) and T·⟨dL/dθ, τ⟩ projections
    stacked = stack_vectors(vectors)
    flat = {n: base[n].reshape(-1) for n in stacked}
    columns = torch.full((args.tasks, len(stacked)), 0.3)
    model.requires_grad_(False)
    t0 = time.perf_counter()
    entropy_gradient(model, flat, stacked, columns, iter(()))
    merge_s = time.perf_counter() - t0
    grads = {n: torch.randn(t.shape[1]) for n, t in stacked.items()}
    t0 = time.perf_counter()
    torch.stack([stacked[n] @ grads[n] for n in stacked], dim=1)
    project_s = time.perf_counter() - t0

    median = statistics.median(steps) if steps else float("nan")
    print(f"AdaMerging step, {args.shapes} ({vector_bytes / 2**20:.2f} MiB per fp32 task vector), {args.tasks} tasks, "
          f"{BATCHES_PER_TASK}×{args.batch_size} inputs per task per step, torch threads {torch.get_num_threads()}")  # fmt: skip
    print(f"  step (median of {len(steps)} after a warm-up): {median:.3f} s wall, "
          f"{statistics.median(cpu) if cpu else float('nan'):.3f} s CPU of this process")  # fmt: skip
    print(f"  of which outside the model: merged copy {merge_s:.3f} s + gradient projection {project_s:.3f} s")
    print(f"  per input image (fwd+bwd): {(median - merge_s - project_s) / (args.tasks * images):.4f} s")
    print(f"  reading/stacking the vectors + first step: {first:.2f} s")
    print(f"  peak RSS above the start: {peak / 2**20:.0f} MiB = {peak / vector_bytes:.2f}× one task vector "
          f"({args.tasks} stacked vectors = {args.tasks:.0f}×)")


if __name__ == "__main__":
    main()
