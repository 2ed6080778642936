"""``saft-merge --select per-task``: the SAFT authors' selection protocol end to end on the tiny offline setup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from saft_hf.cli.merge import main
from saft_hf.merging.search import AUTHORS_GRID, AUTHORS_TIES_DENSITIES
from tests.fixtures_clip import TINY_TASKS
from tests.test_cli_merge import _make_vector, _repos


@pytest.fixture(scope="module")
def vector_dirs(tiny_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("vectors")
    return [_make_vector(tiny_clip_dir, task, seed, root / task) for seed, task in enumerate(TINY_TASKS, start=1)]


def test_per_task_ties_chooses_lambda_and_density_per_task_on_the_authors_grids_and_says_it_is_not_one_model(
    vector_dirs: list[Path], tiny_task_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "per-task"
    code = main(["--repos", _repos(vector_dirs), "--method", "ties", "--search", "--select", "per-task", "--eval",
                 "--data-dir", str(tiny_task_data_dir), "--max-eval-samples", "8", "--batch-size", "4",
                 "--output", str(out), "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["selection"] == "per-task" and results["one_merged_model"] is False
    assert set(results["per_task"]) == set(TINY_TASKS)
    searches = results["searches"]
    assert [s["method_args"]["density"] for s in searches] == list(AUTHORS_TIES_DENSITIES)
    for task, choice in results["per_task"].items():
        assert choice["scaling"] in AUTHORS_GRID and choice["method_args"]["density"] in AUTHORS_TIES_DENSITIES
        best = max(row["accuracies"][task] for s in searches for row in s["table"])  # its own validation split
        assert choice["validation"] == best and 0 <= choice["test"] <= 1
    assert {row["task"]: row["merged"] for row in results["evaluation"]["tasks"]} == {
        t: c["test"] for t, c in results["per_task"].items()
    }
    assert not (out / "model.safetensors").exists()  # no single merged model exists to write
    card = (out / "README.md").read_text()
    assert "NOT one merged model" in card and "own validation split" in card
    printed = capsys.readouterr().out
    assert "NOT those of one merged model" in printed and "TinyColors: λ =" in printed


def test_per_task_without_search_is_a_one_line_usage_error(vector_dirs: list[Path], tmp_path: Path, capsys) -> None:
    code = main(["--repos", _repos(vector_dirs), "--method", "task_arithmetic", "--select", "per-task", "--eval",
                 "--output", str(tmp_path / "x"), "--no-progress"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "error: --select per-task chooses a λ per task on validation; add --search" in err
    assert not (tmp_path / "x").exists()
