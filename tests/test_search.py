"""λ search on one loaded model (in place) and the per-task evaluation report."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from saft_hf.merging import MergeError, MergeReport, get_method, merge, search_coefficients


def toy_setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 2))
    base = {k: v.detach().clone() for k, v in model.named_parameters()}
    vectors = [{k: torch.randn_like(v) for k, v in base.items()} for _ in range(2)]
    return model, base, vectors


def lambda_of(model: nn.Module, base, merged) -> float:
    """Recover λ from the model's weights: (θ − θ_base)·τ / τ·τ."""
    num = sum(((p.detach() - base[k]) * merged[k]).sum() for k, p in model.named_parameters())
    den = sum((merged[k] ** 2).sum() for k in merged)
    return float(num / den)


def peaked_evaluate(model, base, merged, peaks: dict[str, float], heights: dict[str, float], calls: list):
    """Accuracy of each task = height · (1 − (λ − peak)²), with λ read from the model's weights."""

    def evaluate(m: nn.Module) -> dict[str, float]:
        assert m is model
        lam = lambda_of(m, base, merged)
        calls.append(lam)
        return {t: heights[t] * (1 - (lam - peaks[t]) ** 2) for t in peaks}

    return evaluate


def test_search_picks_the_best_mean_and_leaves_the_model_there_in_place():
    model, base, vectors = toy_setup()
    unit = merge(vectors, "ties", density=0.5, scaling=1.0)
    ptrs = [p.data_ptr() for p in model.parameters()]
    calls: list[float] = []
    evaluate = peaked_evaluate(model, base, unit, {"a": 0.3, "b": 0.5}, {"a": 1.0, "b": 1.0}, calls)
    result = search_coefficients(
        model, base, vectors, "ties", evaluate, method_args={"density": 0.5}, progress=False
    )
    assert result.best_scaling == pytest.approx(0.4)
    assert [row["scaling"] for row in result.table] == pytest.approx([0.05 * i for i in range(1, 21)])
    assert calls == pytest.approx([row["scaling"] for row in result.table], abs=1e-5)  # λ really written
    assert [p.data_ptr() for p in model.parameters()] == ptrs  # same model, never re-created
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), base[k] + 0.4 * unit[k])
    assert result.method_args == {"density": 0.5}


def test_normalised_selection_weighs_tasks_by_their_fine_tuned_accuracy():
    model, base, vectors = toy_setup(1)
    unit = merge(vectors, "task_arithmetic", scaling=1.0)
    heights = {"a": 0.2, "b": 1.0}
    args = (model, base, vectors, "task_arithmetic")
    absolute = search_coefficients(
        *args, peaked_evaluate(model, base, unit, {"a": 0.2, "b": 0.8}, heights, []), progress=False
    )
    normalised = search_coefficients(
        *args,
        peaked_evaluate(model, base, unit, {"a": 0.2, "b": 0.8}, heights, []),
        normalize_by=heights,
        progress=False,
    )
    assert absolute.best_scaling == pytest.approx(0.7)
    assert normalised.best_scaling == pytest.approx(0.5) and normalised.normalized
    assert normalised.best_score == pytest.approx(1 - 0.09)


def test_pcb_uses_its_own_grid_and_custom_grids_are_respected():
    model, base, vectors = toy_setup(2)
    evaluate = lambda m: {"a": 0.5}  # noqa: E731
    pcb = search_coefficients(model, base, vectors, "pcb", evaluate, progress=False)
    assert [row["scaling"] for row in pcb.table] == list(get_method("pcb").grid)
    assert pcb.best_scaling == get_method("pcb").grid[0]  # all equal: the first λ wins
    custom = search_coefficients(model, base, vectors, "dare", evaluate, grid=[0.2, 0.9], progress=False)
    assert [row["scaling"] for row in custom.table] == [0.2, 0.9]


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"method": "weight_average"}, "no scaling coefficient"),
        ({"method_args": {"scaling": 0.3}}, "do not pass 'scaling'"),
        ({"grid": []}, "grid is empty"),
        ({"grid": [0.1, -0.2]}, "finite and > 0, got -0.2"),
        ({"grid": [0.3]}, "fewer than two distinct values"),
        ({"grid": [0.3, 0.3]}, "fewer than two distinct values"),
        ({"normalize_by": {"a": 0.0}}, r"normalize_by\['a'\] must be a finite accuracy > 0"),
        ({"normalize_by": {"b": 0.9}}, "no fine-tuned accuracy for task 'a'"),
    ],
)
def test_bad_search_inputs_are_rejected(kwargs, pattern):
    model, base, vectors = toy_setup()
    kwargs = {"method": "task_arithmetic", **kwargs}
    with pytest.raises(MergeError, match=pattern):
        search_coefficients(model, base, vectors, evaluate=lambda m: {"a": 0.5}, progress=False, **kwargs)


def test_search_result_table_marks_the_chosen_lambda():
    model, base, vectors = toy_setup()
    unit = merge(vectors, "task_arithmetic", scaling=1.0)
    evaluate = peaked_evaluate(model, base, unit, {"a": 0.3}, {"a": 1.0}, [])
    result = search_coefficients(model, base, vectors, "task_arithmetic", evaluate, grid=[0.1, 0.3], progress=False)
    lines = result.format_table().splitlines()
    assert lines[2].startswith(" 0.30*") and "100.00" in lines[2]
    assert json.loads(json.dumps(result.to_dict()))["best_scaling"] == 0.3


