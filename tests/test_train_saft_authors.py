"""examples/train_saft.py --recipe authors-code (the paper's released code) against --recipe paper-text (its text)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from saft_hf.hub import make_model_card
from saft_hf.recipes import AUTHORS_EPOCHS, RandomResizedCropTransform, _crop_box
from saft_hf.task_vectors import TaskVector
from tests.examples import load_example


def _script():
    return load_example("train_saft")


def test_default_recipe_is_the_papers_text(tmp_path):
    script_args, args = _script().parse_args(["--output_dir", str(tmp_path)])
    assert script_args.recipe == "paper-text"
    assert (args.sam_eta, args.sam_adaptive_scope, args.sam_loop, args.max_steps) == (0.01, "weights", "clean", 8000)


def test_authors_code_recipe_selects_the_released_codes_settings_and_flags_still_override(tmp_path):
    _, args = _script().parse_args(["--output_dir", str(tmp_path), "--recipe", "authors-code"])
    assert (args.sam_eta, args.sam_adaptive_scope, args.sam_loop) == (0.0, "all", "authors")
    assert (args.max_steps, str(args.eval_strategy.value)) == (-1, "epoch")
    assert (args.learning_rate, args.per_device_train_batch_size, args.weight_decay, args.max_grad_norm) == (
        1e-5, 128, 0.1, 1.0,
    )  # fmt: skip
    _, changed = _script().parse_args(["--output_dir", str(tmp_path), "--recipe=authors-code", "--sam_eta", "0.05"])
    assert (changed.sam_eta, changed.sam_loop) == (0.05, "authors")


def test_authors_epochs_follow_their_table_and_an_unknown_task_names_the_fix(tmp_path):
    script = _script()
    script_args, _ = script.parse_args(["--output_dir", str(tmp_path), "--recipe", "authors-code"])
    assert [script.authors_epochs(t, script_args) for t in ("cars", "DTD", "SVHN")] == [140, 304, 16]
    assert AUTHORS_EPOCHS == {"Cars": 140, "DTD": 304, "EuroSAT": 48, "GTSRB": 44, "MNIST": 20, "RESISC45": 60,
                              "SUN397": 56, "SVHN": 16}  # fmt: skip
    with pytest.raises(script.UsageError, match="give --epochs"):
        script.authors_epochs("TinyColors", script_args)


def test_epochs_without_the_authors_recipe_is_refused(tmp_path):
    with pytest.raises(_script().UsageError, match="--epochs belongs to --recipe authors-code"):
        _script().parse_args(["--output_dir", str(tmp_path), "--epochs", "3"])


def test_help_names_both_recipes():
    text = _script().build_parser().format_help()
    assert "--recipe" in text and "paper-text" in text and "authors-code" in text and "released code" in text


def test_random_resized_crop_keeps_90_to_100_percent_of_the_area_and_the_ratio_range():
    torch.manual_seed(0)
    for _ in range(200):
        left, top, w, h = _crop_box(64, 48, (0.9, 1.0), (3 / 4, 4 / 3))
        assert 0 <= left and left + w <= 64 and 0 <= top and top + h <= 48
        assert 0.85 * 64 * 48 <= w * h <= 64 * 48  # rounding of w and h aside, scale 0.9-1.0


class _Processor:
    """Just the normalisation of a CLIP image processor, recording what it was asked."""

    crop_size = {"height": 16, "width": 16}

    def __call__(self, images, return_tensors, do_resize, do_center_crop):
        assert not do_resize and not do_center_crop
        return {"pixel_values": torch.stack([torch.tensor(list(i.get_flattened_data()), dtype=torch.float32).T.reshape(3, 16, 16)
                                             for i in images])}  # fmt: skip


def test_training_transform_crops_randomly_to_the_processors_size():
    transform = RandomResizedCropTransform(_Processor())
    image = Image.new("RGB", (40, 30))
    image.putdata([(x % 256, y % 256, (x * y) % 256) for y in range(30) for x in range(40)])
    torch.manual_seed(1)
    first = transform({"image": [image], "label": [2]})
    second = transform({"image": [image], "label": [2]})
    torch.manual_seed(1)
    again = transform({"image": [image], "label": [2]})
    assert first["pixel_values"].shape == (1, 3, 16, 16) and first["labels"].tolist() == [2]
    assert torch.equal(first["pixel_values"], again["pixel_values"])
    assert not torch.equal(first["pixel_values"], second["pixel_values"])


def test_authors_code_run_writes_last_and_best_task_vectors_naming_the_recipe(tmp_path, tiny_clip_dir, tiny_task_data_dir):
    out = tmp_path / "out"
    code = _script().main([
        "--task", "TinyColors", "--recipe", "authors-code", "--epochs", "2", "--model_name_or_path", str(tiny_clip_dir),
        "--data_dir", str(tiny_task_data_dir), "--output_dir", str(out), "--per_device_train_batch_size", "8",
        "--learning_rate", "1e-3", "--warmup_steps", "0", "--use_cpu", "--disable_tqdm", "true",
    ])  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["hyperparameters"]["recipe"] == "authors-code"
    assert results["hyperparameters"]["sam_loop"] == "authors" and results["hyperparameters"]["sam_eta"] == 0.0
    assert results["hyperparameters"]["num_train_epochs"] == 2.0 and "released code" in results["recipe"]
    assert results["best"]["epoch"] in (1.0, 2.0)
    last, best = TaskVector.from_pretrained(out / "task_vector"), TaskVector.from_pretrained(out / "task_vector_best")
    assert last.config["checkpoint"] == "last" and best.config["checkpoint"].startswith("best (epoch")
    assert best.config["metrics"]["validation_accuracy"] == results["best"]["validation_accuracy"]
    for vector in (last, best):
        assert "authors-code" in vector.config["recipe"]
        assert "recipe=authors-code" in str(make_model_card(vector))
    assert not (out / "best_vision_model").exists()
