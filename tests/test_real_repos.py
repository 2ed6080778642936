"""The real Hub repos, as replicas on the loopback Hub (tests/hub_replicas.py): bases and FusionBench towers by Hub id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saft_hf.base_model import CONVERSION_BRANCH, PICKLED, load_base_vision_tower, resolve_base
from saft_hf.cli.merge import main as saft_merge
from saft_hf.clip import load_vision_tower
from saft_hf.pipeline.inputs import task_from_repo_name
from tests.hub_replicas import (
    CONVERSION_PR,
    DECOYS,
    OPENAI_B32,
    bin_only_base_files,
    fusionbench_tower_files,
    fusionbench_tower_id,
    publish_fusionbench_tower,
    publish_openai_base,
    write_files,
)


def _vision_weights_equal(model: torch.nn.Module, clip_dir: Path) -> bool:
    expected = load_vision_tower(clip_dir).state_dict()
    return all(torch.equal(tensor, expected[name]) for name, tensor in model.state_dict().items())


def test_a_base_without_safetensors_on_main_is_read_from_its_conversion_branch(hub_env, tiny_clip_dir):
    publish_openai_base(hub_env.server, tiny_clip_dir)
    base = resolve_base(OPENAI_B32)
    assert (base.weights, base.weights_file, base.weights_revision) == (CONVERSION_BRANCH, "model.safetensors", CONVERSION_PR)
    assert base.resolved_revision == hub_env.server.repos[("model", OPENAI_B32)].branches["main"]
    assert _vision_weights_equal(load_base_vision_tower(base), tiny_clip_dir)  # not the rogue PR's zeros
    branches = hub_env.server.repos[("model", OPENAI_B32)].branches
    fetched = hub_env.server.downloads(OPENAI_B32)
    assert f"{branches[CONVERSION_PR]}/model.safetensors" in fetched and base.weights_commit == branches[CONVERSION_PR]
    assert not [f for f in fetched if f.endswith((*DECOYS, ".bin")) or f.startswith(branches["refs/pr/40"])], fetched
    assert "refs/pr/32" in base.describe() and base.record()["weights_commit"]


def test_the_cached_conversion_branch_is_found_offline(hub_env, tiny_clip_dir, monkeypatch):
    from huggingface_hub import constants

    publish_openai_base(hub_env.server, tiny_clip_dir)
    online = resolve_base(OPENAI_B32)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = resolve_base(OPENAI_B32)
    assert (offline.weights, offline.weights_revision, offline.resolved_revision) == (
        CONVERSION_BRANCH, CONVERSION_PR, online.resolved_revision)  # fmt: skip


def test_a_base_with_only_pytorch_model_bin_goes_through_transformers_weights_only_loader(
    hub_env, tiny_clip_dir, monkeypatch
):
    repo_id = "acme/clip-bin-only"
    publish_openai_base(hub_env.server, tiny_clip_dir, repo_id, conversion_branch=False)
    calls = []
    original = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    base = resolve_base(repo_id)
    assert (base.weights, base.weights_file) == (PICKLED, "pytorch_model.bin")
    assert _vision_weights_equal(load_base_vision_tower(base), tiny_clip_dir)
    assert calls and all(flag is True for flag in calls)  # unpickled with weights_only, by transformers
    assert not [f for f in hub_env.server.downloads(repo_id) if f.endswith(DECOYS)]


def test_task_vectors_and_fine_tuned_towers_are_never_unpickled(tmp_path, tiny_clip_dir):
    folder = write_files(tmp_path / "tower", bin_only_base_files(tiny_clip_dir))
    from saft_hf.task_vectors import TaskVectorError, load_task_vector

    with pytest.raises(TaskVectorError, match="reads safetensors only"):
        load_task_vector(folder, base=tiny_clip_dir)


@pytest.mark.parametrize(
    "name, task",
    [("sun397", "SUN397"), ("stanford-cars", "Cars"), ("resisc45", "RESISC45"), ("eurosat", "EuroSAT"),
     ("svhn", "SVHN"), ("gtsrb", "GTSRB"), ("mnist", "MNIST"), ("dtd", "DTD"), ("Stanford_Cars", "Cars")],
)  # fmt: skip
def test_fusionbench_repo_names_give_their_task(name, task):
    assert task_from_repo_name(fusionbench_tower_id(name)) == task
    assert task_from_repo_name(f"tanganke/clip-vit-large-patch14_{name}") == task


def test_a_repo_that_names_no_task_asks_for_tasks(tmp_path, tiny_clip_dir, capsys):
    dirs = [write_files(tmp_path / f"tower{i}", fusionbench_tower_files(tiny_clip_dir, "x", i)[0]) for i in range(2)]
    code = saft_merge(["--repos", ",".join(map(str, dirs)), "--base", str(tiny_clip_dir), "--eval",
                       "--data-dir", str(tmp_path), "--output", str(tmp_path / "out"), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "records no task" in err[-1] and "--tasks" in err[-1]
    assert not (tmp_path / "out").exists()


def test_saft_merge_evaluates_fusionbench_towers_offline_against_a_bin_only_base(
    tmp_path, tiny_clip_dir, tiny_task_data_dir, capsys
):
    base = write_files(tmp_path / "clip-bin-only", bin_only_base_files(tiny_clip_dir))
    towers = [write_files(tmp_path / f"t{i}", fusionbench_tower_files(tiny_clip_dir, task, i)[0])
              for i, task in enumerate(["TinyColors", "TinyPatterns"])]  # fmt: skip
    out = tmp_path / "merged"
    code = saft_merge(["--repos", ",".join(map(str, towers)), "--tasks", "TinyColors,TinyPatterns", "--base", str(base),
                       "--method", "task_arithmetic", "--scaling", "0.5", "--eval", "--data-dir", str(tiny_task_data_dir),
                       "--max-eval-samples", "8", "--output", str(out), "--no-progress"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "pytorch_model.bin (transformers' weights_only loader)" in captured.out
    results = json.loads((out / "results.json").read_text())
    assert [row["task"] for row in results["evaluation"]["tasks"]] == ["TinyColors", "TinyPatterns"]
    assert json.loads((out / "merge_config.json").read_text())["base_model"]["weights"] == PICKLED


def test_saft_merge_searches_and_evaluates_fusionbench_towers_by_hub_id(
    hub_env, tiny_clip_dir, tiny_task_data_dir, tmp_path, capsys
):
    publish_openai_base(hub_env.server, tiny_clip_dir)
    published = [publish_fusionbench_tower(hub_env.server, tiny_clip_dir, task, seed)
                 for seed, task in enumerate(["TinyColors", "TinyPatterns"])]  # fmt: skip
    out = tmp_path / "merged"
    code = saft_merge(["--repos", ",".join(r for r, _ in published), "--tasks", "TinyColors,TinyPatterns",
                       "--base", OPENAI_B32, "--method", "task_arithmetic", "--search", "--grid", "0.5,1.0", "--eval",
                       "--data-dir", str(tiny_task_data_dir), "--max-eval-samples", "8", "--output", str(out),
                       "--no-progress"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "visual_projection.weight" in captured.out  # said: the towers have none, the base's is kept
    config = json.loads((out / "merge_config.json").read_text())
    assert (config["base_model"]["weights"], config["base_model"]["weights_revision"]) == (CONVERSION_BRANCH, CONVERSION_PR)
    assert config["tasks"] == ["TinyColors", "TinyPatterns"] and all(not r["local"] for r in config["repos"])
    results = json.loads((out / "results.json").read_text())
    assert [row["task"] for row in results["evaluation"]["tasks"]] == ["TinyColors", "TinyPatterns"]
    assert sorted(p.name for p in (out / "heads").iterdir()) == ["TinyColors", "TinyPatterns"]
    # θ = θ₀ + λ(τ₁ + τ₂) on the tower, and the base's projection
    lam = results["scaling"]
    merged = load_file(str(out / "model.safetensors"))
    base = load_vision_tower(tiny_clip_dir).state_dict()
    for name, theta in base.items():
        key = f"vision_model.{name}" if f"vision_model.{name}" in published[0][1] else name
        expected = theta + lam * (published[0][1][key] + published[1][1][key]) if key in published[0][1] else theta
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)
    assert not [f for f in hub_env.server.downloads(OPENAI_B32) if f.endswith((*DECOYS, ".bin"))]


# ----------------------------------------------------------------------------- datasets and whole runs, by Hub id
def _hub_subprocess_env(hub_env, tmp_path: Path) -> dict[str, str]:
    """The loopback Hub for a child process: online, its own caches (datasets reads these at import)."""
    import os

    return {**os.environ, "HF_DATASETS_OFFLINE": "0", "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
            "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
            "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # fmt: skip


def _publish_task_data(hub, names: list[str]) -> None:
    """DTD (with a corruption split), MNIST (config ``mnist``) and SVHN (``cropped_digits`` with ``extra``)."""
    from saft_hf.tasks import TASKS
    from tests.hub_replicas import image_dataset, publish_dataset

    layouts = {"DTD": ({"gaussian_noise": 1}, None, ()), "MNIST": ({}, "mnist", ("mnist",)),
               "SVHN": ({"extra": 3}, "cropped_digits", ("svhn",))}  # fmt: skip
    for index, name in enumerate(names):
        extra, config, aliases = layouts[name]
        classes = list(TASKS[name].classnames)
        splits = {"train": image_dataset(classes, 4, index), "test": image_dataset(classes, 1, 10 + index)}
        splits.update({split: image_dataset(classes, n, 20 + index) for split, n in extra.items()})
        publish_dataset(hub, TASKS[name].dataset_id, splits, config=config, aliases=aliases)


def _unused_downloads(hub, since: int) -> list[str]:
    """Files fetched (after request ``since``) that a run never reads: TF/Flax decoys, the .bin, corruption and
    ``extra`` splits."""
    fetched = [f for repo in {r for _, r in hub.repos} for f in hub.downloads(repo, since)]
    return [f for f in fetched if f.endswith((*DECOYS, ".bin")) or "/gaussian_noise-" in f or "/extra-" in f]


@pytest.mark.slow
def test_train_saft_fine_tunes_by_hub_id_downloading_only_what_it_reads(hub_env, tiny_clip_dir, tmp_path):
    import subprocess
    import sys

    publish_openai_base(hub_env.server, tiny_clip_dir)
    _publish_task_data(hub_env.server, ["SVHN"])
    since = len(hub_env.server.requests)
    out = tmp_path / "svhn"
    script = Path(__file__).resolve().parents[1] / "examples" / "train_saft.py"
    result = subprocess.run(
        [sys.executable, str(script), "--task", "SVHN", "--output_dir", str(out), "--max_steps", "2",
         "--per_device_train_batch_size", "8", "--learning_rate", "1e-3", "--warmup_steps", "0", "--use_cpu", "true",
         "--disable_tqdm", "true", "--dataloader_num_workers", "0"],
        env=_hub_subprocess_env(hub_env, tmp_path), capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    config = json.loads((out / "task_vector" / "task_vector_config.json").read_text())
    assert config["base_model"] == OPENAI_B32 and config["base_weights"]["weights_revision"] == CONVERSION_PR
    assert config["base_model_revision"] == hub_env.server.repos[("model", OPENAI_B32)].branches["main"]
    assert json.loads((out / "results.json").read_text())["num_examples"]["test"] == 10
    assert _unused_downloads(hub_env.server, since) == []


@pytest.mark.slow
def test_reproduce_saft_runs_by_hub_id_end_to_end(hub_env, tiny_clip_dir, tmp_path):
    import subprocess
    import sys

    publish_openai_base(hub_env.server, tiny_clip_dir)
    _publish_task_data(hub_env.server, ["DTD", "MNIST"])
    since = len(hub_env.server.requests)
    out = tmp_path / "repro"
    script = Path(__file__).resolve().parents[1] / "examples" / "reproduce_saft.py"
    result = subprocess.run(
        [sys.executable, str(script), "--output_dir", str(out), "--tasks", "DTD", "MNIST", "--methods",
         "task_arithmetic", "--grid", "0.5", "1.0", "--max_steps", "2", "--save_steps", "2",
         "--per_device_train_batch_size", "8", "--learning_rate", "1e-3", "--warmup_steps", "0", "--use_cpu", "true",
         "--disable_tqdm", "true", "--dataloader_num_workers", "0", "--merge_batch_size", "16"],
        env=_hub_subprocess_env(hub_env, tmp_path), capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])
    results = json.loads((out / "results.json").read_text())
    assert results and (out / "results.md").is_file()
    merge = json.loads((out / "merges" / "saft" / "task_arithmetic" / "merge_config.json").read_text())
    assert merge["base_model"]["id"] == OPENAI_B32 and merge["base_model"]["weights_revision"] == CONVERSION_PR
    assert _unused_downloads(hub_env.server, since) == []


def test_a_base_pinned_to_mains_commit_still_reads_the_conversion_branch_online_and_offline(
    hub_env, tiny_clip_dir, monkeypatch
):
    """Task vectors record the base's main commit: that pin must not send the merge to the pickled file."""
    from huggingface_hub import constants

    publish_openai_base(hub_env.server, tiny_clip_dir)
    main_sha = hub_env.server.repos[("model", OPENAI_B32)].branches["main"]
    pinned = resolve_base(OPENAI_B32, revision=main_sha)
    assert (pinned.weights, pinned.weights_revision, pinned.resolved_revision) == (CONVERSION_BRANCH, CONVERSION_PR, main_sha)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_base(OPENAI_B32, revision=main_sha).weights == CONVERSION_BRANCH
