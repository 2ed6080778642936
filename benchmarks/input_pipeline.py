"""Images/s of the training input path, today's against the GPU one, and decodes per image over a λ search.

Fixtures are written the way the Hub stores the real tasks (../shared/REAL_HUB.md): parquet files
``data/{train,test}-00000-of-00001.parquet`` whose ``image`` column holds the encoded bytes:

- ``cars-like``: JPEG (quality 90), widths log-uniform in 300–3,000 px (median ≈ 950), 4:3 or 3:4 — the
  large-JPEG tasks (real widths: Cars 78–5,620 px, SUN397 102–6,130 px). Draft decoding gains more on
  larger images, so this figure depends on that size mix;
- ``resisc45-like``: 256×256 JPEG;
- ``mnist-like``: 28×28 grey PNG, and ``svhn-like``: 32×32 RGB PNG.
Pixels are smooth structure plus noise (photo-like for JPEG's decoder; content barely changes decode time).

Training input path, images/s over whole epochs (median of ``--repeats`` epochs, after one warm-up epoch
that also starts persistent workers), batch 32, CLIP ViT-B/32's ``CLIPImageProcessor`` (224 px):
- ``today``: what ``train_saft.py`` did before issue 17 — ``with_transform`` + the processor's float
  output in the main process, ``dataloader_num_workers=0``;
- ``new (N workers)``: ``load_task(..., uint8=True, draft=True)``'s train transform (JPEG draft decoding,
  resize + crop to uint8 in the workers), persistent workers, pinned memory when CUDA is present, and
  ``PixelNormalizer`` applied to each batch in the main process (on a GPU it runs on the device; here it
  is counted on the CPU). ``default`` is ``default_num_workers()``; per-worker images/s = images/s ÷ N.
  ``0 workers`` shows what the uint8 + draft decoding alone gives.
- ``new (default, normalised on the device)``: the default again without the CPU ``PixelNormalizer``, as
  a GPU run has it (the normaliser is then part of the model's forward). Added after the first run, which
  showed the CPU normaliser's share on small images; the targets above it were not changed.
Beside images/s, each row gives the CPU milliseconds per image of the main process and of the workers
(psutil, over the timed epochs), and "with a core of its own" = 1000 ÷ the workers' CPU ms per image:
what one worker delivers when nothing else wants its core, for sizing a many-core GPU host. On a shared,
overloaded machine the wall-clock figures swing with the other load; the CPU figures much less. (CPU
accounting too was added after the first two runs, for that reason.)

λ search: decodes per validation image over 20 evaluation passes (the default grid), with
``CachedBatches`` of before issue 17 (fp32 cache, re-reads every batch once its budget is exceeded) and
of now (uint8 cache, only the uncached rest re-read). The budget is scaled to the fixture so that it holds
the same share of the split as 1 GiB holds of a 5,000-image ViT-B/32 validation split (1,783 fp32 images,
all 5,000 as uint8); the real-size arithmetic is printed beside it.

Targets (set before the first run, on this project's 2-core, shared CI-class machine, no GPU):
- new default ≥ 2× today's images/s on ``cars-like``, and images/s rising from 1 to 2 workers;
- exactly 1 decode per validation image per 20-λ search with the new cache (today: 20).

    python benchmarks/input_pipeline.py                     # all four tasks, 5 repeats
    python benchmarks/input_pipeline.py --tasks cars-like --repeats 9
    python benchmarks/input_pipeline.py --quick             # few images, 1 repeat: a smoke run
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil  # installed with accelerate
import torch
from datasets import ClassLabel, Dataset, Features, Image, load_dataset
from PIL import Image as PILImage
from torch import Tensor
from torch.utils.data import DataLoader

from saft_hf.clip import collate_image_batch
from saft_hf.pipeline.evaluation import DEFAULT_CACHE_BYTES, CachedBatches
from saft_hf.tasks import PixelNormalizer, default_num_workers, with_image_transform

BATCH = 32
SEARCH_PASSES = 20
VIT_PIXELS = 3 * 224 * 224
REAL_SPLIT = 5000  # the validation split's cap (Ilharco et al.)


def _photo(width: int, height: int, rng: np.random.Generator) -> PILImage.Image:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 6.3, 3)
    base = np.stack([np.sin(x / 37 + phase[0]) * 80 + 120, np.cos(y / 23 + phase[1]) * 60 + 120,
                     np.sin((x + y) / 51 + phase[2]) * 70 + 110], -1)  # fmt: skip
    noise = rng.normal(0, 12, (height, width, 3)).astype(np.float32)
    return PILImage.fromarray((base + noise).clip(0, 255).astype(np.uint8))


def _cars_like(rng: np.random.Generator) -> bytes:
    width = int(np.exp(rng.uniform(np.log(300), np.log(3000))))
    height = width * 3 // 4
    image = _photo(width, height, rng) if rng.random() < 0.7 else _photo(height, width, rng)
    return _encode(image, "JPEG")


def _encode(image: PILImage.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


TASKS = {
    "cars-like": (_cars_like, 160),
    "resisc45-like": (lambda rng: _encode(_photo(256, 256, rng), "JPEG"), 384),
    "mnist-like": (lambda rng: _encode(_photo(28, 28, rng).convert("L"), "PNG"), 1024),
    "svhn-like": (lambda rng: _encode(_photo(32, 32, rng), "PNG"), 1024),
}


def write_fixture(root: Path, task: str, count: int) -> Path:
    """``root/task/data/{train,test}-00000-of-00001.parquet`` with encoded images, as the Hub repos hold them."""
    folder = root / task
    if (folder / "data" / "test-00000-of-00001.parquet").is_file():
        return folder
    make, _ = TASKS[task]
    rng = np.random.default_rng(0)
    features = Features({"image": Image(), "label": ClassLabel(num_classes=10)})
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", count), ("test", max(BATCH, count // 4))):
        data = {"image": [{"bytes": make(rng), "path": None} for _ in range(rows)], "label": [i % 10 for i in range(rows)]}
        Dataset.from_dict(data, features=features).to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    return folder


@dataclass
class Rate:
    """Median wall-clock images/s of the timed epochs, and CPU milliseconds per image, main process and workers."""

    images_per_s: float
    main_ms: float
    workers_ms: float


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    return sum(sum(process.cpu_times()[:2]) for process in processes)


def measure(loader: DataLoader, normalize: Any, repeats: int) -> Rate:
    """``repeats`` full epochs after one untimed warm-up epoch (which also starts persistent workers)."""
    main = psutil.Process()
    rates, seen_total = [], 0
    workers: list[psutil.Process] = []
    for epoch in range(repeats + 1):
        if epoch == 1:
            workers = main.children(recursive=True)  # the DataLoader's persistent workers, if any
            main_cpu, workers_cpu = _cpu_seconds([main]), _cpu_seconds(workers)
        start, seen = time.perf_counter(), 0
        for batch in loader:
            normalize(batch["pixel_values"])
            seen += len(batch["labels"])
        if epoch:
            rates.append(seen / (time.perf_counter() - start))
            seen_total += seen
    main_ms = (_cpu_seconds([main]) - main_cpu) * 1000 / seen_total
    workers_ms = (_cpu_seconds(workers) - workers_cpu) * 1000 / seen_total if workers else 0.0
    return Rate(statistics.median(rates), main_ms, workers_ms)


def training_rates(train: Dataset, processor: Any, repeats: int, workers: list[int]) -> dict[Any, Rate]:
    """Today's path, the new one at each worker count, and the default without the CPU normaliser."""
    rates: dict[Any, Rate] = {}
    today = with_image_transform(train, processor)
    loader = DataLoader(today, batch_size=BATCH, shuffle=True, collate_fn=collate_image_batch, num_workers=0)
    rates["today"] = measure(loader, lambda pixels: pixels, repeats)
    new = with_image_transform(train, processor, uint8=True, draft=True)
    normalize = PixelNormalizer.from_processor(processor)
    default = default_num_workers()
    for count, on_device in [(count, False) for count in workers] + [(default, True)]:
        loader = DataLoader(
            new, batch_size=BATCH, shuffle=True, collate_fn=collate_image_batch, num_workers=count,
            persistent_workers=count > 0, pin_memory=torch.cuda.is_available(),
        )  # fmt: skip
        rates[(count, on_device)] = measure(loader, (lambda pixels: pixels) if on_device else normalize, repeats)
        del loader  # its persistent workers end here
    return rates


