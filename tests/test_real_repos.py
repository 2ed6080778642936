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
