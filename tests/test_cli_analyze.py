"""saft-analyze end to end on the tiny CLIP checkpoint and tiny tasks, offline."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from saft_hf.analysis.inputs import VisionTowerHolder, load_analysis_inputs
from saft_hf.analysis.plots import heatmap_figure_size
from saft_hf.analysis.report import FIGURES, RESULTS_NAME
from saft_hf.cli.analyze import main
from saft_hf.clip import ZeroShotHead, load_vision_tower
from saft_hf.task_vectors import TaskVector
from tests.fixtures_clip import TINY_TASKS


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _save_vector(root, name, tower, task, seed, *, prefix="", head=True):
    gen = torch.Generator().manual_seed(seed)
    tensors = {prefix + n: 0.2 * torch.randn(p.shape, generator=gen) for n, p in tower.named_parameters()}
    head_dir = None
    if head:
        head_dir = root / f"{name}-head"
        prototypes = torch.randn(len(TINY_TASKS[task]), 16, generator=gen)
        ZeroShotHead.from_prototypes(prototypes, TINY_TASKS[task], task=task).save_pretrained(head_dir)
    vector = TaskVector(tensors, {"task": task}, head_dir=head_dir)
    return str(vector.save_pretrained(root / name, model_card=False))


@pytest.fixture(scope="module")
def vectors(tiny_clip_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("vectors")
    tower = load_vision_tower(tiny_clip_dir)
    tasks = list(TINY_TASKS)
    return {
        "standard": [_save_vector(root, f"std-{t}", tower, t, i) for i, t in enumerate(tasks)],
        "saft": [_save_vector(root, f"saft-{t}", tower, t, 10 + i) for i, t in enumerate(tasks)],
        "other": _save_vector(root, "other", tower, tasks[0], 20),
        "headless": _save_vector(root, "headless", tower, tasks[0], 30, head=False),
        "prefixed": [_save_vector(root, f"pre-{t}", tower, t, 40 + i, prefix="vision_model.") for i, t in enumerate(tasks)],
    }


def _args(tiny_clip_dir, tiny_task_data_dir, vectors, output, *extra):
    return [
        "--base", str(tiny_clip_dir), "--vectors", ",".join(vectors["standard"]),
        "--data-dir", str(tiny_task_data_dir), "--max-samples", "6", "--batch-size", "4",
        "--grid", "0,1", "--output", str(output), "--no-progress", *extra,
    ]  # fmt: skip


def test_help_names_the_main_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--base", "--vectors", "--compare", "--tasks", "--others", "--grid", "--max-samples", "--output"):
        assert option in text


def test_writes_json_and_side_by_side_figures_for_both_pairs(tiny_clip_dir, tiny_task_data_dir, vectors, tmp_path, capsys):
    output = tmp_path / "out"
    argv = _args(tiny_clip_dir, tiny_task_data_dir, vectors, output, "--compare", ",".join(vectors["saft"]),
                 "--others", vectors["other"])  # fmt: skip
    assert main(argv) == 0
    results = json.loads((output / RESULTS_NAME).read_text())
    assert results["tasks"] == list(TINY_TASKS)  # taken from the vectors' config
    assert results["alphas"] == [0.0, 1.0]
    assert set(results["pairs"]) == {"standard", "SAFT"} == set(results["summary"])
    for entry in results["pairs"].values():
        assert entry["grid"]["num_others"] == 1 and entry["grid"]["num_samples"] == dict.fromkeys(TINY_TASKS, 6)
        assert len(entry["ctl"]) == 2  # one value per transformer block of the tiny tower
    for metric in ("xi", "joint_loss"):
        with Image.open(output / FIGURES[metric]) as img:
            assert img.size == heatmap_figure_size(2)
    with Image.open(output / FIGURES["ctl"]) as img:
        assert img.format == "PNG"
    out = capsys.readouterr().out
    assert "standard:" in out and "SAFT:" in out and "mean_xi=" in out


def test_refuses_an_existing_output_unless_overwrite(tiny_clip_dir, tiny_task_data_dir, vectors, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exc:
        main(_args(tiny_clip_dir, tiny_task_data_dir, vectors, output, "--no-ctl"))
    assert exc.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert (output / "keep.txt").read_text() == "mine"
    assert main(_args(tiny_clip_dir, tiny_task_data_dir, vectors, output, "--no-ctl", "--overwrite")) == 0
    assert not (output / "keep.txt").exists() and not (output / FIGURES["ctl"]).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_vector_without_head_is_reported_by_name(tiny_clip_dir, tiny_task_data_dir, vectors, tmp_path, capsys):
    bad = dict(vectors, standard=[vectors["headless"], vectors["standard"][1]])
    assert main(_args(tiny_clip_dir, tiny_task_data_dir, bad, tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert "head.safetensors" in err and "headless" in err
    assert not (tmp_path / "out").exists()


def test_classifier_named_vectors_are_applied_to_the_held_tower(tiny_clip_dir, tiny_task_data_dir, vectors):
    inputs = load_analysis_inputs(
        tiny_clip_dir, {"standard": vectors["prefixed"]}, data_dir=tiny_task_data_dir, max_samples=2
    )
    assert isinstance(inputs.model, VisionTowerHolder)
    assert set(inputs.pairs["standard"][0].keys()) <= set(inputs.base_state)
    assert [len(b["labels"]) for b in inputs.data["TinyColors"]] == [2]
