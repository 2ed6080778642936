"""The GPU input path: uint8 decode + resize (in workers), device-side normalisation, decode-once evaluation, devices."""

from __future__ import annotations

import gc
import io
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Image
from PIL import Image as PILImage
from transformers import AutoImageProcessor, CLIPImageProcessor

import saft_hf.tasks.loading as loading
from saft_hf.clip import CLIPImageClassifier, ZeroShotHead, load_vision_tower
from saft_hf.pipeline import CachedBatches, MergeJob, MergeUsageError, resolve_device, run_merge_job
from saft_hf.tasks import PixelNormalizer, decode_image, default_num_workers, load_task, with_image_transform
from tests.test_cli_merge import vector_dirs  # noqa: F401  (module fixture reused)

SEARCH_GRID = [round(0.05 * i, 2) for i in range(1, 21)]  # the default 20-λ grid


def _photo(width: int, height: int, seed: int = 0) -> PILImage.Image:
    """A photo-like RGB image: smooth structure plus noise, so JPEG and resampling differences show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([np.sin(x / 37) * 80 + 120, np.cos(y / 23) * 60 + 120, (x + y) / (width + height) * 200 + 20], -1)
    return PILImage.fromarray((base + rng.normal(0, 12, (height, width, 3))).clip(0, 255).astype(np.uint8))


def _encoded(image: PILImage.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def stored_images() -> Dataset:
    """Images as the Hub's parquet files store them: a large and a 256-px JPEG, tiny grey and RGBA PNGs, a panorama."""
    images = [
        _encoded(_photo(1600, 1200), "JPEG"),  # SUN397 / Cars-like
        _encoded(_photo(256, 256, 1), "JPEG"),  # RESISC45-like
        _encoded(_photo(28, 28, 2).convert("L"), "PNG"),  # MNIST-like
        _encoded(_photo(32, 32, 3).convert("RGBA"), "PNG"),  # SVHN-like, with alpha
        _encoded(_photo(900, 241, 4), "JPEG"),  # odd aspect ratio: rounding of the short-side resize
    ]
    rows = {"image": [{"bytes": b, "path": None} for b in images], "label": [0, 1, 0, 1, 0]}
    return Dataset.from_dict(rows, features=Features({"image": Image(), "label": ClassLabel(names=["a", "b"])}))


@pytest.fixture(scope="module")
def processor() -> CLIPImageProcessor:
    return CLIPImageProcessor()  # CLIP ViT-B/32's: short side 224 bicubic, centre crop 224, CLIP mean/std


# ----------------------------------------------------------------------------- preprocessing
def test_uint8_path_normalised_on_the_device_equals_the_image_processor_bit_for_bit(stored_images, processor):
    new = with_image_transform(stored_images, processor, uint8=True)[:]
    assert new["pixel_values"].dtype == torch.uint8 and new["pixel_values"].shape == (5, 3, 224, 224)
    expected = processor(images=[im.convert("RGB") for im in stored_images["image"]], return_tensors="pt")["pixel_values"]
    assert torch.equal(PixelNormalizer.from_processor(processor)(new["pixel_values"]), expected)
    assert torch.equal(with_image_transform(stored_images, processor)[:]["pixel_values"], expected)  # today's path
    assert new["labels"].tolist() == [0, 1, 0, 1, 0]


def test_normalizer_follows_a_custom_processor_exactly(stored_images):
    custom = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.4])  # fmt: skip
    new = with_image_transform(stored_images, custom, uint8=True)[:]["pixel_values"]
    expected = custom(images=[im.convert("RGB") for im in stored_images["image"]], return_tensors="pt")["pixel_values"]
    assert torch.equal(PixelNormalizer.from_processor(custom)(new), expected)


def test_normalizer_passes_float_pixels_through_and_names_a_wrong_shape(processor):
    normalizer = PixelNormalizer.from_processor(processor)
    floats = torch.randn(2, 3, 4, 4)
    assert normalizer(floats) is floats
    with pytest.raises(ValueError, match=r"\[\.\.\., 3, H, W\]"):
        normalizer(torch.zeros(2, 4, 4, 4, dtype=torch.uint8))


def test_draft_decoding_shrinks_large_jpegs_only_and_stays_close_to_the_full_decode(stored_images, processor):
    raw = stored_images.cast_column("image", Image(decode=False))["image"]
    drafted = decode_image(raw[0], Image(), draft_size=224)
    assert 224 <= min(drafted.size) < 1200  # libjpeg decoded at a reduced scale, short side still ≥ 224
    assert decode_image(raw[2], Image(), draft_size=224).size == (28, 28)  # PNGs are decoded in full
    full = with_image_transform(stored_images, processor, uint8=True)[:]["pixel_values"].int()
    draft = with_image_transform(stored_images, processor, uint8=True, draft=True)[:]["pixel_values"].int()
    assert not torch.equal(full[0], draft[0])  # draft mode changes pixels: training only
    assert (full[0] - draft[0]).abs().float().mean() < 2.0  # documented tolerance: < 2 of 255 levels on average
    assert torch.equal(full[1:], draft[1:])  # small JPEGs and PNGs: no draft, identical