# ------------------------------------------------------------------------------------------ report
def test_report_normalises_by_individual_accuracy_and_averages():
    report = MergeReport.from_accuracies(
        {"mnist": 0.9, "svhn": 0.6, "dtd": 0.5}, {"mnist": 1.0, "svhn": 0.8}, method="ties", method_args={"density": 0.2}
    )
    assert [r.normalized for r in report.tasks] == pytest.approx([0.9, 0.75, None])
    assert report.mean_accuracy == pytest.approx(2.0 / 3)
    assert report.mean_normalized == pytest.approx(0.825)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["tasks"][2] == {"task": "dtd", "merged": 0.5, "individual": None, "normalized": None}
    table = report.format_table().splitlines()
    assert table[0] == "ties (density=0.2)"
    assert table[2].split() == ["mnist", "90.00", "100.00", "90.00"]
    assert table[4].split() == ["dtd", "50.00", "-", "-"]
    assert table[-1].split() == ["mean", "66.67", "90.00", "82.50"]


def test_report_rejects_bad_accuracies():
    with pytest.raises(MergeError, match="no merged accuracies"):
        MergeReport.from_accuracies({})
    with pytest.raises(MergeError, match="individual accuracy of task 'a' is 0"):
        MergeReport.from_accuracies({"a": 0.5}, {"a": 0.0})
    with pytest.raises(MergeError, match="merged accuracy of task 'a' must be a finite number"):
        MergeReport.from_accuracies({"a": float("nan")})


# ----------------------------------------------------------------------------- per-task (SAFT authors') selection
from saft_hf.merging.search import (  # noqa: E402
    AUTHORS_GRID,
    AUTHORS_TIES_DENSITIES,
    SearchResult,
    evaluate_per_task,
    select_per_task,
)


def _result(density: float, rows: list[tuple[float, dict[str, float]]]) -> SearchResult:
    table = [{"scaling": lam, "accuracies": accs, "score": sum(accs.values()) / len(accs)} for lam, accs in rows]
    best = max(table, key=lambda r: r["score"])
    return SearchResult("ties", {"density": density}, best["scaling"], best["score"], False, table)


def test_per_task_selection_gives_each_task_its_own_lambda_and_setting():
    low = _result(0.3, [(0.1, {"a": 0.9, "b": 0.1}), (0.3, {"a": 0.5, "b": 0.2})])
    high = _result(0.2, [(0.1, {"a": 0.1, "b": 0.1}), (0.3, {"a": 0.1, "b": 0.8})])
    choices = select_per_task([low, high])
    assert (choices["a"].scaling, choices["a"].method_args, choices["a"].validation) == (0.1, {"density": 0.3}, 0.9)
    assert (choices["b"].scaling, choices["b"].method_args, choices["b"].validation) == (0.3, {"density": 0.2}, 0.8)


def test_per_task_ties_go_to_the_smallest_lambda_then_the_first_setting_as_the_authors_loop():
    first = _result(0.3, [(0.1, {"a": 0.5}), (0.3, {"a": 0.7})])
    second = _result(0.2, [(0.1, {"a": 0.7}), (0.3, {"a": 0.7})])
    choice = select_per_task([first, second])["a"]
    assert (choice.scaling, choice.method_args) == (0.1, {"density": 0.2})  # λ outer, mask rate inner


def test_the_authors_grids_and_mask_rates():
    assert AUTHORS_GRID == (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
    assert AUTHORS_TIES_DENSITIES == (0.3, 0.2, 0.1)


@pytest.mark.parametrize("mask_rate", [0.7, 0.8, 0.9])
def test_authors_mask_rate_keeps_the_entries_of_ties_density_one_minus_it_up_to_one_per_vector(mask_rate):
    torch.manual_seed(0)
    vectors = [{"w": torch.randn(37, 11)}, {"w": torch.randn(37, 11)}]
    flat = torch.stack([v["w"].reshape(-1) for v in vectors])
    # BAIKLAB/SAFT-Merge merging.py, mask_smallest_magnitude_param_values, transcribed
    kth = flat.abs().kthvalue(k=int(flat.shape[1] * mask_rate), dim=1, keepdim=True).values
    authors_kept = flat.abs() >= kth
    from saft_hf.merging.ties import magnitude_thresholds

    thresholds = magnitude_thresholds(vectors, round(1 - mask_rate, 10))
    ours = torch.stack([flat[i].abs() >= thresholds[i] for i in range(2)])
    # their rank is floor(d * rate), ours d - floor(d * density) = ceil(d * rate): one entry apart at most
    assert (ours & ~authors_kept).sum() == 0 and ((authors_kept & ~ours).sum(dim=1) <= 1).all()
    assert authors_kept.float().mean().item() == pytest.approx(1 - mask_rate, abs=0.01)


def test_per_task_evaluation_scores_each_task_at_its_own_merged_model_and_resets_to_base():
    model, base, vectors = toy_setup()
    unit = merge(vectors, "task_arithmetic", scaling=1.0)
    seen: dict[str, float] = {}

    def evaluate(m, tasks):
        lam = lambda_of(m, base, unit)
        seen.update({t: lam for t in tasks})
        return {t: lam for t in tasks}

    results = [search_coefficients(model, base, vectors, "task_arithmetic", lambda m: {"a": 1 - abs(lambda_of(m, base, unit) - 0.3),
                                   "b": 1 - abs(lambda_of(m, base, unit) - 0.9)}, grid=AUTHORS_GRID, progress=False)]  # fmt: skip
    choices = select_per_task(results)
    assert (choices["a"].scaling, choices["b"].scaling) == (0.3, 0.9)
    scores = evaluate_per_task(model, base, vectors, "task_arithmetic", choices, evaluate)
    assert scores == pytest.approx({"a": 0.3, "b": 0.9}, abs=1e-5)
    for k, p in model.named_parameters():
        assert torch.equal(p.detach(), base[k])
