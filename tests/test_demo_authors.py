"""saft-demo with the SAFT authors' loop variants and their per-task λ selection, at toy size."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from saft_hf.cli.demo import main
from saft_hf.merging.search import AUTHORS_GRID, AUTHORS_TIES_DENSITIES
from saft_hf.task_vectors import TaskVector


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_authors")
    argv = [
        "--output", str(root / "out"), "--cache-dir", str(root / "cache"), "--no-progress",
        "--tasks", "sizes", "colours", "--steps", "3", "--batch-size", "8",
        "--n-train", "8", "--n-validation", "8", "--n-test", "8", "--ties-densities", "0.2",
        "--analysis-pairs", "0", "--base-hidden-size", "32", "--base-layers", "1", "--base-pretrain-steps", "2",
        "--base-pretext-scenes", "16", "--threads", "1", "--variants", "standard", "standard_authors",
        "--methods", "task_arithmetic", "ties", "--selection", "single", "per-task",
    ]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(argv) == 0
    return root / "out"


def test_per_task_rows_use_the_authors_grids_and_say_they_are_not_one_model(run):
    results = json.loads((run / "results.json").read_text())
    assert {"task_arithmetic", "ties", "task_arithmetic@per-task", "ties@per-task"} <= set(results["summary"])
    seed = results["seeds"][0]
    for variant in ("standard", "standard_authors"):
        ta, ties = seed["merged"]["task_arithmetic@per-task"][variant], seed["merged"]["ties@per-task"][variant]
        for entry in (ta, ties):
            assert entry["one_merged_model"] is False and set(entry["per_task"]) == {"sizes", "colours"}
            assert all(c["scaling"] in AUTHORS_GRID for c in entry["per_task"].values())
            assert entry["scaling"] == pytest.approx(sum(c["scaling"] for c in entry["per_task"].values()) / 2)
        assert all(c["method_args"]["density"] in AUTHORS_TIES_DENSITIES for c in ties["per_task"].values())
        assert seed["merged"]["ties"][variant]["method_args"] == {"density": 0.2}  # the single-λ rows as before
    table = (run / "results.md").read_text()
    assert "task arithmetic, λ per task (not one model)" in table and "standard (authors' loop)" in table


def test_authors_loop_variant_records_its_loop_and_trains_differently(run):
    folder = run / "task_vectors" / "seed-0"
    clean = TaskVector.from_pretrained(folder / "standard" / "sizes")
    authors = TaskVector.from_pretrained(folder / "standard_authors" / "sizes")
    assert authors.config["finetuning"]["hyperparameters"]["sam_loop"] == "authors"
    assert "sam_loop" not in clean.config["finetuning"]["hyperparameters"]
    assert any(not torch.equal(clean[n], authors[n]) for n in clean.keys())


def test_an_unknown_selection_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse's own choices check
        main(["--selection", "per-dataset"])
    assert exit_.value.code == 2 and "invalid choice: 'per-dataset'" in capsys.readouterr().err


def _seed(clean: float, paper: float) -> dict:
    """A seed whose ASAM − standard difference is `clean` (clean loop, one λ) and `paper` (authors, per task)."""
    rows = {}
    for method in ("task_arithmetic", "ties", "pcb"):
        rows[method] = {"standard": {"test": {"a": 0.5}}, "asam": {"test": {"a": 0.5 + clean}},
                        "standard_authors": {"test": {"a": 0.5}}, "asam_authors": {"test": {"a": 0.5}}}
        rows[f"{method}@per-task"] = {v: {"test": {"a": 0.6}} for v in ("standard", "asam", "standard_authors")}
        rows[f"{method}@per-task"]["asam_authors"] = {"test": {"a": 0.6 + paper}}
    return {"merged": rows}


def test_paired_contrasts_and_the_protocols_decision_rule():
    from benchmarks.authors_recipe_contrasts import contrasts, verdict

    seeds = [_seed(-0.02, 0.01), _seed(-0.03, 0.02), _seed(-0.025, 0.015)]
    table = contrasts({"seeds": seeds, "config": {"tasks": ["a"]}})
    assert table["ties"]["D_clean"]["mean"] == pytest.approx(-0.025)
    assert table["ties"]["D_paper"]["mean"] == pytest.approx(0.015) and table["ties"]["D_paper"]["ci_low"] > 0
    assert table["ties"]["D_paper_minus_D_clean"]["mean"] == pytest.approx(0.04)
    assert table["ties"]["D_loop"]["mean"] == pytest.approx(0.0)
    assert verdict(table) == "the authors' whole protocol (loop + per-task λ) explains it, not the loop alone"
    assert verdict(contrasts({"seeds": seeds[:1], "config": {"tasks": ["a"]}})) == "no conclusion (fewer than 2 seeds)"
