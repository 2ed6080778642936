"""Task vectors on a Hub: push/pull against the loopback server, model cards, revisions and errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard

from saft_hf.task_vectors import CONFIG_NAME, TaskVector, TaskVectorError, load_task_vector
from tests.tiny_models import perturbed, tiny_tower

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
    # named by its folder name only: the card never carries a path of the machine that wrote it
    assert f"`{tmp_path.name}` (a local folder" in card.text and str(tmp_path) not in card.text
    assert "--repos ./tv," in card.text and 'TaskVector.from_pretrained("./tv")' in card.text


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


# ----------------------------------------------------------------------------- sharded repos from the Hub cache
def _upload(folder: Path, repo_id: str, token: str) -> None:
    api = HfApi(token=token)
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=folder)


def _assert_cache_links(repo_id: str, pattern: str) -> None:
    """The files were really read from the Hub cache, whose snapshot files link into blobs/."""
    from huggingface_hub import snapshot_download

    snapshot = Path(snapshot_download(repo_id, allow_patterns=["*.json"]))
    shards = list(snapshot.glob(pattern))
    assert len(shards) > 1 and all(p.is_symlink() for p in shards)


def test_sharded_task_vector_round_trips_through_the_hub_cache(hub_env) -> None:
    vector = _vector(11)
    vector.push_to_hub("user/tv-sharded", token=hub_env.token, max_shard_size=2_000)
    pulled = TaskVector.from_pretrained("user/tv-sharded")
    assert _same(pulled, vector)
    _assert_cache_links("user/tv-sharded", "task_vector-*.safetensors")


def test_sharded_full_model_round_trips_through_the_hub_cache(hub_env, tmp_path: Path) -> None:
    base = tiny_tower(0)
    finetuned = perturbed(base, 1)
    finetuned.save_pretrained(tmp_path / "ft", max_shard_size="20KB")
    assert (tmp_path / "ft" / "model.safetensors.index.json").is_file()
    _upload(tmp_path / "ft", "user/ft-sharded", hub_env.token)
    loaded = load_task_vector("user/ft-sharded", base=base)
    expected = TaskVector.from_models(base, finetuned)
    assert set(loaded) == set(expected) and all(torch.equal(loaded[n], expected[n]) for n in expected)
    _assert_cache_links("user/ft-sharded", "model-*.safetensors")


def test_sharded_lora_adapter_round_trips_through_the_hub_cache(hub_env, tmp_path: Path) -> None:
    import json

    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    base = tiny_tower(0)
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(tiny_tower(0), config).save_pretrained(tmp_path / "single")
    single = tmp_path / "single"
    whole = load_file(str(single / "adapter_model.safetensors"))
    expected = load_task_vector(single, base=base)
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "adapter_config.json").write_text((single / "adapter_config.json").read_text())
    names = sorted(whole)
    halves = {"adapter_model-00001-of-00002.safetensors": names[::2], "adapter_model-00002-of-00002.safetensors": names[1::2]}
    for filename, part in halves.items():
        save_file({n: whole[n] for n in part}, str(folder / filename))
    weight_map = {n: f for f, part in halves.items() for n in part}
    (folder / "adapter_model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _upload(folder, "user/lora-sharded", hub_env.token)
    loaded = load_task_vector("user/lora-sharded", base=base)
    assert set(loaded) == set(expected) and all(torch.equal(loaded[n], expected[n]) for n in expected)
    _assert_cache_links("user/lora-sharded", "adapter_model-*.safetensors")


# ----------------------------------------------------------------------------- the card's merge command runs
OTHER = "OWNER/OTHER_TASK_VECTOR"


def _card_merge_command(card_text: str) -> list[str]:
    """The ``saft-merge ...`` line of the card's bash block, split as a shell would."""
    import re
    import shlex

    [block] = re.findall(r"```bash\n(.*?)```", card_text, flags=re.DOTALL)
    [line] = [line for line in block.splitlines() if line.startswith("saft-merge ")]
    return shlex.split(line)


def _tower_vector(base_dir: Path, seed: int) -> TaskVector:
    from saft_hf.clip import load_vision_tower

    base = load_vision_tower(base_dir)
    return TaskVector.from_models(base, perturbed(base, seed), config={"task": f"task{seed}", "base_model": str(base_dir)})


def test_card_merge_command_of_a_pushed_vector_runs(hub_env, tiny_clip_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from saft_hf.cli.merge import main

    _tower_vector(tiny_clip_dir, 1).push_to_hub("user/tv-card-runs", token=hub_env.token)
    other = _tower_vector(tiny_clip_dir, 2).save_pretrained(tmp_path / "other")
    argv = _card_merge_command(ModelCard.load("user/tv-card-runs").text)
    assert argv[0] == "saft-merge" and any(OTHER in arg for arg in argv)
    argv = [arg.replace(OTHER, str(other)) for arg in argv]
    monkeypatch.chdir(tmp_path)
    assert main(argv[1:] + ["--no-progress"]) == 0  # the console script's entry point, in process
    merged = json.loads((tmp_path / "merged" / "merge_config.json").read_text())
    assert [r["repo"] for r in merged["repos"]] == ["user/tv-card-runs", "other"]


def test_card_merge_command_of_a_saved_vector_runs(tiny_clip_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from saft_hf.cli.merge import main

    folder = _tower_vector(tiny_clip_dir, 3).save_pretrained(tmp_path / "tv with space")
    other = _tower_vector(tiny_clip_dir, 4).save_pretrained(tmp_path / "other")
    argv = _card_merge_command((folder / "README.md").read_text())
    monkeypatch.chdir(tmp_path)
    assert main([arg.replace(OTHER, str(other)) for arg in argv[1:]] + ["--no-progress"]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_card_and_config_print_plain_values_for_enum_hyperparameters(tmp_path: Path) -> None:
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    from saft_hf import provenance_config
    from saft_hf.hub import make_model_card

    hyper = {"lr_scheduler_type": SchedulerType.COSINE, "optim": OptimizerNames.ADAMW_TORCH, "learning_rate": 1e-5}
    for config in (provenance_config(task="mnist", method="sam", hyperparameters=hyper),
                   {"task": "mnist", "finetuning": {"method": "sam", "hyperparameters": hyper}}):  # fmt: skip
        vector = TaskVector({"w": torch.ones(2)}, config)
        texts = [make_model_card(vector).text, (vector.save_pretrained(tmp_path / "tv") / "README.md").read_text()]
        texts.append((tmp_path / "tv" / CONFIG_NAME).read_text())
        for text in texts:
            assert "SchedulerType" not in text and "OptimizerNames" not in text
        assert "lr_scheduler_type=cosine" in texts[0] and "optim=adamw_torch" in texts[1]
        saved = json.loads(texts[2])["finetuning"]["hyperparameters"]
        assert saved["lr_scheduler_type"] == "cosine" and saved["optim"] == "adamw_torch"


def test_card_prints_whole_number_hyperparameters_as_integers(tmp_path: Path) -> None:
    from saft_hf.hub import make_model_card

    config = {"finetuning": {"method": "ASAM", "hyperparameters": {"warmup_steps": 0.0, "learning_rate": 1e-05}}}
    text = make_model_card(TaskVector({"w": torch.ones(2)}, config)).text
    assert "(learning_rate=1e-05, warmup_steps=0)" in text
