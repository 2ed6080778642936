"""Step time and peak memory of `SAMTrainer` relative to `Trainer` on the same model and batches.

    python benchmarks/sam_overhead.py                       # tiny + ViT-B/32 vision tower, CPU fp32
    python benchmarks/sam_overhead.py --precision bf16      # on a GPU: bf16 autocast (also fp16)
    python benchmarks/sam_overhead.py --no-heap-trim        # CPU, without glibc heap-trim page faults

Each (model, trainer) runs in a fresh subprocess so peak memory is its own: CUDA's
max_memory_allocated on a GPU, peak RSS above the pre-training baseline on CPU. Prints the median
step-time ratio and the peak-memory ratio (targets: <= 2.05 and <= 1.3).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

CONFIGS = {
    # CLIP ViT-B/32 vision tower (transformers' CLIPVisionConfig defaults) with its 512-d projection.
    "vit-b-32": dict(),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 image_size=32, patch_size=8, projection_dim=32),
}


def _classifier(config_kwargs: dict, num_classes: int = 10) -> nn.Module:
    """The product's model: vision tower + projection + a frozen unit-row head at CLIP's logit scale 100.

    (An unnormalised random head gave losses near 100 whose perturbed point w + eps drove the
    attention softmax into denormal floats, slowing the CPU descent pass 1.8x: a property of that
    toy model, not of SAM.)
    """
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from saft_hf import CLIPImageClassifier, ZeroShotHead

    torch.manual_seed(0)
    tower = CLIPVisionModelWithProjection(CLIPVisionConfig(**config_kwargs))
    head = ZeroShotHead.from_prototypes(torch.randn(num_classes, tower.config.projection_dim), logit_scale=100.0)
    return CLIPImageClassifier(tower, head)


class _Batches(torch.utils.data.Dataset):
    def __init__(self, n: int, image_size: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.pixels = torch.randn(n, 3, image_size, image_size, generator=g)
        self.labels = torch.randint(0, 10, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_one(config: str, sam: bool, steps: int, batch: int, precision: str) -> dict:
    """Train `steps` steps in this process; return step times and peak memory."""
    from transformers import TrainerCallback

    from saft_hf import SAMTrainer, SAMTrainingArguments

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, *args, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)

    model = _classifier(CONFIGS[config])
    image_size = model.config.image_size
    data = _Batches(steps * batch, image_size)
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as out:
        args = SAMTrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-5,
            sam_rho=0.05 if sam else 0.0, report_to="none", save_strategy="no", logging_steps=10**6,
            disable_tqdm=True, use_cpu=not cuda, bf16=precision == "bf16", fp16=precision == "fp16",
            train_sampling_strategy="sequential", dataloader_num_workers=0,
        )
        timer = Timer()
        trainer = SAMTrainer(model=model, args=args, train_dataset=data, callbacks=[timer])
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _current_rss_bytes()
        trainer.train()
        peak = (torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes()) - base
    return {"times": timer.times, "peak_bytes": peak, "device": "cuda" if cuda else "cpu"}


# glibc returns freed heap to the OS past a 128 KiB..64 MiB threshold and page-faults it back on the next
# step; which step pays depends on allocation order, and on CPU it moved single step times by up to 0.8 s.
# --no-heap-trim keeps the heap (for both trainers) so the ratio measures the trainers, not that churn.
NO_TRIM_ENV = {"MALLOC_TRIM_THRESHOLD_": str(2**40), "MALLOC_TOP_PAD_": str(2**30), "MALLOC_MMAP_THRESHOLD_": str(2**31)}


def _spawn(config: str, sam: bool, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--_child", json.dumps([config, sam, args.steps, args.batch, args.precision])]
    env = {**os.environ, **NO_TRIM_ENV} if args.no_heap_trim else None
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,vit-b-32", help="comma-separated: " + ", ".join(CONFIGS))
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (first 2 are warm-up)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--no-heap-trim", action="store_true",
                        help="CPU: run both trainers with glibc's heap trimming off (see NO_TRIM_ENV)")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        config, sam, steps, batch, precision = json.loads(args._child)
        print(json.dumps(run_one(config, sam, steps, batch, precision)))
        return

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, precision {args.precision}, "
          f"batch {args.batch}, {args.steps} steps (median over steps 3..)"
          + (", glibc heap trimming off" if args.no_heap_trim else ""))
    print(f"{'config':<10} {'device':<6} {'Trainer s/step':>15} {'SAM s/step':>11} {'time ratio':>11} "
          f"{'Trainer peak MiB':>17} {'SAM peak MiB':>13} {'mem ratio':>10}")
    for config in args.configs.split(","):
        plain, sam = _spawn(config, False, args), _spawn(config, True, args)
        t_plain, t_sam = statistics.median(plain["times"][2:]), statistics.median(sam["times"][2:])
        m_plain, m_sam = plain["peak_bytes"] / 2**20, sam["peak_bytes"] / 2**20
        print(f"{config:<10} {sam['device']:<6} {t_plain:>15.4f} {t_sam:>11.4f} {t_sam / t_plain:>11.3f} "
              f"{m_plain:>17.1f} {m_sam:>13.1f} {m_sam / m_plain:>10.3f}")


if __name__ == "__main__":
    main()
