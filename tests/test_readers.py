"""Readers of the repo kinds: import direction, dispatch from TaskVector.from_pretrained, CLIP layout mapping."""

from __future__ import annotations

import ast
import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import saft_hf
from saft_hf.readers import layout_key, layout_map
from saft_hf.task_vectors import TaskVector, load_task_vector, load_task_vectors
from tests.tiny_models import perturbed

PACKAGE = Path(saft_hf.__file__).parent
# lower layers first: a module may import only modules listed before it
LAYERS = ["task_vector_io", "readers", "hub", "task_vectors"]


def _saft_imports(module: str) -> set[str]:
    """The saft_hf modules ``module`` imports anywhere (module level or inside functions)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update([node.module] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("saft_hf."):
            found.add(node.module.split(".")[1])
    return {name.split(".")[0] for name in found}


def test_imports_run_one_way_format_readers_hub_task_vectors() -> None:
    for position, module in enumerate(LAYERS):
        above = set(LAYERS[position + 1 :]) | {"pipeline", "cli", "analysis", "merging", "clip", "demo"}
        assert not _saft_imports(module) & above, f"{module} imports {_saft_imports(module) & above}"
    assert "readers" not in _saft_imports("hub") and "task_vectors" not in _saft_imports("readers")


# ----------------------------------------------------------------------------- CLIP layouts (item 23)
def _config(**extra: object):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                            image_size=32, patch_size=8, projection_dim=16, **extra)  # fmt: skip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full tiny ``CLIPModel`` (vision_model./text_model./projections)."""
    from saft_hf.testing import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("layouts") / "clip")


@pytest.fixture(scope="module")
def towers(clip_dir: Path) -> dict[str, nn.Module]:
    """The base's vision tower as CLIPVisionModel and as CLIPVisionModelWithProjection, and a fine-tune of it."""
    from transformers import CLIPVisionModel

    from saft_hf.clip import load_vision_tower

    with_projection = load_vision_tower(clip_dir)
    vision = CLIPVisionModel(with_projection.config)  # transformers 5: embeddings.…, no vision_model. prefix
    vision.load_state_dict({layout_key(k): v for k, v in with_projection.state_dict().items() if k.startswith("vision_model.")})
    return {"with_projection": with_projection, "vision": vision.eval(), "finetuned": perturbed(vision.eval(), 7)}


