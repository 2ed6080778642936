"""reproduce_saft.py --recipe authors-code --protocol authors (the paper's released code) on the tiny offline setup."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from saft_hf.merging.search import AUTHORS_GRID
from saft_hf.task_vectors import TaskVector
from tests.fixtures_clip import TINY_TASKS
from tests.test_reproduce import load_reproduce_script


@pytest.fixture(scope="module")
def authors_run(tmp_path_factory, tiny_clip_dir, tiny_task_data_dir):
    out = tmp_path_factory.mktemp("repro-authors") / "out"
    argv = [
        "--model_name_or_path", str(tiny_clip_dir), "--data_dir", str(tiny_task_data_dir), "--output_dir", str(out),
        "--tasks", *TINY_TASKS, "--methods", "task_arithmetic", "ties", "--recipe", "authors-code",
        "--protocol", "authors", "--max_steps", "8", "--save_steps", "4", "--per_device_train_batch_size", "16",
        "--learning_rate", "1e-3", "--warmup_steps", "0", "--use_cpu", "--disable_tqdm", "true",
        "--merge_batch_size", "16", "--merge_checkpoint", "best",
    ]  # fmt: skip
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert load_reproduce_script().main(argv) == 0
    return out


def test_the_paper_code_table_says_lambda_is_per_task_and_names_recipe_and_protocol(authors_run):
    summary = json.loads((authors_run / "results.json").read_text())
    assert (summary["recipe"], summary["protocol"], summary["merge_checkpoint"]) == ("authors-code", "authors", "best")
    for method in ("task_arithmetic", "ties"):
        for variant in ("standard", "saft"):
            entry = summary["merged"][method][variant]
            assert set(entry["per_task_scaling"]) == set(TINY_TASKS)
            assert all(lam in AUTHORS_GRID for lam in entry["per_task_scaling"].values())
            merge = json.loads((authors_run / "merges" / variant / method / "results.json").read_text())
            assert merge["selection"] == "per-task" and merge["one_merged_model"] is False
    table = (authors_run / "results.md").read_text()
    assert "NOT one merged model" in table and "Fine-tuning recipe: authors-code; λ protocol: authors" in table


def test_fine_tunes_follow_the_authors_code_and_the_best_checkpoint_is_what_was_merged(authors_run):
    for variant in ("standard", "saft"):
        stage = authors_run / "finetune" / variant / "TinyColors"
        results = json.loads((stage / "results.json").read_text())
        assert results["hyperparameters"]["recipe"] == "authors-code"
        assert results["hyperparameters"]["sam_loop"] == "authors" and results["global_step"] == 8
        best = TaskVector.from_pretrained(stage / "task_vector_best")
        assert best.config["checkpoint"].startswith("best")
        merge = json.loads((authors_run / "merges" / variant / "ties" / "merge_config.json").read_text())
        assert all(r["repo"].endswith("task_vector_best") for r in merge["repos"])


def test_merging_the_best_checkpoint_needs_the_authors_recipe(tmp_path, tiny_task_data_dir):
    script = load_reproduce_script()
    argv = ["--output_dir", str(tmp_path), "--data_dir", str(tiny_task_data_dir), "--tasks", *TINY_TASKS,
            "--merge_checkpoint", "best"]  # fmt: skip
    args, _ = script.build_recipe_parser("paper-text").parse_args_into_dataclasses(args=argv)
    with pytest.raises(script.UsageError, match="--merge_checkpoint best needs --recipe authors-code"):
        script.check_arguments(args)
