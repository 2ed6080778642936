"""Step time and peak memory of `SAMTrainer` (and its cheap modes) relative to a plain `Trainer` run.

    python benchmarks/sam_overhead.py                       # tiny + ViT-B/32 vision tower, CPU fp32
    python benchmarks/sam_overhead.py --configs vit-b-32 --repeats 3          # full SAM, 3 interleaved runs
    python benchmarks/sam_overhead.py --configs vit-b-32 --modes all --steps 8   # the README cost table
    python benchmarks/sam_overhead.py --precision bf16      # on a GPU: bf16 autocast (also fp16)
    python benchmarks/sam_overhead.py --no-heap-trim        # CPU, without glibc heap-trim page faults

Each (model, mode) runs in a fresh subprocess so peak memory is its own: CUDA's max_memory_allocated
on a GPU, peak RSS above the pre-training baseline on CPU. Modes (see MODES): plain (sam_rho=0, the
same weights as a plain Trainer), sam, periodic-2/-5, looksam-5, sam-on (only LayerNorms perturbed),
lora-16 (LoRA r=16 under SAM) and lora-16-plain. A run's step time is the median over the steps after
the two warm-up steps; for a mode with k > 1, the median SAM step and median one-pass step weighted
1 : k-1 (see _step_time; --steps 8 covers k = 5). Wall time and process CPU time are both reported: on a shared machine the CPU time is
the figure other processes disturb least. With --repeats the modes run interleaved, and the summary
gives the median over repeats (targets for full SAM: time ratio <= 2.05, memory ratio <= 1.3).
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


# SAMTrainingArguments per mode, plus "lora": the PEFT LoRA rank (adapter on the encoder's linear layers).
MODES: dict[str, dict] = {
    "plain": dict(sam_rho=0.0),
    "sam": dict(sam_rho=0.05),
    "periodic-2": dict(sam_rho=0.05, sam_mode="periodic", sam_interval=2),
    "periodic-5": dict(sam_rho=0.05, sam_mode="periodic", sam_interval=5),
    "looksam-5": dict(sam_rho=0.05, sam_mode="looksam", sam_interval=5),
    "sam-on": dict(sam_rho=0.05, sam_include=["norm"]),
    "lora-16": dict(sam_rho=0.05, lora=16),
    "lora-16-plain": dict(sam_rho=0.0, lora=16),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def run_one(config: str, mode: str, steps: int, batch: int, precision: str) -> dict:
    """Train `steps` steps in this process; return wall and CPU step times and peak memory."""
    from transformers import TrainerCallback

    from saft_hf import SAMTrainer, SAMTrainingArguments

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

            self.cpu_times: list[float] = []

        def on_step_begin(self, *args, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *args, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)
            self.cpu_times.append(time.process_time() - self.c0)

    settings = dict(MODES[mode])
    rank = settings.pop("lora", None)
    model = _classifier(CONFIGS[config])
    if rank:
        from peft import LoraConfig, get_peft_model

        # the adapter wraps the tower (a PreTrainedModel), as examples/train_saft.py --lora_r does
        model.vision_model = get_peft_model(
            model.vision_model, LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS)
        )
    image_size = model.config.image_size
    data = _Batches(steps * batch, image_size)
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as out:
        args = SAMTrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-5,
            report_to="none", **settings, save_strategy="no", logging_steps=10**6,
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
    return {"times": timer.times, "cpu_times": timer.cpu_times, "peak_bytes": peak,
            "device": "cuda" if cuda else "cpu"}


# glibc returns freed heap to the OS past a 128 KiB..64 MiB threshold and page-faults it back on the next
# step; which step pays depends on allocation order, and on CPU it moved single step times by up to 0.8 s.
# --no-heap-trim keeps the heap (for both trainers) so the ratio measures the trainers, not that churn.
NO_TRIM_ENV = {"MALLOC_TRIM_THRESHOLD_": str(2**40), "MALLOC_TOP_PAD_": str(2**30), "MALLOC_MMAP_THRESHOLD_": str(2**31)}


def _spawn(config: str, mode: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--_child", json.dumps([config, mode, args.steps, args.batch, args.precision])]
    env = {**os.environ, **NO_TRIM_ENV} if args.no_heap_trim else None
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _step_time(times: list[float], mode: str) -> float:
    """Median step time after warm-up; for k > 1, (median SAM step + (k-1) median one-pass step) / k.

    The SAM steps of periodic and LookSAM are 0, k, 2k, ... (LookSAM's first step is one anyway), so a
    window needs one step of each kind, not whole periods.
    """
    k = MODES[mode].get("sam_interval", 1)
    if k == 1:
        return statistics.median(times[2:])
    sam_steps = [t for i, t in enumerate(times) if i >= 2 and i % k == 0]
    one_pass = [t for i, t in enumerate(times) if i >= 2 and i % k != 0]
    if not sam_steps or not one_pass:
        raise SystemExit(f"{mode}: measure at least {k + 1} steps so both kinds of step are seen (--steps)")
    return (statistics.median(sam_steps) + (k - 1) * statistics.median(one_pass)) / k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,vit-b-32", help="comma-separated: " + ", ".join(CONFIGS))
    parser.add_argument("--modes", default="plain,sam",
                        help="comma-separated, 'plain' first (the reference), or 'all': " + ", ".join(MODES))
    parser.add_argument("--repeats", type=int, default=1, help="run the modes this many times, interleaved")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (first 2 are warm-up)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--no-heap-trim", action="store_true",
                        help="CPU: run both trainers with glibc's heap trimming off (see NO_TRIM_ENV)")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        config, mode, steps, batch, precision = json.loads(args._child)
        print(json.dumps(run_one(config, mode, steps, batch, precision)))
        return
    modes = list(MODES) if args.modes == "all" else args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown or modes[0] != "plain":
        parser.error(f"--modes must start with 'plain' and name modes from {list(MODES)}; got {modes}")

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, precision {args.precision}, "
          f"batch {args.batch}, {args.steps} steps (steps 3.. measured), {args.repeats} repeat(s), "
          f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
          + (", glibc heap trimming off" if args.no_heap_trim else ""))
    header = (f"{'config':<9} {'mode':<14} {'run':>3} {'wall s/step':>11} {'ratio':>6} {'CPU s/step':>10} "
              f"{'ratio':>6} {'peak MiB':>9} {'ratio':>6}")
    for config in args.configs.split(","):
        print(header)
        results: dict[str, list[tuple[float, float, float]]] = {m: [] for m in modes}
        for repeat in range(args.repeats):
            for mode in modes:
                run = _spawn(config, mode, args)
                row = (_step_time(run["times"], mode), _step_time(run["cpu_times"], mode), run["peak_bytes"] / 2**20)
                results[mode].append(row)
                base = results["plain"][repeat]
                print(f"{config:<9} {mode:<14} {repeat + 1:>3} {row[0]:>11.3f} {row[0] / base[0]:>6.3f} "
                      f"{row[1]:>10.3f} {row[1] / base[1]:>6.3f} {row[2]:>9.1f} {row[2] / base[2]:>6.3f}", flush=True)
        if args.repeats > 1:
            print(f"median over {args.repeats} runs of each run's ratio to the plain run beside it:")
            for mode in modes[1:]:
                ratios = [[r[i] / b[i] for i in range(3)] for r, b in zip(results[mode], results["plain"])]
                wall, cpu, mem = (statistics.median(col) for col in zip(*ratios))
                print(f"{config:<9} {mode:<14} wall ratio {wall:.3f}  CPU ratio {cpu:.3f}  memory ratio {mem:.3f}")
        print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
