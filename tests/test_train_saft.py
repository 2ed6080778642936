"""examples/train_saft.py end to end through `accelerate launch` (1 and 2 CPU processes), plus its arguments."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from saft_hf.base_model import resolve_base
from saft_hf.clip import ZeroShotHead, build_zero_shot_head, load_vision_tower
from saft_hf.pipeline.inputs import recorded_accuracy, recorded_validation_accuracy
from saft_hf.task_vectors import TaskVector
from saft_hf.tasks import resolve_task
from tests.examples import load_example
from tests.launching import Launch, launcher

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "train_saft.py"


def _load_script():
    """The example script as a module."""
    return load_example("train_saft")


def _launch(tmp: Path, clip_dir: Path, data_dir: Path, processes: int, *extra: str) -> tuple[Launch, Path]:
    """Start examples/train_saft.py on the tiny task (tests/launching.py); returns the launch and output dir."""
    out = tmp / "out"
    command = [
        *launcher(processes), str(SCRIPT),
        "--task", "TinyColors", "--model_name_or_path", str(clip_dir), "--data_dir", str(data_dir),
        "--output_dir", str(out), "--max_steps", "8", "--per_device_train_batch_size", str(16 // processes),
        "--learning_rate", "1e-3", "--warmup_steps", "0", "--logging_steps", "1", "--use_cpu",
        "--disable_tqdm", "true", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp / "hf_home"), "PYTHONPATH": str(REPO)}
    return Launch(command, env, tmp / "log.txt"), out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_clip_dir, tiny_task_data_dir):
    """The 1-process ASAM run and the 2-process SAM run, started side by side to save wall time."""
    tmp1, tmp2 = tmp_path_factory.mktemp("train_1proc"), tmp_path_factory.mktemp("train_2proc")
    started = {
        "single": _launch(tmp1, tiny_clip_dir, tiny_task_data_dir, 1),
        # logging_steps above max_steps: the first and the last step must still be logged
        "two": _launch(tmp2, tiny_clip_dir, tiny_task_data_dir, 2, "--sam_adaptive", "false", "--sam_rho", "0.05",
                       "--logging_steps", "100"),
    }  # fmt: skip
    outputs = {}
    for name, (launch, out) in started.items():
        returncode = launch.wait()
        assert returncode == 0, f"{name} run failed:\n{launch.output()[-6000:]}"
        outputs[name] = out
    return outputs


@pytest.fixture(scope="module")
def single_run(runs):
    return runs["single"]


@pytest.fixture(scope="module")
def two_process_run(runs):
    return runs["two"]


def _assert_task_vector_is_finetuned_minus_base(out: Path, clip_dir: Path) -> None:
    delta = load_file(str(out / "task_vector" / "task_vector.safetensors"))
    finetuned = load_file(str(out / "vision_model" / "model.safetensors"))
    base = load_vision_tower(clip_dir).state_dict()
    assert set(delta) == set(finetuned)
    for name, tensor in delta.items():
        torch.testing.assert_close(tensor, finetuned[name] - base[name], rtol=0, atol=1e-6)
    assert any(t.abs().max() > 0 for t in delta.values()), "training changed nothing"


@pytest.mark.slow
def test_single_process_run_writes_model_head_task_vector_and_results(single_run, tiny_clip_dir):
    results = json.loads((single_run / "results.json").read_text())
    assert (results["task"], results["method"], results["world_size"]) == ("TinyColors", "ASAM", 1)
    assert results["hyperparameters"]["sam_rho"] == 0.5 and results["base_model"] == str(tiny_clip_dir)
    assert 0.0 <= results["test_accuracy"] <= 1.0 and results["global_step"] == 8
    assert (single_run / "vision_model" / "config.json").is_file()
    assert (single_run / "task_vector" / "head.safetensors").is_file()
    _assert_task_vector_is_finetuned_minus_base(single_run, tiny_clip_dir)


@pytest.mark.slow
def test_task_vector_records_method_metrics_and_dataset_for_card_and_merge(single_run, tiny_clip_dir):
    results = json.loads((single_run / "results.json").read_text())
    vector = TaskVector.from_pretrained(single_run / "task_vector")
    assert vector.config["finetuning"]["method"] == "ASAM"
    assert vector.config["finetuning"]["hyperparameters"]["sam_rho"] == 0.5
    assert recorded_accuracy(vector) == results["test_accuracy"]  # what the --eval report normalises by
    # what saft-merge --select normalized divides by: validation data only
    assert recorded_validation_accuracy(vector) == results["validation_accuracy"] > 0
    assert vector.config["base_model"] == str(tiny_clip_dir) and vector.config.get("base_model_revision") is None
    card = ModelCard.load(single_run / "task_vector" / "README.md")
    assert "**Fine-tuning method:** ASAM" in card.text and "sam_rho=0.5" in card.text
    assert card.data.metrics == ["accuracy", "validation_accuracy"] and card.data.datasets == [results["dataset_id"]]


@pytest.mark.slow
def test_training_loss_falls(single_run):
    losses = json.loads((single_run / "results.json").read_text())["loss_history"]
    assert len(losses) == 8
    assert sum(losses[-3:]) / 3 < losses[0]


@pytest.mark.slow
def test_saved_head_equals_a_freshly_built_one(single_run, tiny_clip_dir, tiny_task_data_dir):
    spec = resolve_task("TinyColors", tiny_task_data_dir)
    fresh = build_zero_shot_head(str(tiny_clip_dir), None, spec.classnames, spec.templates)
    saved = ZeroShotHead.from_pretrained(single_run)
    assert torch.equal(saved.weight, fresh.weight) and torch.equal(saved.logit_scale, fresh.logit_scale)
    assert saved.classnames == list(spec.classnames)


@pytest.mark.slow
def test_two_process_run_writes_the_same_outputs(two_process_run, tiny_clip_dir):
    results = json.loads((two_process_run / "results.json").read_text())
    assert (results["method"], results["world_size"], results["global_step"]) == ("SAM", 2, 8)
    _assert_task_vector_is_finetuned_minus_base(two_process_run, tiny_clip_dir)


@pytest.mark.slow
def test_a_run_shorter_than_logging_steps_logs_loss_and_sam_metrics_at_the_last_step(two_process_run):
    results = json.loads((two_process_run / "results.json").read_text())
    assert [entry["step"] for entry in results["sam_history"]] == [1, 8] and len(results["loss_history"]) == 2
    last = results["sam_history"][-1]
    assert last["sam_ascent_norm"] > 0 and last["sam_skipped"] == 0 and "sam_sharpness" in last


@pytest.mark.slow
def test_two_process_loss_is_not_multiplied_by_the_process_count(two_process_run, single_run):
    # both first losses are at the same initial weights on 16 examples; a 2x rescale would show
    first_two = json.loads((two_process_run / "results.json").read_text())["loss_history"][0]
    first_one = json.loads((single_run / "results.json").read_text())["loss_history"][0]
    assert 0.6 * first_one < first_two < 1.5 * first_one


def test_defaults_are_the_papers_and_standard_turns_sam_off(tmp_path):
    script = _load_script()
    _, args = script.parse_args(["--output_dir", str(tmp_path)])
    assert (args.learning_rate, args.per_device_train_batch_size, args.max_steps) == (1e-5, 128, 8000)
    assert (args.lr_scheduler_type, args.warmup_steps, args.weight_decay, args.max_grad_norm) == (
        "cosine", 500, 0.1, 1.0,
    )  # fmt: skip
    assert (args.sam_adaptive, args.sam_rho, script.method_name(args)) == (True, 0.5, "ASAM")
    _, plain = script.parse_args(["--output_dir", str(tmp_path), "--standard", "--learning_rate", "3e-5"])
    assert (plain.sam_rho, plain.learning_rate, script.method_name(plain)) == (0.0, 3e-5, "standard")


def test_reusing_a_head_with_the_wrong_class_count_is_an_error(tmp_path, tiny_clip_dir, tiny_task_data_dir):
    script = _load_script()
    patterns = resolve_task("TinyPatterns", tiny_task_data_dir)
    build_zero_shot_head(str(tiny_clip_dir), None, patterns.classnames, patterns.templates).save_pretrained(tmp_path)
    colors = resolve_task("TinyColors", tiny_task_data_dir)
    with pytest.raises(ValueError, match="3 classes but task 'TinyColors' has 4"):
        script.load_or_build_head(colors, resolve_base(tiny_clip_dir), tmp_path)


def test_help_explains_the_arguments():
    text = _load_script().build_parser().format_help()
    for flag in ("--task", "--model_name_or_path", "--data_dir", "--output_dir", "--sam_rho", "--sam_adaptive"):
        assert flag in text
    assert "task_spec.json" in text and "--standard" in text


def test_logging_defaults_suit_short_runs_and_are_not_recorded_as_hyperparameters(tmp_path):
    script = _load_script()
    _, args = script.parse_args(["--output_dir", str(tmp_path)])
    assert (args.logging_steps, args.logging_first_step) == (0.05, True)  # 20 logs per run, whatever its length
    assert set(script.NOT_HYPERPARAMETERS) <= set(script.PAPER_DEFAULTS)


# ----------------------------------------------------------------------------- user errors
def _error_cases(tmp: Path, clip_dir: Path, data_dir: Path) -> dict[str, tuple[list[str], str]]:
    empty = tmp / "empty"
    empty.mkdir(exist_ok=True)
    ok = ["--model_name_or_path", str(clip_dir), "--use_cpu", "true", "--max_steps", "1"]
    return {
        "unknown_task": (["--task", "Nope", "--data_dir", str(data_dir), *ok], "unknown task 'Nope'"),
        "empty_data_dir": (["--task", "TinyColors", "--data_dir", str(empty), *ok], f"--data_dir {str(empty)!r} is empty"),
        "missing_data_dir": (["--task", "TinyColors", "--data_dir", str(tmp / "nope"), *ok], "is not a folder"),
        "data_dir_without_the_task": (["--task", "DTD", "--data_dir", str(data_dir), *ok],
                                      "holds data for TinyColors, TinyPatterns but not for task 'DTD'"),
        "missing_model_folder": (["--task", "TinyColors", "--data_dir", str(data_dir), "--model_name_or_path",
                                  str(tmp / "no-clip"), "--use_cpu", "true"], "no such folder"),
        "negative_rho": (["--task", "TinyColors", "--data_dir", str(data_dir), *ok, "--sam_rho", "-1"],
                         "sam_rho must be a finite number >= 0"),
        "unwritable_output": (["--task", "TinyColors", "--data_dir", str(data_dir), *ok, "--output_dir", "/sys/o"],
                              "parent folder '/sys' is not writable"),
    }  # fmt: skip


@pytest.mark.parametrize(
    "case",
    ["unknown_task", "empty_data_dir", "missing_data_dir", "data_dir_without_the_task", "missing_model_folder",
     "negative_rho", "unwritable_output"],
)  # fmt: skip
def test_user_errors_are_one_line_naming_the_problem_and_write_nothing(
    case, tmp_path, tiny_clip_dir, tiny_task_data_dir, capsys
):
    script = _load_script()
    argv, message = _error_cases(tmp_path, tiny_clip_dir, tiny_task_data_dir)[case]
    out = tmp_path / "out"
    argv = argv if "--output_dir" in argv else [*argv, "--output_dir", str(out)]
    assert script.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train_saft.py: error: ") and message in err[0], err
    assert not out.exists()


def test_a_task_whose_data_fails_to_load_leaves_no_files(tmp_path, tiny_clip_dir, tiny_task_data_dir, capsys):
    script = _load_script()
    broken = tmp_path / "data" / "TinyColors"
    broken.mkdir(parents=True)
    shutil.copyfile(tiny_task_data_dir / "TinyColors" / "task_spec.json", broken / "task_spec.json")
    (broken / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')  # the splits themselves are missing
    out = tmp_path / "out"
    code = script.main(["--task", "TinyColors", "--data_dir", str(tmp_path / "data"), "--model_name_or_path",
                        str(tiny_clip_dir), "--output_dir", str(out), "--use_cpu", "true"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("train_saft.py: error: ")
    assert not out.exists()


def test_a_user_error_through_the_script_is_one_line_without_traceback(tmp_path, tiny_clip_dir, tiny_task_data_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    argv, message = _error_cases(tmp_path, tiny_clip_dir, tiny_task_data_dir)["unknown_task"]
    result = subprocess.run([sys.executable, str(SCRIPT), *argv, "--output_dir", str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and message in result.stderr.strip().splitlines()[-1]


def test_one_process_started_for_several_asked_is_warned_about(tmp_path, monkeypatch, capsys):
    script = _load_script()
    _, args = script.parse_args(["--output_dir", str(tmp_path), "--use_cpu", "true"])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert script.warn_if_fewer_processes(args) is False and capsys.readouterr().err == ""
    # what `accelerate launch --num_processes 2 --cpu` (no --multi_gpu) sets for its single process
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert script.warn_if_fewer_processes(args) is True
    assert "accelerate launch --multi_gpu --num_processes N" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")  # a real 2-process launch
    assert script.warn_if_fewer_processes(args) is False


# ----------------------------------------------------------------------------- an existing output folder
def _tree_digest(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _tiny_argv(out: Path, clip_dir: Path, data_dir: Path, *extra: str) -> list[str]:
    return ["--task", "TinyColors", "--model_name_or_path", str(clip_dir), "--data_dir", str(data_dir),
            "--output_dir", str(out), "--per_device_train_batch_size", "8", "--learning_rate", "1e-3",
            "--warmup_steps", "0", "--use_cpu", "true", "--disable_tqdm", "true", *extra]  # fmt: skip


@pytest.mark.slow
def test_a_finished_run_is_refused_and_left_untouched(single_run, tiny_clip_dir, tiny_task_data_dir, capsys):
    before = _tree_digest(single_run)
    code = _load_script().main(_tiny_argv(single_run, tiny_clip_dir, tiny_task_data_dir, "--max_steps", "2"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert "holds a finished run" in err[0] and "--overwrite_output_dir" in err[0]
    assert _tree_digest(single_run) == before


@pytest.mark.slow
def test_overwrite_output_dir_replaces_a_finished_run_once_the_new_one_has_finished(
    single_run, tmp_path, tiny_clip_dir, tiny_task_data_dir, capsys
):
    out = tmp_path / "run"
    shutil.copytree(single_run, out)
    argv = _tiny_argv(out, tiny_clip_dir, tiny_task_data_dir, "--max_steps", "2", "--overwrite_output_dir", "true")
    assert _load_script().main(argv) == 0
    assert json.loads((out / "results.json").read_text())["global_step"] == 2  # the old run did 8
    assert "replaced the run" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging folder left behind


@pytest.mark.slow
def test_an_unfinished_run_with_checkpoints_is_resumed_not_replaced(
    tmp_path, tiny_clip_dir, tiny_task_data_dir, capsys
):
    out = tmp_path / "run"
    argv = _tiny_argv(out, tiny_clip_dir, tiny_task_data_dir, "--max_steps", "4", "--save_strategy", "steps",
                      "--save_steps", "2")  # fmt: skip
    assert _load_script().main(argv) == 0
    # what a run killed after step 2 leaves: the step-2 checkpoint, no later one and no results
    shutil.rmtree(out / "checkpoint-4")
    (out / "results.json").unlink()
    capsys.readouterr()
    assert _load_script().main(argv) == 0
    err = capsys.readouterr().err
    assert f"resuming the unfinished run in {out} from {out / 'checkpoint-2'}" in err
    assert json.loads((out / "results.json").read_text())["global_step"] == 4


def test_fractional_step_settings_match_what_a_checkpoint_records(tmp_path):
    """Resuming compares args with trainer_state.json: a fraction (0.05) against its count warned every time."""
    from transformers import TrainerState

    script = _load_script()
    _, args = script.parse_args(["--output_dir", str(tmp_path), "--max_steps", "40", "--save_steps", "0.5"])
    restore = script.absolute_steps(args)
    state = TrainerState()
    state.compute_steps(args, 40)
    assert (args.logging_steps, args.save_steps) == (2, 20)
    assert (state.logging_steps, state.save_steps) == (args.logging_steps, args.save_steps)
    restore()  # the caller's arguments come back as given: reproduce_saft.py compares them between stages
    assert (args.logging_steps, args.save_steps) == (0.05, 0.5)
