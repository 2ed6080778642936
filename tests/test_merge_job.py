"""The library behind saft-merge: option checks, base inference, recorded accuracies, cached batches, runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from saft_hf.pipeline import (
    CachedBatches,
    MergeJob,
    MergeJobError,
    MergeUsageError,
    infer_base,
    recorded_accuracy,
    run_merge_job,
)
from saft_hf.task_vectors import TaskVector
from tests.test_cli_merge import vector_dirs  # noqa: F401  (module fixture reused)


def _job(tmp_path: Path, **kwargs: object) -> MergeJob:
    return MergeJob(**{"repos": ["a/x", "a/y"], "output": tmp_path / "out", **kwargs})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"repos": ["a/x"]}, "at least two"),
        ({"repos": ["a/x", " "]}, "at least two"),
        ({"repos": ["a/x", "a/x"]}, "given twice"),
        ({"revisions": ["main"]}, "one revision per repo"),
        ({"method": "nope"}, "unknown merge method"),
        ({"method": "ties", "method_args": {"bogus": 1}}, "no parameter 'bogus'"),
        ({"scaling": float("nan")}, "finite number > 0"),
        ({"scaling": float("inf")}, "finite number > 0"),
        ({"scaling": -0.1}, "finite number > 0"),
        ({"scaling": 0.3, "method_args": {"scaling": 0.3}}, "given twice"),
        ({"method": "weight_average", "scaling": 0.3}, "has no λ"),
        ({"method": "weight_average", "search": True}, "no λ to search"),
        ({"search": True, "method_args": {"scaling": 1.0}}, "cannot be combined with --search"),
        ({"grid": [0.1]}, "only used with --search"),
        ({"search": True, "grid": []}, "--grid values"),
        ({"select": "normalized"}, "only used with --search or --eval"),
        ({"evaluate": True, "max_eval_samples": 0}, "--max-eval-samples must be a positive"),
        ({"evaluate": True, "batch_size": 0}, "--batch-size must be a positive"),
        ({"evaluate": True, "data_dir": "/does/not/exist"}, "is not a folder"),
    ],
)
def test_validate_names_the_wrong_option(kwargs: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(MergeUsageError, match=message):
        _job(tmp_path, **kwargs).validate()


def test_validate_accepts_a_consistent_job_and_defaults_the_grid(tmp_path: Path) -> None:
    job = _job(tmp_path, method="task_arithmetic", search=True, data_dir=tmp_path)
    job.validate()
    assert job.grid_values()[0] == 0.05 and job.grid_values()[-1] == 1.0 and len(job.grid_values()) == 20
    assert _job(tmp_path, method="pcb").grid_values() != job.grid_values()


def test_search_without_data_is_refused_only_when_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAFT_DATA_DIR", raising=False)
    with pytest.raises(MergeUsageError, match="needs task data"):
        _job(tmp_path, search=True).validate()
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "0")
    _job(tmp_path, search=True).validate()


def _tv(**config: object) -> TaskVector:
    return TaskVector({"w": torch.ones(2)}, dict(config))


def test_infer_base_returns_the_shared_base_and_revision() -> None:
    vectors = [_tv(base_model="org/clip", base_model_revision="abc")] * 2
    assert infer_base(vectors) == ("org/clip", "abc")
    assert infer_base([_tv(base_model="org/clip", base_model_revision="abc"), _tv(base_model="org/clip")]) == (
        "org/clip",
        None,
    )


@pytest.mark.parametrize(
    ("configs", "message"),
    [([{}, {}], "records its base model"), ([{"base_model": "a/b"}, {"base_model": "c/d"}], "different base models"),
     ([{"base_model": "a/b"}, {}], "different base models")],
)  # fmt: skip
def test_infer_base_refuses_missing_or_disagreeing_bases(configs: list[dict], message: str) -> None:
    with pytest.raises(MergeJobError, match=message):
        infer_base([_tv(**c) for c in configs])


def test_recorded_accuracy_reads_metrics_then_legacy_keys() -> None:
    assert recorded_accuracy(_tv(metrics={"accuracy": 0.9}, test_accuracy=0.1)) == 0.9
    assert recorded_accuracy(_tv(metrics={"test_accuracy": 0.8})) == 0.8
    assert recorded_accuracy(_tv(test_accuracy=0.7)) == 0.7
    assert recorded_accuracy(_tv(metrics={"accuracy": True})) is None


class _CountingData:
    """A tiny dataset that counts item reads."""

    def __init__(self, size: int) -> None:
        self.size, self.reads = size, 0

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        self.reads += 1
        return {"pixel_values": torch.full((3, 2, 2), float(index)), "labels": index % 2}


def test_cached_batches_preprocess_once_within_budget_and_stream_beyond() -> None:
    data = _CountingData(5)
    batches = CachedBatches(data, batch_size=2)
    first, second = list(batches), list(batches)
    assert data.reads == 5 and len(batches) == 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    small = CachedBatches(data := _CountingData(5), batch_size=2, cache_bytes=60)
    list(small), list(small)
    assert data.reads == 10


def test_run_returns_outcome_and_normalized_search_without_recorded_accuracies_measures_them(
    vector_dirs: list[Path], tiny_task_data_dir: Path, tmp_path: Path  # noqa: F811
) -> None:
    outcome = run_merge_job(
        MergeJob(repos=[str(d) for d in vector_dirs], output=tmp_path / "ok", method="dare", progress=False)
    )
    assert outcome.output.is_dir() and outcome.merge_config["method_args"]["seed"] == 0
    assert outcome.results["scaling"] == 0.3 and outcome.search is None and outcome.commit_url is None
    bare = [TaskVector.from_pretrained(d) for d in vector_dirs]
    stripped = []
    for index, vector in enumerate(bare):
        config = {k: v for k, v in vector.config.items() if k != "metrics"}
        stripped.append(TaskVector(vector.to_dict(), config, head_dir=vector.head_dir).save_pretrained(tmp_path / f"s{index}"))
    job = MergeJob(repos=[str(d) for d in stripped], output=tmp_path / "norm", method="task_arithmetic", search=True,
                   select="normalized", data_dir=tiny_task_data_dir, grid=[0.5, 1.0], max_eval_samples=4,
                   progress=False)  # fmt: skip
    outcome = run_merge_job(job)
    assert outcome.search is not None and outcome.search.normalized is True
    assert outcome.notes[0].startswith("base ") and outcome.notes[0].endswith(": model.safetensors")
    assert len(outcome.notes) == 2 and "2 task vector(s) record no fine-tuned validation accuracy" in outcome.notes[1]
    assert outcome.results["notes"] == outcome.notes
