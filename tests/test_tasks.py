"""The task registry (names, Hub ids, class names, templates) and load_task's splits, checks and transform."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from PIL import Image as PILImage
from transformers import AutoImageProcessor

from saft_hf.tasks import TASKS, TaskSpec, load_task, register_task, resolve_task, split_train_validation
from tests.fixtures_clip import TINY_TASKS

# Ilharco et al. (2023) / SAFT Table 1: the eight tasks and their class counts
PAPER_CLASS_COUNTS = {
    "Cars": 196,
    "DTD": 47,
    "EuroSAT": 10,
    "GTSRB": 43,
    "MNIST": 10,
    "RESISC45": 45,
    "SUN397": 397,
    "SVHN": 10,
}


def test_registry_holds_the_eight_tasks_with_their_class_counts():
    assert {name: spec.num_classes for name, spec in TASKS.items()} == PAPER_CLASS_COUNTS


def test_registry_uses_the_hub_ids_and_configs_of_the_issue():
    assert TASKS["Cars"].dataset_id == "tanganke/stanford_cars"
    assert TASKS["MNIST"].dataset_id == "ylecun/mnist"
    assert (TASKS["SVHN"].dataset_id, TASKS["SVHN"].config) == ("ufldl-stanford/svhn", "cropped_digits")
    assert all(spec.image_column == "image" and spec.label_column == "label" for spec in TASKS.values())


def test_class_names_are_unique_and_every_template_names_the_class():
    for spec in TASKS.values():
        assert len(set(spec.classnames)) == spec.num_classes, spec.name
        for prompt in spec.prompts("zebra crossing"):
            assert "zebra crossing" in prompt, (spec.name, prompt)


def test_lookup_is_case_insensitive():
    assert TASKS["eurosat"] is TASKS["EuroSAT"]
    assert "sun397" in TASKS and "Nope" not in TASKS


def test_unknown_task_error_lists_the_known_tasks(tmp_path):
    with pytest.raises(KeyError) as err:
        load_task("ImageNet", data_dir=tmp_path)
    for name in PAPER_CLASS_COUNTS:
        assert name in str(err.value)


def test_task_spec_is_frozen():
    with pytest.raises(AttributeError):
        TASKS["DTD"].dataset_id = "other/dtd"  # type: ignore[misc]


def test_validation_is_a_seeded_tenth_of_train_capped_and_disjoint():
    train = Dataset.from_dict({"idx": list(range(200))})
    rest, val = split_train_validation(train, 0.1, max_val_samples=15, seed=0)
    assert (len(rest), len(val)) == (185, 15)
    assert set(rest["idx"]) | set(val["idx"]) == set(range(200)) and not set(rest["idx"]) & set(val["idx"])
    # same draw as torch.utils.data.random_split with manual_seed(0), as in the task_vectors repo
    _, reference = torch.utils.data.random_split(range(200), [185, 15], torch.Generator().manual_seed(0))
    assert val["idx"] == list(reference)
    _, other_seed = split_train_validation(train, 0.1, max_val_samples=15, seed=1)
    assert other_seed["idx"] != val["idx"]


def test_load_task_returns_train_validation_test(tiny_task_data_dir):
    data = load_task("TinyColors", data_dir=tiny_task_data_dir)
    assert list(data) == ["train", "validation", "test"]
    assert (len(data["train"]), len(data["validation"]), len(data["test"])) == (58, 6, 32)


def test_image_processor_transform_yields_rgb_pixel_values_lazily(tiny_task_data_dir, tiny_clip_dir):
    processor = AutoImageProcessor.from_pretrained(tiny_clip_dir)
    data = load_task("TinyPatterns", data_dir=tiny_task_data_dir, image_processor=processor)
    raw = load_task("TinyPatterns", data_dir=tiny_task_data_dir)
    modes = {image.mode for image in raw["train"]["image"]}
    assert modes - {"RGB"}, "fixture should contain grey/RGBA images to convert"
    batch = data["train"][:10]
    assert batch["pixel_values"].shape == (10, 3, 32, 32)
    assert batch["labels"].tolist() == raw["train"]["label"][:10]


def test_data_dir_comes_from_the_environment(tiny_task_data_dir, monkeypatch):
    monkeypatch.setenv("SAFT_DATA_DIR", str(tiny_task_data_dir))
    assert len(load_task("TinyPatterns")["test"]) == 32
    with pytest.raises(FileNotFoundError, match="DTD"):
        load_task("DTD")


def test_task_spec_json_beside_the_data_defines_the_task(tiny_task_data_dir):
    spec = resolve_task("TinyColors", tiny_task_data_dir)
    assert spec.classnames == tuple(TINY_TASKS["TinyColors"])


def _save(tmp_path, name, features, rows, spec=None):
    splits = {s: Dataset.from_dict(rows, features=Features(features)) for s in ("train", "test")}
    DatasetDict(splits).save_to_disk(str(tmp_path / name))
    if spec is not None:
        (tmp_path / name / "task_spec.json").write_text(json.dumps(spec))
    return tmp_path / name


def _images(n):
    return [PILImage.new("RGB", (8, 8), (i * 20, 0, 0)) for i in range(n)]


def test_missing_columns_error_names_them(tmp_path):
    features = {"img": Image(), "target": ClassLabel(names=list("abc"))}
    spec = {"name": "Cols", "classnames": list("abc"), "templates": ["{}"]}
    _save(tmp_path, "Cols", features, {"img": _images(20), "target": [0, 1] * 10}, spec)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['image', 'label'\].*'img', 'target'"):
        load_task("Cols", data_dir=tmp_path)


def test_class_count_mismatch_with_the_task_is_an_error(tmp_path):
    features = {"image": Image(), "label": ClassLabel(names=list("abcd"))}
    spec = {"name": "Count", "classnames": list("abc"), "templates": ["a {}"]}
    _save(tmp_path, "Count", features, {"image": _images(20), "label": [0, 3] * 10}, spec)
    with pytest.raises(ValueError, match="4 classes .* 3 class names"):
        load_task("Count", data_dir=tmp_path)


def test_non_image_column_error_says_how_to_cast(tmp_path):
    features = {"image": Value("string"), "label": ClassLabel(names=list("ab"))}
    spec = {"name": "Strs", "classnames": list("ab"), "templates": ["a {}"]}
    _save(tmp_path, "Strs", features, {"image": ["x"] * 20, "label": [0, 1] * 10}, spec)
    with pytest.raises(ValueError, match="cast_column"):
        load_task("Strs", data_dir=tmp_path)


def test_registered_task_loads_from_a_plain_data_dir(tiny_task_data_dir):
    spec = TaskSpec("TinyRegistered", "local/tiny", ("red", "green", "blue", "yellow"), ("a {} photo.",))
    register_task(spec)
    try:
        data = load_task("tinyregistered", data_dir=tiny_task_data_dir / "TinyColors")
        assert len(data["test"]) == 32
        with pytest.raises(ValueError, match="already registered"):
            register_task(spec)
    finally:
        TASKS.unregister("TinyRegistered")
    assert "TinyRegistered" not in TASKS


def test_bad_task_spec_json_names_the_unknown_key(tmp_path):
    path = tmp_path / "task_spec.json"
    path.write_text(json.dumps({"name": "X", "classnames": ["a"], "templates": ["{}"], "colour": "red"}))
    with pytest.raises(ValueError, match="colour"):
        TaskSpec.from_json(path)
