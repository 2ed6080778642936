"""TaskVector: construction, arithmetic, in-place writers, the on-disk format and its error checks."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import saft_hf.task_vector_io as tv_module
from saft_hf.task_vectors import (
    CONFIG_NAME,
    INDEX_NAME,
    WEIGHTS_NAME,
    CorruptedTaskVectorError,
    IncompatibleTaskVectorError,
    TaskVector,
    TaskVectorError,
    add_scaled_,
    check_compatible,
    load_task_vector,
    load_task_vectors,
)
from tests.tiny_models import perturbed, tiny_tower


@pytest.fixture(scope="module")
def base() -> nn.Module:
    return tiny_tower()


@pytest.fixture(scope="module")
def vectors(base: nn.Module) -> tuple[TaskVector, TaskVector]:
    config = {"base_model": "openai/clip-vit-base-patch32", "task": "mnist"}
    a = TaskVector.from_models(base, perturbed(base, 1), config=config)
    b = TaskVector.from_models(base, perturbed(base, 2), config={**config, "task": "svhn"})
    return a, b


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------- construction
def test_from_models_is_finetuned_minus_base_over_common_float_params(base: nn.Module) -> None:
    finetuned = perturbed(base, 3)
    vector = TaskVector.from_models(base, finetuned)
    assert set(vector.keys()) == {n for n, _ in base.named_parameters()}
    for name, param in finetuned.named_parameters():
        assert torch.equal(vector[name], param.detach() - dict(base.named_parameters())[name].detach())


def test_from_models_include_exclude_patterns_select_parameters(base: nn.Module) -> None:
    finetuned = perturbed(base, 3)
    vector = TaskVector.from_models(base, finetuned, include=[r"encoder\.layers"], exclude=[r"layer_norm"])
    assert vector.names and all("encoder.layers" in n and "layer_norm" not in n for n in vector.names)


def test_from_models_skips_integer_and_missing_entries() -> None:
    base_state = {"w": torch.zeros(2), "steps": torch.tensor([1]), "only_base": torch.ones(1)}
    ft_state = {"w": torch.ones(2), "steps": torch.tensor([5]), "only_ft": torch.ones(1)}
    assert TaskVector.from_models(base_state, ft_state).names == ["w"]


def test_from_models_with_mismatched_shapes_names_the_parameter() -> None:
    with pytest.raises(IncompatibleTaskVectorError, match="'w'"):
        TaskVector.from_models({"w": torch.zeros(2)}, {"w": torch.zeros(3)})


def test_mapping_protocol_len_keys_getitem_iter(vectors: tuple[TaskVector, TaskVector]) -> None:
    a, _ = vectors
    assert len(a) == len(list(a)) == len(a.keys())
    assert dict(a.items()).keys() == set(a.names)
    assert a.shapes[a.names[0]] == tuple(a[a.names[0]].shape)


def test_norm_is_global_l2(vectors: tuple[TaskVector, TaskVector]) -> None:
    a, _ = vectors
    expected = torch.cat([a[n].flatten().double() for n in a]).norm().item()
    assert a.norm() == pytest.approx(expected, rel=1e-12)


def test_nan_in_a_vector_is_rejected_naming_the_tensor() -> None:
    with pytest.raises(CorruptedTaskVectorError, match="'bad'"):
        TaskVector({"ok": torch.zeros(2), "bad": torch.tensor([1.0, float("nan")])})


# ----------------------------------------------------------------------------- arithmetic
def test_addition_subtraction_scaling_and_negation(vectors: tuple[TaskVector, TaskVector]) -> None:
    a, b = vectors
    total, diff, scaled, rscaled, neg = a + b, a - b, a * 0.5, 0.5 * a, -a
    for name in a:
        assert torch.equal(total[name], a[name] + b[name])
        assert torch.equal(diff[name], a[name] - b[name])
        assert torch.equal(scaled[name], a[name] * 0.5)
        assert torch.equal(rscaled[name], scaled[name])
        assert torch.equal(neg[name], -a[name])
    assert all(torch.equal(s, t) for s, t in zip(sum([a, b]).values(), total.values()))


def test_adding_vectors_with_different_parameters_is_refused(vectors: tuple[TaskVector, TaskVector]) -> None:
    a, _ = vectors
    partial = TaskVector({n: a[n] for n in a.names[:-1]})
    with pytest.raises(IncompatibleTaskVectorError, match=a.names[-1].replace(".", r"\.")):
        a + partial


# ----------------------------------------------------------------------------- in-place writers
def test_apply_to_writes_base_plus_scaled_vector_exactly(base: nn.Module, vectors: tuple[TaskVector, TaskVector]) -> None:
    a, _ = vectors
    model = copy.deepcopy(base)
    before = _state(model)
    assert a.apply_to(model, scale=0.3) is model
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), before[name] + 0.3 * a[name])


def test_add_scaled_writes_weighted_sum_and_resets_others_to_base(
    base: nn.Module, vectors: tuple[TaskVector, TaskVector]
) -> None:
    a, b = vectors
    base_state = _state(base)
    partial = TaskVector({n: a[n] for n in a.names[:3]})
    model = perturbed(base, 9)  # arbitrary current weights: all must be overwritten
    add_scaled_(model, base_state, [partial, b], [0.3, 0.7])
    for name, param in model.named_parameters():
        expected = base_state[name] + (0.3 * partial[name] if name in partial else 0) + 0.7 * b[name]
        assert torch.equal(param.detach(), expected)
    add_scaled_(model, base_state, {}, 1.0)
    assert all(torch.equal(p.detach(), base_state[n]) for n, p in model.named_parameters())


def test_add_scaled_rejects_a_delta_of_the_wrong_shape(base: nn.Module) -> None:
    name, param = next(iter(base.named_parameters()))
    with pytest.raises(IncompatibleTaskVectorError, match=name.replace(".", r"\.")):
        add_scaled_(copy.deepcopy(base), _state(base), {name: torch.zeros(param.numel() + 1)}, 1.0)


def test_add_scaled_rejects_scale_count_mismatch(base: nn.Module, vectors: tuple[TaskVector, TaskVector]) -> None:
    with pytest.raises(TaskVectorError, match="2 task vectors but 1 scales"):
        add_scaled_(copy.deepcopy(base), _state(base), list(vectors), [0.5])


# ----------------------------------------------------------------------------- on-disk format
def test_save_and_load_round_trip_is_bitwise_and_keeps_config(vectors: tuple[TaskVector, TaskVector], tmp_path: Path) -> None:
    a, _ = vectors
    loaded = TaskVector.from_pretrained(a.save_pretrained(tmp_path / "tv"))
    assert loaded.is_lazy and sorted(loaded.names) == sorted(a.names)
    assert all(torch.equal(loaded[n], a[n]) for n in a)
    config = json.loads((tmp_path / "tv" / CONFIG_NAME).read_text())
    assert config["task"] == "mnist" and config["format_version"] == 1
    assert config["fingerprint"] == tv_module.fingerprint(a.shapes) == loaded.config["fingerprint"]


def test_sharded_save_writes_index_and_round_trips(vectors: tuple[TaskVector, TaskVector], tmp_path: Path) -> None:
    a, _ = vectors
    directory = a.save_pretrained(tmp_path / "tv", max_shard_size=8_000)
    index = json.loads((directory / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(a.names)
    loaded = TaskVector.from_pretrained(directory)
    assert all(torch.equal(loaded[n], a[n]) for n in a)


@pytest.mark.parametrize(("text", "nbytes"), [("8kB", 8_000), ("8KB", 8_000), ("8KiB", 8_192), ("0.008MB", 8_000), ("8000", 8_000)])
def test_max_shard_size_accepts_hf_size_strings(
    vectors: tuple[TaskVector, TaskVector], tmp_path: Path, text: str, nbytes: int
) -> None:
    a, _ = vectors
    from_int = a.save_pretrained(tmp_path / "int", max_shard_size=nbytes, model_card=False)
    from_text = a.save_pretrained(tmp_path / "text", max_shard_size=text, model_card=False)
    assert (from_text / INDEX_NAME).read_text() == (from_int / INDEX_NAME).read_text()
    assert all(torch.equal(TaskVector.from_pretrained(from_text)[n], a[n]) for n in a)


@pytest.mark.parametrize("bad", ["5 parsecs", "GB", "-5GB", "0", 0, -1, True, 1.5])
def test_bad_max_shard_size_is_a_clear_error(vectors: tuple[TaskVector, TaskVector], tmp_path: Path, bad: object) -> None:
    a, _ = vectors
    with pytest.raises(TaskVectorError, match=r"max_shard_size.*e\.g\. '5GB'"):
        a.save_pretrained(tmp_path / "tv", max_shard_size=bad)  # type: ignore[arg-type]
    assert not (tmp_path / "tv").exists()


def test_save_can_cast_dtype(vectors: tuple[TaskVector, TaskVector], tmp_path: Path) -> None:
    a, _ = vectors
    loaded = TaskVector.from_pretrained(a.save_pretrained(tmp_path / "tv", dtype=torch.float16))
    name = a.names[0]
    assert loaded[name].dtype == torch.float16 and torch.equal(loaded[name], a[name].half())


def test_head_and_class_names_travel_with_the_vector(vectors: tuple[TaskVector, TaskVector], tmp_path: Path) -> None:
    a, _ = vectors
    head = {"weight": torch.randn(3, 16)}
    with_head = TaskVector(a.to_dict(), a.config, head=head, class_names=["0", "1", "2"])
    loaded = TaskVector.from_pretrained(with_head.save_pretrained(tmp_path / "tv"))
    assert loaded.class_names == ["0", "1", "2"] and torch.equal(loaded.head["weight"], head["weight"])
    copied = TaskVector(a.to_dict(), a.config, head_dir=tmp_path / "tv")  # copy files from a directory
    again = TaskVector.from_pretrained(copied.save_pretrained(tmp_path / "tv2"))
    assert again.class_names == ["0", "1", "2"] and torch.equal(again.head["weight"], head["weight"])


def test_lazy_load_reads_no_tensor_until_asked(
    vectors: tuple[TaskVector, TaskVector], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, _ = vectors
    directory = a.save_pretrained(tmp_path / "tv", max_shard_size=8_000)
    reads: list[str] = []
    real_safe_open = tv_module.safe_open

    class CountingHandle:
        def __init__(self, *args: object, **kwargs: object) -> None:
            self._inner = real_safe_open(*args, **kwargs)

        def get_tensor(self, name: str) -> torch.Tensor:
            reads.append(name)
            return self._inner.get_tensor(name)

        def __getattr__(self, attr: str) -> object:
            return getattr(self._inner, attr)

        def __enter__(self) -> CountingHandle:
            self._inner.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self._inner.__exit__(*exc)

    monkeypatch.setattr(tv_module, "safe_open", CountingHandle)
    loaded = TaskVector.from_pretrained(directory)
    assert sorted(loaded.names) == sorted(a.names) and loaded.shapes == a.shapes and len(loaded) == len(a)
    assert reads == []
    loaded[a.names[1]]
    assert reads == [a.names[1]]


def test_failed_save_leaves_previous_directory_intact(
    vectors: tuple[TaskVector, TaskVector], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = vectors
    directory = a.save_pretrained(tmp_path / "tv")

    def failing_save_file(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(tv_module, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        b.save_pretrained(directory)
    assert sorted(os.listdir(tmp_path)) == ["tv"]
    assert all(torch.equal(TaskVector.from_pretrained(directory)[n], a[n]) for n in a)


# ----------------------------------------------------------------------------- error checks
def test_truncated_safetensors_is_reported_with_file_and_fix(vectors: tuple[TaskVector, TaskVector], tmp_path: Path) -> None:
    a, _ = vectors
    directory = a.save_pretrained(tmp_path / "tv")
    weights = directory / WEIGHTS_NAME
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    with pytest.raises(CorruptedTaskVectorError, match=r"task_vector\.safetensors.*re-create") as caught:
        TaskVector.from_pretrained(directory)
    assert "force_download" not in str(caught.value)  # a local folder is not downloaded again


def test_missing_shard_is_reported(vectors: tuple[TaskVector, TaskVector], tmp_path: Path) -> None:
    a, _ = vectors
    directory = a.save_pretrained(tmp_path / "tv", max_shard_size=8_000)
    shard = sorted(directory.glob("task_vector-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CorruptedTaskVectorError, match=shard.name):
        TaskVector.from_pretrained(directory)


@pytest.mark.parametrize("evil", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_pointing_outside_the_directory_is_refused(
    vectors: tuple[TaskVector, TaskVector], tmp_path: Path, evil: str
) -> None:
    a, _ = vectors
    directory = a.save_pretrained(tmp_path / "tv", max_shard_size=8_000)
    index = json.loads((directory / INDEX_NAME).read_text())
    index["weight_map"][a.names[0]] = evil
    (directory / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CorruptedTaskVectorError, match="outside"):
        TaskVector.from_pretrained(directory)


def test_nan_in_a_saved_vector_is_reported_on_read_with_tensor_and_source(tmp_path: Path) -> None:
    vector = TaskVector({"w": torch.tensor([1.0, float("inf")])}, check_finite=False)
    directory = vector.save_pretrained(tmp_path / "tv")
    loaded = TaskVector.from_pretrained(directory)
    with pytest.raises(CorruptedTaskVectorError, match=rf"'w'.*{directory.name}"):
        loaded["w"]


def test_check_compatible_names_first_mismatched_parameter(base: nn.Module, vectors: tuple[TaskVector, TaskVector]) -> None:
    a, _ = vectors
    shapes = {n: tuple(p.shape) for n, p in base.named_parameters()}
    check_compatible([a], shapes, base_id="openai/clip-vit-base-patch32")
    wrong = dict(shapes, **{a.names[2]: (1, 1)})
    with pytest.raises(IncompatibleTaskVectorError, match=a.names[2].replace(".", r"\.")):
        check_compatible([a], wrong)
    with pytest.raises(IncompatibleTaskVectorError, match="clip-vit-large"):
        check_compatible([a], shapes, base_id="openai/clip-vit-large-patch14")


def test_directory_without_config_is_not_taken_for_a_task_vector(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(TaskVectorError, match=CONFIG_NAME):
        TaskVector.from_pretrained(tmp_path / "empty")


# ----------------------------------------------------------------------------- other sources
def test_full_finetuned_model_dir_gives_the_same_vector_as_from_models(base: nn.Module, tmp_path: Path) -> None:
    finetuned = perturbed(base, 4)
    finetuned.save_pretrained(tmp_path / "ft")
    base.save_pretrained(tmp_path / "base")
    expected = TaskVector.from_models(base, finetuned)
    from_module = load_task_vector(tmp_path / "ft", base=base)
    [from_dir] = load_task_vectors([tmp_path / "ft"], base=str(tmp_path / "base"))
    for vector in (from_module, from_dir):
        assert vector.is_lazy and set(vector.names) == set(expected.names)
        assert all(torch.equal(vector[n], expected[n]) for n in expected)


def test_full_model_without_base_asks_for_one(base: nn.Module, tmp_path: Path) -> None:
    base.save_pretrained(tmp_path / "ft")
    with pytest.raises(TaskVectorError, match="pass base="):
        load_task_vector(tmp_path / "ft")


def test_full_model_with_other_shapes_names_the_parameter(base: nn.Module, tmp_path: Path) -> None:
    save_file({"visual_projection.weight": torch.zeros(8, 32)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(IncompatibleTaskVectorError, match=r"visual_projection\.weight"):
        load_task_vector(tmp_path, base=base)


def _lora_dir(base: nn.Module, tmp_path: Path, **lora_kwargs: object) -> tuple[Path, nn.Module]:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **lora_kwargs)
    torch.manual_seed(5)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    peft_model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", peft_model.merge_and_unload()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_adapter_delta_equals_merge_and_unload(base: nn.Module, tmp_path: Path, use_rslora: bool) -> None:
    adapter, merged = _lora_dir(base, tmp_path, use_rslora=use_rslora)
    vector = load_task_vector(adapter, base=base)
    base_state = _state(base)
    merged_state = _state(merged)
    changed = {n for n in base_state if not torch.equal(base_state[n], merged_state[n])}
    assert changed and set(vector.names) == changed
    for name in vector:
        torch.testing.assert_close(vector[name], merged_state[name] - base_state[name], atol=1e-6, rtol=0)
    assert vector.config["finetuning"]["method"] == "lora"


def test_dora_adapter_is_refused(base: nn.Module, tmp_path: Path) -> None:
    adapter, _ = _lora_dir(base, tmp_path, use_dora=True)
    with pytest.raises(TaskVectorError, match="DoRA"):
        load_task_vector(adapter, base=base)


def test_other_peft_types_are_refused(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(TaskVectorError, match="IA3"):
        load_task_vector(tmp_path)
