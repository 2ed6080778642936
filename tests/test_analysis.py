"""saft_hf.analysis: ξ grid, joint loss, CTL, figures and the report folder, on a tiny CLIP tower."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from saft_hf.analysis import (
    analyze_pairs,
    cross_task_linearity,
    heads_logits_fn,
    plot_ctl,
    plot_heatmaps,
    prepare_eval_data,
    summarize,
    weight_disentanglement,
    write_report,
)
from saft_hf.analysis.plots import heatmap_figure_size
from saft_hf.analysis.report import FIGURES, RESULTS_NAME
from saft_hf.task_vectors import add_scaled_

TASKS = ("alpha", "beta")
ALPHAS = [0.0, 0.5, 1.0]


def _random_vector(model: nn.Module, seed: int, scale: float) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; tiny models gain nothing from threads
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=16,
    )  # fmt: skip
    model = CLIPVisionModelWithProjection(config).eval()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    heads = {task: nn.Linear(16, 3) for task in TASKS}
    gen = torch.Generator().manual_seed(1)
    data = {
        task: prepare_eval_data(
            [{"pixel_values": torch.randn(3, 32, 32, generator=gen), "labels": i % 3} for i in range(10)],
            batch_size=4,
        )
        for task in TASKS
    }
    vectors = [_random_vector(model, 10 + k, 0.3) for k in range(3)]
    return model, base_state, heads_logits_fn(heads), data, vectors


def _direct(model, base_state, logits_fn, data, deltas, scales, task):
    add_scaled_(model, base_state, deltas, scales)
    with torch.no_grad():
        logits = torch.cat([logits_fn(model, b, task) for b in data[task]])
    labels = torch.cat([b["labels"] for b in data[task]])
    add_scaled_(model, base_state, [], [])
    return logits.argmax(-1), F.cross_entropy(logits, labels).item()


def _grid(setup, **kwargs):
    model, base_state, logits_fn, data, vectors = setup
    kwargs.setdefault("alphas", ALPHAS)
    return weight_disentanglement(
        model, base_state, vectors[:2], data, logits_fn, tasks=TASKS, progress=False, **kwargs
    )


def _assert_at_base(model, base_state):
    for name, value in model.state_dict().items():
        assert torch.equal(value, base_state[name]), name


def test_xi_is_zero_where_the_other_coefficient_is_zero(setup):
    grid = _grid(setup)
    zero = ALPHAS.index(0.0)
    for i in range(len(ALPHAS)):
        assert grid.xi_per_task["alpha"][i][zero] == 0.0  # θ₀+α₁τ₁ is the single-task model of task 1
        assert grid.xi_per_task["beta"][zero][i] == 0.0
    assert grid.xi[zero][zero] == 0.0
    assert max(max(row) for row in grid.xi) > 0.0  # the random vectors do interfere somewhere


def test_xi_and_joint_loss_match_a_direct_computation_at_an_asymmetric_point(setup):
    model, base_state, logits_fn, data, vectors = setup
    grid = _grid(setup)
    i, j = ALPHAS.index(1.0), ALPHAS.index(0.5)
    xi, loss = 0.0, 0.0
    for t, task in enumerate(TASKS):
        merged, task_loss = _direct(model, base_state, logits_fn, data, vectors[:2], [1.0, 0.5], task)
        single, _ = _direct(model, base_state, logits_fn, data, [vectors[t]], [(1.0, 0.5)[t]], task)
        xi += (merged != single).float().mean().item()
        loss += task_loss
    assert grid.xi[i][j] == pytest.approx(xi)
    assert grid.joint_loss[i][j] == pytest.approx(loss, rel=1e-5)
    assert grid.xi[i][j] != grid.xi[j][i] or grid.joint_loss[i][j] != pytest.approx(grid.joint_loss[j][i])


def test_joint_loss_at_origin_equals_base_model_loss(setup):
    model, base_state, logits_fn, data, _ = setup
    grid = _grid(setup)
    expected = sum(_direct(model, base_state, logits_fn, data, [], [], task)[1] for task in TASKS)
    zero = ALPHAS.index(0.0)
    assert grid.joint_loss[zero][zero] == pytest.approx(expected, rel=1e-5)


def test_merged_variant_adds_others_and_can_include_them_in_the_reference(setup):
    model, base_state, logits_fn, data, vectors = setup
    others = [vectors[2]]
    plain = _grid(setup, others=others, others_scale=0.7)
    inside = _grid(setup, others=others, others_scale=0.7, reference_includes_others=True)
    zero = ALPHAS.index(0.0)
    expected = sum(_direct(model, base_state, logits_fn, data, others, [0.7], task)[1] for task in TASKS)
    assert plain.joint_loss[zero][zero] == pytest.approx(expected, rel=1e-5)
    assert all(inside.xi_per_task["alpha"][i][zero] == 0.0 for i in range(len(ALPHAS)))
    assert plain.xi[zero][zero] > 0.0  # θ₀ + λτ₃ disagrees with θ₀: others count as interference
    assert (plain.others_scale, plain.num_others, inside.reference_includes_others) == (0.7, 1, True)


def test_weights_and_mode_are_restored_after_analysis_even_on_error(setup):
    model, base_state, logits_fn, data, vectors = setup
    model.train()
    _grid(setup)
    _assert_at_base(model, base_state)
    assert model.training
    calls = []

    def failing(m, batch, task):
        calls.append(task)
        if len(calls) > 3:
            raise RuntimeError("boom")
        return logits_fn(m, batch, task)

    with pytest.raises(RuntimeError, match="boom"):
        weight_disentanglement(model, base_state, vectors[:2], data, failing, tasks=TASKS, progress=False)
    _assert_at_base(model, base_state)
    model.eval()


def test_bad_grid_and_wrong_vector_count_are_refused(setup):
    with pytest.raises(ValueError, match="strictly increasing"):
        _grid(setup, alphas=[1.0, 0.0])
    model, base_state, logits_fn, data, vectors = setup
    with pytest.raises(ValueError, match="exactly two task vectors"):
        weight_disentanglement(model, base_state, vectors, data, logits_fn, tasks=TASKS, progress=False)
    with pytest.raises(KeyError, match="no evaluation data"):
        weight_disentanglement(model, base_state, vectors[:2], data, logits_fn, tasks=("alpha", "x"))


def _ctl_models(nonlinear: bool):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)) if nonlinear else nn.Linear(5, 4)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    taus = [_random_vector(model, 20 + k, 1.0) for k in range(2)]
    if nonlinear:
        features = lambda m, b: (m[1](m[0](b["pixel_values"])), m(b["pixel_values"]))  # noqa: E731
    else:
        features = lambda m, b: (m(b["pixel_values"]),)  # noqa: E731
    batches = [{"pixel_values": torch.randn(8, 5), "labels": torch.zeros(8, dtype=torch.long)}]
    return model, base, taus, features, batches


def test_ctl_vanishes_for_a_model_linear_in_its_weights():
    model, base, taus, features, batches = _ctl_models(nonlinear=False)
    gaps = cross_task_linearity(model, base, taus[0], taus[1], batches, features_fn=features)
    assert len(gaps) == 1 and abs(gaps[0]) < 1e-10
    _assert_at_base(model, base)


def test_ctl_is_positive_for_a_nonlinear_model_and_zero_for_identical_vectors():
    model, base, taus, features, batches = _ctl_models(nonlinear=True)
    gaps = cross_task_linearity(model, base, taus[0], taus[1], batches, features_fn=features)
    same = cross_task_linearity(model, base, taus[0], taus[0], batches, features_fn=features)
    assert len(gaps) == 2 and all(g > 1e-4 for g in gaps)
    assert all(abs(g) < 1e-10 for g in same)
    _assert_at_base(model, base)


def test_ctl_on_clip_gives_one_value_per_transformer_block(setup):
    model, base_state, _, data, vectors = setup
    gaps = cross_task_linearity(model, base_state, vectors[0], vectors[1], data["alpha"])
    assert len(gaps) == model.config.num_hidden_layers
    assert all(0.0 < g <= 2.0 for g in gaps)


def test_heatmap_and_ctl_pngs_have_the_expected_pixel_size(tmp_path):
    grids = {"standard": [[0, 1], [1, 2]], "SAFT": [[0, 0.5], [0.5, 1]]}
    heat = plot_heatmaps(grids, tmp_path / "h.png", alphas=[0.0, 1.0], title="xi", dpi=50)
    ctl = plot_ctl({"standard": [0.1, 0.2], "SAFT": [0.05, 0.1]}, tmp_path / "c.png", dpi=50, figsize=(6, 4))
    with Image.open(heat) as img:
        assert img.format == "PNG" and img.size == heatmap_figure_size(2, dpi=50)
    with Image.open(ctl) as img:
        assert img.format == "PNG" and img.size == (300, 200)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "h.png"]  # no temp files left
    with pytest.raises(ValueError, match="expected"):
        plot_heatmaps({"bad": [[0.0]]}, tmp_path / "x.png", alphas=[0.0, 1.0], title="xi")


def test_report_folder_holds_json_grids_and_figures_and_is_replaced_only_with_overwrite(setup, tmp_path):
    model, base_state, logits_fn, data, vectors = setup
    pairs = {"standard": vectors[:2], "SAFT": [vectors[0], vectors[2]]}
    report = analyze_pairs(
        model, base_state, pairs, data, logits_fn, tasks=TASKS, alphas=ALPHAS,
        others={"standard": [vectors[2]]}, progress=False,
    )  # fmt: skip
    out = write_report(report, tmp_path / "out")
    saved = json.loads((out / RESULTS_NAME).read_text())
    assert saved["alphas"] == ALPHAS and saved["tasks"] == list(TASKS)
    for label in pairs:
        grid = saved["pairs"][label]["grid"]
        assert len(grid["xi"]) == len(ALPHAS) and all(len(row) == len(ALPHAS) for row in grid["xi"])
        assert len(grid["joint_loss"]) == len(ALPHAS)
        assert len(saved["pairs"][label]["ctl"]) == model.config.num_hidden_layers
    assert saved["pairs"]["standard"]["grid"]["num_others"] == 1
    assert saved["pairs"]["SAFT"]["grid"]["num_others"] == 0
    for name in FIGURES.values():
        with Image.open(out / name) as img:
            assert img.format == "PNG"
    with pytest.raises(FileExistsError, match="overwrite"):
        write_report(report, out)
    (out / "stale.txt").write_text("old")
    write_report(report, out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / RESULTS_NAME).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    _assert_at_base(model, base_state)


def test_prepare_eval_data_bounds_samples_and_names_missing_keys():
    examples = [{"pixel_values": torch.zeros(3, 4, 4), "labels": i} for i in range(7)]
    batches = prepare_eval_data(examples, max_samples=5, batch_size=2)
    assert [len(b["labels"]) for b in batches] == [2, 2, 1]
    assert batches[0]["pixel_values"].shape == (2, 3, 4, 4)
    with pytest.raises(KeyError, match="labels"):
        prepare_eval_data([{"pixel_values": torch.zeros(1)}])
    with pytest.raises(ValueError, match="max_samples"):
        prepare_eval_data(examples, max_samples=0)


def test_summary_averages_only_grid_points_inside_the_search_square():
    values = [[float(10 * i + j) for j in range(4)] for i in range(4)]
    grid = {"xi": values, "joint_loss": [[2 * v for v in row] for row in values]}
    report = {"alphas": [0.0, 0.5, 1.0, 1.5], "pairs": {"standard": {"grid": grid, "ctl": [0.1, 0.3]}}}
    row = summarize(report, (0.05, 1.0))["standard"]
    inside = [values[i][j] for i in (1, 2) for j in (1, 2)]  # α ∈ {0.5, 1.0}
    assert row["points"] == 4
    assert row["mean_xi"] == pytest.approx(sum(inside) / 4)
    assert row["mean_joint_loss"] == pytest.approx(2 * sum(inside) / 4)
    assert row["mean_ctl"] == pytest.approx(0.2)