class OldCachedBatches:
    """``CachedBatches`` as it was before issue 17 (main@fbc4604): fp32 pixels; once the budget is exceeded,
    every later pass re-reads the whole dataset."""

    def __init__(self, dataset: Any, batch_size: int, cache_bytes: int) -> None:
        self.dataset, self.batch_size, self.cache_bytes = dataset, batch_size, cache_bytes
        self._cached: list[tuple[Tensor, Tensor]] = []
        self._complete = False

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self._complete:
            yield from self._cached
            return
        loader = DataLoader(self.dataset, batch_size=self.batch_size, collate_fn=collate_image_batch)
        used, cache = 0, not self._cached
        for batch in loader:
            pair = (batch["pixel_values"], batch["labels"])
            used += pair[0].numel() * pair[0].element_size()
            if cache and used <= self.cache_bytes:
                self._cached.append(pair)
            else:
                cache = False
            yield pair
        self._complete = cache


class CountingTransform:
    """Wraps a dataset's lazy transform and counts the images it decodes (0 workers: one process)."""

    def __init__(self, transform: Any, column: str) -> None:
        self.transform, self.column, self.decoded = transform, column, 0

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, Tensor]:
        self.decoded += len(batch[self.column])
        return self.transform(batch)


def search_decodes(validation: Dataset, processor: Any) -> tuple[float, float, float, float]:
    """Decodes per image and input seconds over 20 passes, old cache vs new, with 1 GiB scaled to the split.

    The budget is 1 GiB × len(validation) / 5,000: the share of the split the real budget covers.
    """
    budget = DEFAULT_CACHE_BYTES * len(validation) // REAL_SPLIT
    results = []
    for uint8 in (False, True):
        data = with_image_transform(validation, processor, uint8=uint8)
        counter = CountingTransform(data.format["format_kwargs"]["transform"], "image")
        data.set_transform(counter, columns=["image", "label"])
        batches = CachedBatches(data, BATCH, budget, num_workers=0) if uint8 else OldCachedBatches(data, BATCH, budget)
        start = time.perf_counter()
        for _ in range(SEARCH_PASSES):
            for _batch in batches:
                pass
        results.append((counter.decoded / len(validation), time.perf_counter() - start))
    (old, old_s), (new, new_s) = results
    return old, new, old_s, new_s


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per setting (median reported)")
    parser.add_argument("--workdir", help="where the parquet fixtures are kept (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="an eighth of the images and 1 repeat: a smoke run")
    args = parser.parse_args(argv)
    from transformers import CLIPImageProcessor
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    processor = CLIPImageProcessor()  # openai/clip-vit-base-patch32's settings: 224 px, bicubic, centre crop
    default = default_num_workers()
    workers = sorted({0, 1, 2, default})
    repeats = 1 if args.quick else args.repeats
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"machine: {cores} cores usable, load average {os.getloadavg()[0]:.2f} at start; "
          f"torch {torch.__version__}, CUDA {'yes' if torch.cuda.is_available() else 'no'}; "
          f"default_num_workers() = {default}; batch {BATCH}; median of {repeats} epoch(s)")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        for task in args.tasks:
            count = TASKS[task][1] // (8 if args.quick else 1)
            folder = write_fixture(root / ("quick" if args.quick else "full"), task, count)
            files = {s: str(folder / "data" / f"{s}-00000-of-00001.parquet") for s in ("train", "test")}
            raw = load_dataset("parquet", data_files=files, cache_dir=str(root / "cache"))
            rates = training_rates(raw["train"], processor, repeats, workers)
            today = rates.pop("today")
            print(f"\n{task}: {len(raw['train'])} train images")
            print(f"  {'today (main process, float, 0 workers)':40s}: {today.images_per_s:7.1f} images/s; "
                  f"CPU per image {today.main_ms:5.1f} ms")  # fmt: skip
            for (count_, on_device), rate in rates.items():
                label = f"new ({count_} worker{'s' if count_ != 1 else ''}{', default' if count_ == default else ''})"
                label = "new (default, normalised on the device)" if on_device else label
                sizing = (f"; per worker {rate.images_per_s / count_:6.1f} images/s, with a core of its own "
                          f"{1000 / rate.workers_ms:6.1f}") if count_ else ""  # fmt: skip
                print(f"  {label:40s}: {rate.images_per_s:7.1f} images/s ({rate.images_per_s / today.images_per_s:4.2f}× "
                      f"today); CPU per image {rate.main_ms:5.1f} ms main + {rate.workers_ms:5.1f} ms workers{sizing}")  # fmt: skip
            old, new, old_s, new_s = search_decodes(raw["test"].select(range(min(len(raw["test"]), 256))), processor)
            print(f"  20-λ search, decodes per validation image: before {old:.0f}, now {new:.0f} "
                  f"(input time {old_s:.1f} s → {new_s:.1f} s)")  # fmt: skip
    old_images = DEFAULT_CACHE_BYTES // (VIT_PIXELS * 4)
    print(f"\nreal size: a {REAL_SPLIT}-image ViT-B/32 validation split in the 1 GiB budget: before {old_images} fp32 "
          f"images cached, so each of the 20 passes decoded all {REAL_SPLIT} (20 per image); now "
          f"{REAL_SPLIT * VIT_PIXELS / 2**20:.0f} MiB of uint8, all cached (1 per image).")  # fmt: skip
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
