"""LoRA-SAFT end to end: examples/train_saft.py --lora_r on the tiny CLIP, then saft-merge reads the adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saft_hf.cli.merge import main as merge_main
from saft_hf.clip import load_vision_tower
from saft_hf.readers import LORA_PROVENANCE_NAME
from saft_hf.task_vectors import load_task_vector
from tests.test_train_saft import _load_script

RANK, ALPHA = 4, 8.0


def _train(out: Path, task: str, clip_dir: Path, data_dir: Path, *extra: str) -> Path:
    argv = [
        "--task", task, "--model_name_or_path", str(clip_dir), "--data_dir", str(data_dir), "--output_dir", str(out),
        "--max_steps", "4", "--per_device_train_batch_size", "8", "--learning_rate", "5e-2", "--warmup_steps", "0",
        "--logging_steps", "1", "--use_cpu", "--disable_tqdm", "true", "--max_test_samples", "8",
        "--lora_r", str(RANK), "--lora_alpha", str(ALPHA), "--lora_target_modules", "q_proj", "v_proj", *extra,
    ]  # fmt: skip
    assert _load_script().main(argv) == 0
    return out


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, tiny_clip_dir, tiny_task_data_dir):
    root = tmp_path_factory.mktemp("lora_saft")
    asam = _train(root / "colors", "TinyColors", tiny_clip_dir, tiny_task_data_dir)
    sam = _train(root / "patterns", "TinyPatterns", tiny_clip_dir, tiny_task_data_dir, "--sam_adaptive", "false",
                 "--sam_rho", "0.05", "--sam_mode", "looksam", "--sam_interval", "2")
    return asam, sam


def _lora_delta(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """scaling * B @ A per adapted weight, straight from the saved adapter file (names as in the tower)."""
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    deltas = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            name = key.split(".lora_A.")[0].removeprefix("base_model.model.") + ".weight"
            deltas[name] = (b @ a) * (ALPHA / RANK)
    return deltas


@pytest.mark.slow
def test_lora_run_saves_only_the_adapter_as_the_task_vector(lora_runs):
    out = lora_runs[0]
    adapter = out / "task_vector"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", RANK, ALPHA)
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert (adapter / "head.safetensors").is_file() and not (out / "vision_model").exists()
    deltas = _lora_delta(adapter)
    assert deltas and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in deltas)
    assert any(d.abs().max() > 0 for d in deltas.values()), "the adapter did not train (B is still zero)"


@pytest.mark.slow
def test_lora_provenance_records_method_and_rank(lora_runs, tiny_clip_dir):
    for out, method, mode in zip(lora_runs, ("ASAM", "SAM"), ("sam", "looksam")):
        results = json.loads((out / "results.json").read_text())
        assert results["method"] == method and results["hyperparameters"]["lora_r"] == RANK
        assert results["hyperparameters"]["sam_mode"] == mode
        recorded = json.loads((out / "task_vector" / LORA_PROVENANCE_NAME).read_text())
        assert recorded["finetuning"]["method"] == method
        vector = load_task_vector(out / "task_vector", base=load_vision_tower(tiny_clip_dir))
        assert vector.config["finetuning"]["method"] == method
        assert vector.config["finetuning"]["hyperparameters"]["lora_r"] == RANK
        assert vector.config["task"] == results["task"] and vector.config["base_model"] == str(tiny_clip_dir)


@pytest.mark.slow
def test_saft_merge_reads_the_lora_task_vectors(lora_runs, tiny_clip_dir, tmp_path):
    merged_dir = tmp_path / "merged"
    code = merge_main(["--repos", ",".join(str(r / "task_vector") for r in lora_runs), "--method",
                       "task_arithmetic", "--scaling", "0.5", "--output", str(merged_dir), "--no-progress"])
    assert code == 0
    merged = load_file(str(merged_dir / "model.safetensors"))
    base = {n: p.detach() for n, p in load_vision_tower(tiny_clip_dir).named_parameters()}
    deltas = [_lora_delta(r / "task_vector") for r in lora_runs]
    for name, theta in base.items():
        expected = theta + 0.5 * sum((d[name] for d in deltas if name in d), torch.zeros_like(theta))
        torch.testing.assert_close(merged[name], expected, atol=1e-6, rtol=0, msg=name)
    assert any(not torch.equal(merged[n], base[n]) for n in deltas[0])
    assert sorted(p.name for p in (merged_dir / "heads").iterdir()) == ["TinyColors", "TinyPatterns"]


def test_bad_lora_arguments_are_refused(tmp_path):
    script = _load_script()
    for argv, message in ((["--lora_r", "0"], "lora_r"), (["--lora_r", "4", "--lora_alpha", "0"], "lora_alpha")):
        script_args, _ = script.parse_args(["--output_dir", str(tmp_path), *argv])
        with pytest.raises(ValueError, match=message):
            script.lora_settings(script_args)