def test_load_task_drafts_the_train_split_only(tiny_task_data_dir, tiny_clip_dir, monkeypatch):
    seen = []
    real = loading.decode_image
    monkeypatch.setattr(loading, "decode_image", lambda v, f, d=None: seen.append(d) or real(v, f, d))
    processor = AutoImageProcessor.from_pretrained(tiny_clip_dir)
    data = load_task("TinyColors", tiny_task_data_dir, processor, uint8=True, draft=True)
    for split, draft_size in (("train", 32), ("validation", None), ("test", None)):
        seen.clear()
        data[split][:3]
        assert seen == [draft_size] * 3, split


def test_draft_without_uint8_is_refused(processor):
    with pytest.raises(ValueError, match="uint8=True"):
        loading.ImageTransform(processor, draft=True)


def test_classifier_normalises_uint8_pixels_like_the_processor(tiny_clip_dir, stored_images):
    processor = AutoImageProcessor.from_pretrained(tiny_clip_dir)
    vision = load_vision_tower(tiny_clip_dir).eval()
    head = ZeroShotHead.from_prototypes(torch.randn(2, vision.config.projection_dim))
    model = CLIPImageClassifier(vision, head, PixelNormalizer.from_processor(processor))
    uint8 = with_image_transform(stored_images, processor, uint8=True)[:]["pixel_values"]
    floats = with_image_transform(stored_images, processor)[:]["pixel_values"]
    with torch.no_grad():
        assert torch.equal(model(pixel_values=uint8).logits, model(pixel_values=floats).logits)
    with pytest.raises(ValueError, match="no normalizer"):
        CLIPImageClassifier(vision, head)(pixel_values=uint8)