def _save_tower(model: nn.Module, directory: Path, prefix: str) -> Path:
    """``model`` saved by this transformers, its tensor names then rewritten to carry ``prefix`` or not."""
    model.save_pretrained(directory)
    tensors = load_file(str(directory / "model.safetensors"))
    renamed = {prefix + layout_key(name): tensor for name, tensor in tensors.items()}
    save_file(renamed, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


@pytest.fixture(scope="module")
def finetuned_dirs(towers: dict[str, nn.Module], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The fine-tuned CLIPVisionModel as transformers 5 saves it (``embeddings.…``) and as 4 did (``vision_model.…``)."""
    root = tmp_path_factory.mktemp("finetuned")
    return {
        "transformers5": _save_tower(towers["finetuned"], root / "t5", ""),
        "transformers4": _save_tower(towers["finetuned"], root / "t4", "vision_model."),
    }


@pytest.fixture(scope="module")
def base_dirs(clip_dir: Path, towers: dict[str, nn.Module], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    towers["with_projection"].save_pretrained(root / "with_projection")
    return {
        "CLIPModel": clip_dir,
        "CLIPVisionModel-t5": _save_tower(towers["vision"], root / "vision-t5", ""),
        "CLIPVisionModel-t4": _save_tower(towers["vision"], root / "vision-t4", "vision_model."),
        "CLIPVisionModelWithProjection": root / "with_projection",
    }


def _expected(towers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """τ by layout key: fine-tuned minus base vision tower."""
    base = {layout_key(n): p.detach() for n, p in towers["vision"].named_parameters()}
    return {layout_key(n): p.detach() - base[layout_key(n)] for n, p in towers["finetuned"].named_parameters()}


@pytest.mark.parametrize("saved_by", ["transformers5", "transformers4"])
@pytest.mark.parametrize("base_kind", ["CLIPModel", "CLIPVisionModel-t5", "CLIPVisionModel-t4", "CLIPVisionModelWithProjection"])
def test_finetuned_clip_vision_model_reads_against_every_base_layout(
    towers: dict[str, nn.Module], finetuned_dirs: dict[str, Path], base_dirs: dict[str, Path], saved_by: str, base_kind: str
) -> None:
    from saft_hf.task_vectors import load_base_state

    base_dir = base_dirs[base_kind]
    base_names = set(load_base_state(base_dir))
    [vector] = load_task_vectors([finetuned_dirs[saved_by]], base=str(base_dir))
    assert set(vector) <= base_names  # in the base's own names
    expected = _expected(towers)
    assert {layout_key(n) for n in vector} == set(expected)
    for name in vector:
        torch.testing.assert_close(vector[name], expected[layout_key(name)], atol=1e-6, rtol=0)


@pytest.mark.parametrize("saved_by", ["transformers5", "transformers4"])
def test_saft_merge_merges_a_finetuned_clip_vision_model_against_a_clip_model_base(
    clip_dir: Path, towers: dict[str, nn.Module], finetuned_dirs: dict[str, Path], tmp_path: Path, saved_by: str
) -> None:
    from saft_hf.cli.merge import main
    from saft_hf.clip import load_vision_tower

    second = _save_tower(perturbed(towers["vision"], 8), tmp_path / "second", "" if saved_by == "transformers5" else "vision_model.")
    output = tmp_path / "merged"
    code = main(["--repos", f"{finetuned_dirs[saved_by]},{second}", "--base", str(clip_dir), "--method", "task_arithmetic",
                 "--scaling", "1.0", "--output", str(output), "--no-progress"])  # fmt: skip
    assert code == 0
    merged = load_file(str(output / "model.safetensors"))
    base = {n: p.detach() for n, p in load_vision_tower(clip_dir).named_parameters()}
    tau = _expected(towers)
    name = "vision_model.encoder.layers.0.mlp.fc1.weight"
    second_tau = load_file(str(second / "model.safetensors"))[("" if saved_by == "transformers5" else "vision_model.") + layout_key(name)]
    expected = base[name] + tau[layout_key(name)] + (second_tau - base[name])
    torch.testing.assert_close(merged[name], expected, atol=1e-5, rtol=0)


def test_lora_adapter_made_on_clip_vision_model_follows_the_base_layout(
    towers: dict[str, nn.Module], base_dirs: dict[str, Path], tmp_path: Path
) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
    get_peft_model(copy.deepcopy(towers["vision"]), config).save_pretrained(tmp_path / "adapter")
    for kind in ("CLIPModel", "CLIPVisionModel-t5"):
        base_state = saft_hf.load_base_state(base_dirs[kind])  # a state, so the recorded base id is not compared
        vector = load_task_vector(tmp_path / "adapter", base=base_state)
        prefix = "vision_model." if kind == "CLIPModel" else ""
        assert vector.names and all(n.startswith(prefix + "encoder.") and n.endswith("q_proj.weight") for n in vector)
        assert set(vector) <= set(base_state)


def test_layout_map_keeps_text_and_vision_apart_and_leaves_unknown_names() -> None:
    base = ["vision_model.encoder.x", "text_model.encoder.x", "visual_projection.weight"]
    names = ["encoder.x", "vision_model.encoder.x", "visual_projection.weight", "other.y"]
    assert layout_map(names, base) == {
        "encoder.x": "vision_model.encoder.x",
        "vision_model.encoder.x": "vision_model.encoder.x",
        "visual_projection.weight": "visual_projection.weight",
        "other.y": "other.y",
    }
    assert layout_map(["vision_model.encoder.x"], ["encoder.x"]) == {"vision_model.encoder.x": "encoder.x"}


# ----------------------------------------------------------------------------- dispatch (item 22)
def test_from_pretrained_dispatches_to_every_repo_kind(towers: dict[str, nn.Module], finetuned_dirs: dict[str, Path], tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    base = {n: p.detach() for n, p in towers["vision"].named_parameters()}
    full = TaskVector.from_pretrained(finetuned_dirs["transformers5"], base=base)
    assert full.config["finetuning"]["method"] == "full" and set(full) == set(base)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"], init_lora_weights=False)
    get_peft_model(copy.deepcopy(towers["vision"]), config).save_pretrained(tmp_path / "adapter")
    lora = TaskVector.from_pretrained(tmp_path / "adapter")
    assert lora.config["finetuning"]["method"] == "lora" and all(n.endswith("v_proj.weight") for n in lora)
    saved = TaskVector.from_pretrained(TaskVector(dict(full), {"task": "t"}).save_pretrained(tmp_path / "tv"))
    assert saved.config["task"] == "t" and set(saved) == set(full)
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "notes.json").write_text(json.dumps({}))
    with pytest.raises(saft_hf.TaskVectorError, match="adapter_config.json"):
        TaskVector.from_pretrained(tmp_path / "none")


def test_saft_merge_without_base_merges_lora_adapters_made_on_clip_vision_model(
    clip_dir: Path, towers: dict[str, nn.Module], tmp_path: Path
) -> None:
    """The adapters record the CLIPModel base; their transformers-5 names are put in its layout before the check."""
    from peft import LoraConfig, get_peft_model

    from saft_hf.cli.merge import main

    adapters = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
        get_peft_model(copy.deepcopy(towers["vision"]), config).save_pretrained(tmp_path / f"adapter{seed}")
        adapters.append(tmp_path / f"adapter{seed}")
    assert json.loads((adapters[0] / "adapter_config.json").read_text())["base_model_name_or_path"] == str(clip_dir)
    code = main(["--repos", ",".join(map(str, adapters)), "--method", "task_arithmetic", "--scaling", "1.0",
                 "--output", str(tmp_path / "merged"), "--no-progress"])  # fmt: skip
    assert code == 0
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    name = "vision_model.encoder.layers.0.self_attn.q_proj.weight"
    taus = [load_task_vector(a, base=saft_hf.load_base_state(clip_dir)) for a in adapters]
    base = saft_hf.load_base_state(clip_dir)[name]
    torch.testing.assert_close(merged[name], base + taus[0][name] + taus[1][name], atol=1e-5, rtol=0)
