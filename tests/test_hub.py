"""Task vectors on a Hub: push/pull against the loopback server, model cards, revisions and errors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard

from saft_hf.hub import load_task_vector
from saft_hf.task_vectors import CONFIG_NAME, TaskVector, TaskVectorError

CONFIG = {
    "base_model": "openai/clip-vit-base-patch32",
    "base_model_revision": "3d74acf9a28c67741b2f4f2ea7635f0aaf6f0268",
    "task": "mnist",
    "datasets": ["ylecun/mnist"],
    "finetuning": {"method": "sam", "hyperparameters": {"rho": 0.05, "learning_rate": 1e-5}},
    "metrics": {"accuracy": 0.97},
}


def _vector(seed: int, task: str = "mnist") -> TaskVector:
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "vision_model.encoder.layers.0.mlp.fc1.weight": torch.randn(37, 32, generator=generator),
        "vision_model.encoder.layers.0.mlp.fc1.bias": torch.randn(37, generator=generator),
        "visual_projection.weight": torch.randn(16, 32, generator=generator),
    }
    return TaskVector(tensors, {**CONFIG, "task": task})


def _same(a: TaskVector, b: TaskVector) -> bool:
    return set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_push_and_pull_round_trip_is_bitwise(hub_env, tmp_path: Path) -> None:
    vectors = {"user/tv-mnist": _vector(1, "mnist"), "user/tv-svhn": _vector(2, "svhn")}
    for repo_id, vector in vectors.items():
        vector.push_to_hub(repo_id, token=hub_env.token)
    for repo_id, vector in vectors.items():
        local = TaskVector.from_pretrained(vector.save_pretrained(tmp_path / repo_id.split("/")[1]))
        pulled = TaskVector.from_pretrained(repo_id)
        assert pulled.is_lazy and pulled.source.startswith(f"{repo_id}@")
        assert _same(pulled, local) and _same(pulled, vector)
        assert pulled.config == local.config


def test_pull_by_revision_sha_returns_that_commit(hub_env) -> None:
    first, second = _vector(3), _vector(4)
    sha_first = first.push_to_hub("user/tv-revisions", token=hub_env.token)
    sha_second = second.push_to_hub("user/tv-revisions", token=hub_env.token, commit_message="v2")
    assert sha_first != sha_second
    assert _same(TaskVector.from_pretrained("user/tv-revisions", revision=sha_first), first)
    assert _same(TaskVector.from_pretrained("user/tv-revisions"), second)


def test_repush_with_fewer_shards_leaves_no_stale_shards(hub_env) -> None:
    vector = _vector(5)
    vector.push_to_hub("user/tv-shards", token=hub_env.token, max_shard_size=2_000)
    files = HfApi().list_repo_files("user/tv-shards")
    assert sum(f.startswith("task_vector-") for f in files) > 1
    vector.push_to_hub("user/tv-shards", token=hub_env.token)
    files = HfApi().list_repo_files("user/tv-shards")
    assert not any(f.startswith("task_vector-") for f in files) and "task_vector.safetensors" in files
    assert _same(TaskVector.from_pretrained("user/tv-shards"), vector)


def test_model_card_carries_hub_metadata_and_merge_snippet(hub_env) -> None:
    _vector(6).push_to_hub("user/tv-card", token=hub_env.token)
    card = ModelCard.load("user/tv-card")
    assert card.data.library_name == "saft-hf"
    assert card.data.base_model == CONFIG["base_model"]
    assert {"task-vector", "saft", "model-merging"} <= set(card.data.tags)
    assert card.data.datasets == ["ylecun/mnist"] and card.data.metrics == ["accuracy"]
    assert "saft-merge" in card.text and "--repos user/tv-card" in card.text
    assert 'TaskVector.from_pretrained("user/tv-card")' in card.text
    assert CONFIG["base_model_revision"] in card.text and "rho=0.05" in card.text


def test_model_card_keeps_a_local_base_path_out_of_the_hub_metadata(tmp_path: Path) -> None:
    vector = TaskVector(dict(_vector(8)), {**CONFIG, "base_model": str(tmp_path)})
    card = ModelCard.load(vector.save_pretrained(tmp_path / "tv") / "README.md")
    assert card.data.base_model is None  # the Hub refuses a path as base_model
    assert f"`{tmp_path}`" in card.text and "huggingface.co/" + str(tmp_path) not in card.text


def test_load_task_vector_dispatches_hub_task_vector_repos(hub_env) -> None:
    vector = _vector(7)
    vector.push_to_hub("user/tv-dispatch", token=hub_env.token)
    shapes = {n: tuple(t.shape) for n, t in vector.items()}
    loaded = load_task_vector("user/tv-dispatch", base=shapes, base_id=CONFIG["base_model"])
    assert _same(loaded, vector)


def test_missing_repo_is_a_clear_error(hub_env) -> None:
    with pytest.raises(TaskVectorError, match=r"'user/does-not-exist' was not found"):
        TaskVector.from_pretrained("user/does-not-exist")


def test_missing_revision_is_a_clear_error(hub_env) -> None:
    _vector(8).push_to_hub("user/tv-norev", token=hub_env.token)
    with pytest.raises(TaskVectorError, match="revision 'no-such-branch'"):
        TaskVector.from_pretrained("user/tv-norev", revision="no-such-branch")


def test_repo_without_task_vector_files_is_a_clear_error(hub_env) -> None:
    api = HfApi(token=hub_env.token)
    api.create_repo("user/not-a-vector")
    api.upload_file(path_or_fileobj=b"hello", path_in_repo="notes.json", repo_id="user/not-a-vector")
    with pytest.raises(TaskVectorError, match=CONFIG_NAME):
        TaskVector.from_pretrained("user/not-a-vector")


def test_token_is_sent_but_never_printed_or_logged(
    hub_env, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    vector = _vector(9)
    vector.push_to_hub("user/tv-token", token=hub_env.token, private=True)
    pulled = TaskVector.from_pretrained("user/tv-token", token=hub_env.token)
    assert _same(pulled, vector)
    captured = capsys.readouterr()
    assert f"Bearer {hub_env.token}" in hub_env.server.auth_headers
    for text in (captured.out, captured.err, caplog.text, repr(pulled), str(pulled.config)):
        assert hub_env.token not in text


def test_hub_env_points_huggingface_hub_at_the_loopback_server(hub_env) -> None:
    from huggingface_hub import constants

    assert constants.ENDPOINT == hub_env.endpoint and hub_env.endpoint.startswith("http://127.0.0.1:")
    assert not constants.is_offline_mode() and constants.HF_HUB_DISABLE_XET
    assert Path(constants.HF_HUB_CACHE).is_relative_to(hub_env.hf_home)
    assert HfApi().endpoint == hub_env.endpoint
