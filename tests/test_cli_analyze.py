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


def _save_vector(root, name, tower, task, seed, *, prefix="", head=True, method=None):
    gen = torch.Generator().manual_seed(seed)
    tensors = {prefix + n: 0.2 * torch.randn(p.shape, generator=gen) for n, p in tower.named_parameters()}
    head_dir = None
    if head:
        head_dir = root / f"{name}-head"
        prototypes = torch.randn(len(TINY_TASKS[task]), 16, generator=gen)
        ZeroShotHead.from_prototypes(prototypes, TINY_TASKS[task], task=task).save_pretrained(head_dir)
    config = {"task": task, **({"finetuning": {"method": method}} if method else {})}
    vector = TaskVector(tensors, config, head_dir=head_dir)
    return str(vector.save_pretrained(root / name, model_card=False))


@pytest.fixture(scope="module")
def vectors(tiny_clip_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("vectors")
    tower = load_vision_tower(tiny_clip_dir)
    tasks = list(TINY_TASKS)
    return {
        "standard": [_save_vector(root, f"std-{t}", tower, t, i, method="standard") for i, t in enumerate(tasks)],
        "saft": [_save_vector(root, f"saft-{t}", tower, t, 10 + i, method="ASAM") for i, t in enumerate(tasks)],
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
    assert set(results["pairs"]) == {"standard", "ASAM"} == set(results["summary"])  # the recorded methods
    for entry in results["pairs"].values():
        assert entry["grid"]["num_others"] == 1 and entry["grid"]["num_samples"] == dict.fromkeys(TINY_TASKS, 6)
        assert len(entry["ctl"]) == 2  # one value per transformer block of the tiny tower
    for metric in ("xi", "joint_loss"):
        with Image.open(output / FIGURES[metric]) as img:
            assert img.size == heatmap_figure_size(2)
    with Image.open(output / FIGURES["ctl"]) as img:
        assert img.format == "PNG"
    out = capsys.readouterr().out
    assert "standard:" in out and "ASAM:" in out and "mean_xi=" in out


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


def test_explicit_labels_name_the_pairs(tiny_clip_dir, tiny_task_data_dir, vectors, tmp_path):
    output = tmp_path / "out"
    argv = _args(tiny_clip_dir, tiny_task_data_dir, vectors, output, "--compare", ",".join(vectors["saft"]),
                 "--labels", "plain,SAFT", "--no-ctl")  # fmt: skip
    assert main(argv) == 0
    assert list(json.loads((output / RESULTS_NAME).read_text())["pairs"]) == ["plain", "SAFT"]


def test_pair_labels_come_from_the_recorded_method_and_stay_distinct():
    from types import SimpleNamespace

    from saft_hf.analysis.report import pair_labels

    def vector(method):
        return SimpleNamespace(config={"finetuning": {"method": method}} if method else {})

    fallbacks = ["--vectors", "--compare"]
    assert pair_labels([[vector("ASAM")] * 2, [vector("standard")] * 2], fallbacks) == ["ASAM", "standard"]
    assert pair_labels([[vector("SAM"), vector("standard")]], fallbacks[:1]) == ["SAM+standard"]
    assert pair_labels([[vector(None)] * 2, [vector("ASAM")] * 2], fallbacks) == ["--vectors", "ASAM"]
    assert pair_labels([[vector("ASAM")] * 2] * 2, fallbacks) == ["ASAM (--vectors)", "ASAM (--compare)"]


@pytest.mark.parametrize(
    ("grid", "alphas"), [("0:1:0.5", [0.0, 0.5, 1.0]), ("-0.5:0.5:0.5", [-0.5, 0.0, 0.5]), ("0,1", [0.0, 1.0])]
)
def test_grid_uses_the_same_start_stop_step_syntax_as_saft_merge(grid, alphas):
    from saft_hf.cli.analyze import build_parser

    argv = ["--base", "b", "--vectors", "a,b", "--output", "o", f"--grid={grid}"]
    assert build_parser().parse_args(argv).grid == alphas


def test_start_stop_num_grid_is_refused_with_the_step_form(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--base", "b", "--vectors", "a,b", "--output", "o", "--grid", "0:1:3"])
    assert exc.value.code == 2 and "for 3 values from 0 to 1 write 0:1:0.5" in capsys.readouterr().err


def test_missing_data_dir_offline_is_one_clear_error_before_loading(tiny_clip_dir, vectors, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("SAFT_DATA_DIR", raising=False)
    argv = ["--base", str(tiny_clip_dir), "--vectors", ",".join(vectors["standard"]), "--output", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "no --data-dir (or $SAFT_DATA_DIR) is given and the Hub is offline" in err
    assert "unknown task" not in err and not (tmp_path / "o").exists()


def test_unwritable_output_parent_is_named(tiny_clip_dir, tiny_task_data_dir, vectors, capsys):
    with pytest.raises(SystemExit) as exc:
        main(_args(tiny_clip_dir, tiny_task_data_dir, vectors, "/sys/saft-analysis"))
    assert exc.value.code == 2 and "parent folder '/sys' is not writable" in capsys.readouterr().err


@pytest.mark.parametrize("panels", [1, 2])
def test_heatmap_title_fits_inside_the_figure_and_the_colour_bar_is_labelled(panels, tmp_path, monkeypatch):
    from saft_hf.analysis import plots

    seen = {}

    def inspect(fig, path, dpi):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        title = fig._suptitle.get_window_extent(renderer)
        seen["inside"] = fig.bbox.x0 <= title.x0 and title.x1 <= fig.bbox.x1 and title.y1 <= fig.bbox.y1
        seen["colorbar"] = fig.axes[-1].get_ylabel()
        return path

    monkeypatch.setattr(plots, "_save_png", inspect)
    long_title = "Weight disentanglement error ξ (RESISC45-with-a-long-name + SUN397-with-a-long-name)"
    grids = {f"pair {i}": [[0.0, 1.0], [1.0, 2.0]] for i in range(panels)}
    plots.plot_heatmaps(grids, tmp_path / "h.png", alphas=[0.0, 1.0], title=long_title, colorbar_label="ξ")
    assert seen == {"inside": True, "colorbar": "ξ"}


def test_report_figures_label_their_colour_bars(tmp_path, monkeypatch):
    from saft_hf.analysis import plots, report

    labels = []
    monkeypatch.setattr(plots, "_save_png", lambda fig, path, dpi: labels.append(fig.axes[-1].get_ylabel()) or path)
    grid = {"xi": [[0.0, 1.0], [1.0, 2.0]], "joint_loss": [[1.0, 2.0], [3.0, 4.0]]}
    fake = {"tasks": ["A", "B"], "alphas": [0.0, 1.0], "ctl_lambda": 0.3, "pairs": {"ASAM": {"grid": grid}}}
    report._write_contents(fake, tmp_path, None)
    assert labels == [report.COLORBAR_LABELS["xi"], report.COLORBAR_LABELS["joint_loss"]] and all(labels)


def test_a_grid_starting_with_a_minus_sign_needs_no_equals_sign():
    from saft_hf.cli.analyze import build_parser
    from saft_hf.cli.options import attach_negative_values

    argv = attach_negative_values(["--base", "b", "--vectors", "a,b", "--output", "o", "--grid", "-0.5:1.5:0.25"],
                                  ("--grid",))  # fmt: skip
    assert build_parser().parse_args(argv).grid == [-0.5 + 0.25 * i for i in range(9)]
    assert attach_negative_values(["--grid", "--output", "o"], ("--grid",)) == ["--grid", "--output", "o"]
