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


# ----------------------------------------------------------------------------- label order by name
def test_class_label_names_in_another_order_are_an_error_naming_the_first_difference(tmp_path):
    features = {"image": Image(), "label": ClassLabel(names=["red", "blue", "green"])}
    spec = {"name": "Order", "classnames": ["red", "green", "blue"], "templates": ["a {}"]}
    _save(tmp_path, "Order", features, {"image": _images(20), "label": [0, 1] * 10}, spec)
    with pytest.raises(ValueError, match=r"label 1 of .* is 'blue' .* but 'green' in the task's class names"):
        load_task("Order", data_dir=tmp_path)


def test_class_label_names_match_ignoring_case_underscores_hyphens_and_spaces(tmp_path):
    features = {"image": Image(), "label": ClassLabel(names=["Annual_Crop-Land", "forest", "Type-S  car"])}
    spec = {"name": "Wording", "classnames": ["annual crop land", "Forest", "type s car"], "templates": ["a {}"]}
    _save(tmp_path, "Wording", features, {"image": _images(20), "label": [0, 2] * 10}, spec)
    assert len(load_task("Wording", data_dir=tmp_path)["test"]) == 20


def test_integer_labels_and_count_only_class_labels_are_checked_by_count(tmp_path):
    spec = {"name": "Ints", "classnames": ["cat", "dog"], "templates": ["a {}"]}
    _save(tmp_path, "Ints", {"image": Image(), "label": Value("int64")}, {"image": _images(20), "label": [0, 1] * 10}, spec)
    assert len(load_task("Ints", data_dir=tmp_path)["train"]) == 18
    spec = {"name": "Counted", "classnames": ["cat", "dog"], "templates": ["a {}"]}
    features = {"image": Image(), "label": ClassLabel(num_classes=2)}  # names "0", "1": no order to check
    _save(tmp_path, "Counted", features, {"image": _images(20), "label": [0, 1] * 10}, spec)
    assert len(load_task("Counted", data_dir=tmp_path)["train"]) == 18


# the first ClassLabel names of the real Hub datasets (../shared/REAL_HUB.md, section 3)
REAL_FIRST_NAMES = {
    "Cars": ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012", "Acura TL Type-S 2008",
             "Acura TSX Sedan 2012"],
    "RESISC45": ["airplane", "airport", "baseball diamond", "basketball court", "beach"],
    "GTSRB": [f"red and white circle {n} kph speed limit" for n in (20, 30, 50, 60, 70)],
    "EuroSAT": ["annual crop land", "forest", "brushland or shrubland", "highway or road",
                "industrial buildings or commercial buildings"],
    "DTD": ["banded", "blotchy", "braided", "bubbly", "bumpy"],
    "SUN397": ["abbey", "airplane cabin", "airport terminal", "alley", "amphitheater"],
    "MNIST": [str(i) for i in range(5)],
}  # fmt: skip


@pytest.mark.parametrize("task", sorted(REAL_FIRST_NAMES))
def test_registry_class_names_pass_the_order_check_against_the_real_datasets_first_names(task):
    from saft_hf.tasks.loading import _check_label_names

    spec = TASKS[task]
    real = ClassLabel(names=REAL_FIRST_NAMES[task] + list(spec.classnames[5:]))  # the rest as our registry has it
    _check_label_names(spec, real, spec.dataset_id)
    swapped = ClassLabel(names=[real.names[1], real.names[0], *real.names[2:]])
    with pytest.raises(ValueError, match="label 0 of"):
        _check_label_names(spec, swapped, spec.dataset_id)


# ----------------------------------------------------------------------------- download only what runs
CORRUPTIONS = ("contrast", "gaussian_noise", "impulse_noise", "jpeg_compression", "motion_blur", "pixelate", "spatter")


def _hub_like_repo(root, layout: str, extra_splits, config_yaml: str | None = None):
    """A dataset repo laid out as the real ones (``<layout>/<split>-00000-of-00001.parquet``); the extra splits'
    files are not parquet at all, so reading or preparing any of them fails."""
    features = Features({"image": Image(), "label": ClassLabel(names=["red", "green"])})
    (root / layout).mkdir(parents=True)
    for split, rows in (("train", 30), ("test", 10)):
        data = {"image": _images(rows), "label": [i % 2 for i in range(rows)]}
        Dataset.from_dict(data, features=features).to_parquet(str(root / layout / f"{split}-00000-of-00001.parquet"))
    for split in extra_splits:
        (root / layout / f"{split}-00000-of-00001.parquet").write_bytes(b"not parquet: this split must never be read")
    if config_yaml:
        (root / "README.md").write_text(config_yaml)
    return root


def _prepared_files(cache) -> list[str]:
    return sorted(p.name for p in cache.rglob("*.arrow"))


def test_only_the_train_and_test_splits_are_prepared_not_the_corruption_splits(tmp_path):
    repo = _hub_like_repo(tmp_path / "stanford_cars", "data", CORRUPTIONS)
    (repo / "task_spec.json").write_text(json.dumps({"name": "CarsLike", "classnames": ["red", "green"],
                                                     "templates": ["a {}"]}))  # fmt: skip
    cache = tmp_path / "cache"
    data = load_task("CarsLike", data_dir=repo, cache_dir=cache)
    assert (len(data["train"]), len(data["validation"]), len(data["test"])) == (27, 3, 10)
    prepared = _prepared_files(cache)
    assert prepared and all("train" in name or "test" in name for name in prepared), prepared


def test_a_named_config_with_an_extra_split_loads_without_reading_extra(tmp_path):
    yaml = (
        "---\nconfigs:\n- config_name: cropped_digits\n  data_files:\n"
        + "".join(f"  - split: {s}\n    path: cropped_digits/{s}-*\n" for s in ("train", "test", "extra"))
        + "---\n"
    )
    repo = _hub_like_repo(tmp_path / "svhn", "cropped_digits", ["extra"], yaml)
    spec = TaskSpec("SvhnLike", str(repo), ("red", "green"), ("a {}",), config="cropped_digits")
    register_task(spec)
    try:
        cache = tmp_path / "cache"
        data = load_task("SvhnLike", cache_dir=cache)  # through the Hub code path: dataset_id, config
        assert len(data["test"]) == 10
        assert not any("extra" in name for name in _prepared_files(cache))
    finally:
        TASKS.unregister("SvhnLike")


def test_a_repo_without_the_test_split_names_its_splits_before_downloading(tmp_path):
    repo = tmp_path / "partial"
    (repo / "data").mkdir(parents=True)
    features = Features({"image": Image(), "label": ClassLabel(names=["red", "green"])})
    Dataset.from_dict({"image": _images(10), "label": [0, 1] * 5}, features=features).to_parquet(
        str(repo / "data" / "train-00000-of-00001.parquet")
    )
    (repo / "data" / "extra-00000-of-00001.parquet").write_bytes(b"never read")
    (repo / "task_spec.json").write_text(json.dumps({"name": "Partial", "classnames": ["red", "green"],
                                                     "templates": ["a {}"]}))  # fmt: skip
    with pytest.raises(ValueError, match=r"lacks split\(s\) \['test'\]; it has \['train', 'extra'\]"):
        load_task("Partial", data_dir=repo, cache_dir=tmp_path / "cache")