# ----------------------------------------------------------------------------- workers
@pytest.mark.parametrize(
    ("cores", "processes", "expected"), [(1, None, 1), (2, None, 1), (8, None, 7), (64, None, 16), (32, "8", 3)]
)
def test_default_workers_leave_a_core_per_process_and_cap_at_16(monkeypatch, cores, processes, expected):
    monkeypatch.setattr(loading.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    if processes is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", processes)
    assert default_num_workers() == expected


def _count_decodes(monkeypatch, log: Path) -> None:
    """Count decode_image calls in this process and in forked DataLoader workers (one line per call)."""
    real = loading.decode_image

    def counting(value, feature, draft_size=None):
        with open(log, "a") as file:
            file.write("1\n")
        return real(value, feature, draft_size)

    monkeypatch.setattr(loading, "decode_image", counting)


def _decodes(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_cached_batches_decode_in_workers_once_and_keep_uint8(tiny_task_data_dir, tiny_clip_dir, tmp_path, monkeypatch):
    _count_decodes(monkeypatch, log := tmp_path / "decodes.txt")
    processor = AutoImageProcessor.from_pretrained(tiny_clip_dir)
    test = load_task("TinyPatterns", tiny_task_data_dir, processor, uint8=True)["test"]
    before = set(multiprocessing.active_children())
    batches = CachedBatches(test, batch_size=5, num_workers=2)
    first = list(batches)
    for _ in range(3):
        assert all(torch.equal(a[0], b[0]) for a, b in zip(first, batches))
    assert _decodes(log) == len(test) == 32
    assert {pixels.dtype for pixels, _ in batches._cached} == {torch.uint8}
    assert set(multiprocessing.active_children()) <= before  # the first pass's workers are gone


def test_cache_budget_counts_uint8_bytes_and_later_passes_read_only_the_uncached_rest():
    class Counting:
        def __init__(self) -> None:
            self.reads = 0

        def __len__(self) -> int:
            return 6

        def __getitem__(self, index: int) -> dict:
            self.reads += 1
            return {"pixel_values": torch.full((3, 4, 4), index, dtype=torch.uint8), "labels": index % 2}

    data = Counting()
    batches = CachedBatches(data, batch_size=2, cache_bytes=2 * 2 * 3 * 4 * 4)  # two uint8 batches, half an fp32 one
    assert batches.num_workers == 0  # in-memory data: nothing to decode, no workers
    list(batches), list(batches), list(batches)
    assert len(batches._cached) == 2 and data.reads == 6 + 2 + 2


def test_a_5000_image_vit_b32_validation_split_fits_the_default_cache_budget():
    from saft_hf.pipeline.evaluation import DEFAULT_CACHE_BYTES

    per_image = torch.zeros(3, 224, 224, dtype=torch.uint8)
    assert 5000 * per_image.numel() * per_image.element_size() <= DEFAULT_CACHE_BYTES < 5000 * per_image.numel() * 4


def test_a_20_lambda_search_decodes_each_validation_image_once(
    vector_dirs, tiny_task_data_dir, tmp_path, monkeypatch  # noqa: F811
):
    _count_decodes(monkeypatch, log := tmp_path / "decodes.txt")
    job = MergeJob(repos=[str(d) for d in vector_dirs], output=tmp_path / "merged", method="task_arithmetic",
                   search=True, grid=SEARCH_GRID, data_dir=tiny_task_data_dir, progress=False)  # fmt: skip
    outcome = run_merge_job(job)
    assert len(outcome.search.table) == 20
    validation = sum(len(load_task(task, tiny_task_data_dir)["validation"]) for task in ("TinyColors", "TinyPatterns"))
    assert _decodes(log) == validation == 12


def test_training_with_persistent_workers_leaves_no_process_behind(tiny_clip_dir, tiny_task_data_dir, tmp_path):
    from tests.examples import load_example

    train_saft = load_example("train_saft")
    script_args, training_args = train_saft.parse_args(
        ["--task", "TinyColors", "--model_name_or_path", str(tiny_clip_dir), "--data_dir", str(tiny_task_data_dir),
         "--output_dir", str(tmp_path / "out"), "--max_steps", "3", "--per_device_train_batch_size", "8",
         "--dataloader_num_workers", "2", "--eval_strategy", "steps", "--eval_steps", "2", "--use_cpu",
         "--disable_tqdm", "true"]
    )  # fmt: skip
    assert training_args.dataloader_persistent_workers and training_args.per_device_eval_batch_size == 128
    before = set(multiprocessing.active_children())
    results = train_saft.train_task("TinyColors", script_args, training_args)
    assert 0.0 <= results["test_accuracy"] <= 1.0
    gc.collect()
    assert set(multiprocessing.active_children()) <= before


def test_zero_workers_turns_persistent_workers_off(tiny_clip_dir, tiny_task_data_dir, tmp_path):
    from tests.examples import load_example

    _, training_args = load_example("train_saft").parse_args(
        ["--task", "TinyColors", "--output_dir", str(tmp_path), "--dataloader_num_workers", "0", "--use_cpu"]
    )
    assert training_args.dataloader_num_workers == 0 and not training_args.dataloader_persistent_workers


# ----------------------------------------------------------------------------- devices
def test_auto_device_is_cuda_when_available_else_cpu():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto") and resolve_device("cpu") == torch.device("cpu")


def test_cuda_on_a_machine_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="no usable CUDA device; use auto or cpu"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("gpu0")


def test_merge_job_resolves_auto_and_refuses_cuda_without_it(vector_dirs, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    job = MergeJob(repos=[str(d) for d in vector_dirs], output=tmp_path / "a")
    assert job.device == "auto"
    job.validate()
    assert job.device == "cpu"
    with pytest.raises(MergeUsageError, match="'cuda' asks for CUDA"):
        MergeJob(repos=[str(d) for d in vector_dirs], output=tmp_path / "b", device="cuda").validate()


def test_saft_merge_and_saft_analyze_default_to_auto_and_reject_missing_cuda(vector_dirs, tmp_path, monkeypatch, capsys):  # noqa: F811
    from saft_hf.cli import analyze, merge

    assert merge.build_parser().parse_args(["--repos", "a,b", "--output", "o"]).device == "auto"
    analyze_args = ["--base", "b", "--vectors", "a,b", "--output", str(tmp_path / "an"), "--data-dir", str(tmp_path)]
    assert analyze.build_parser().parse_args(analyze_args).device == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    repos = ",".join(str(d) for d in vector_dirs)
    assert merge.main(["--repos", repos, "--output", str(tmp_path / "m"), "--device", "cuda", "--no-progress"]) == 2
    assert "no usable CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        analyze.main([*analyze_args, "--device", "cuda"])
    assert exit_info.value.code == 2 and "no usable CUDA device" in capsys.readouterr().err


def test_reproduce_checks_the_merge_device_before_any_training(monkeypatch):
    from tests.examples import load_example

    reproduce = load_example("reproduce_saft")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args, _ = reproduce.build_parser().parse_args_into_dataclasses(
        args=["--output_dir", "unused", "--tasks", "TinyColors", "TinyPatterns", "--merge_device", "cuda"]
    )
    assert reproduce.ReproduceArguments.merge_device == "auto"
    with pytest.raises(reproduce.UsageError, match="--merge_device 'cuda' asks for CUDA"):
        reproduce.check_arguments(args)
