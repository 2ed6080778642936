"""examples/reproduce_saft.py and saft_hf.reproduce: resumable stages, exact checkpoint resume, the final table."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from saft_hf.reproduce import (
    StageMismatchError,
    StageProgress,
    format_table,
    latest_valid_checkpoint,
    read_marker,
    summarize,
    write_marker,
)
from tests.examples import load_example
from tests.launching import Launch, launcher

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "reproduce_saft.py"
KILL_RUNNER = Path(__file__).with_name("reproduce_kill_run.py")
TASKS = ["TinyColors", "TinyPatterns"]
METHODS = ["task_arithmetic", "weight_average"]


def load_reproduce_script():
    """The example script as a module."""
    return load_example("reproduce_saft")


# --------------------------------------------------------------------------- markers and checkpoints
def test_a_truncated_output_is_detected_not_trusted(tmp_path):
    (tmp_path / "task_vector").mkdir()
    weights = tmp_path / "task_vector" / "task_vector.safetensors"
    save_file({"w": torch.arange(100.0)}, weights)
    (tmp_path / "results.json").write_text("{}")
    write_marker(tmp_path, ["results.json", "task_vector"], {"lr": 1e-5}, {})
    assert read_marker(tmp_path, {"lr": 1e-5})[0] is not None
    weights.write_bytes(weights.read_bytes()[:-40])  # half written
    marker, why = read_marker(tmp_path, {"lr": 1e-5})
    assert marker is None and "task_vector/task_vector.safetensors" in why and "corrupted" in why


def test_a_stage_without_marker_is_unfinished(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    marker, why = read_marker(tmp_path, {})
    assert marker is None and "interrupted" in why


def test_a_stage_finished_with_other_settings_is_an_error_for_fine_tunes_and_redone_for_merges(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    write_marker(tmp_path, ["results.json"], {"max_steps": 8000}, {})
    with pytest.raises(StageMismatchError, match="max_steps: 8000 now 100.*new --output_dir"):
        read_marker(tmp_path, {"max_steps": 100})
    marker, why = read_marker(tmp_path, {"max_steps": 100}, strict=False)
    assert marker is None and "max_steps" in why


def _fake_checkpoint(root: Path, step: int) -> Path:
    checkpoint = root / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (checkpoint / name).write_bytes(b"x")
    save_file({"w": torch.ones(64)}, checkpoint / "model.safetensors")
    return checkpoint


def test_a_broken_newest_checkpoint_is_removed_and_the_previous_one_resumed(tmp_path):
    good = _fake_checkpoint(tmp_path, 2)
    broken = _fake_checkpoint(tmp_path, 4)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    no_state = _fake_checkpoint(tmp_path, 6)
    (no_state / "trainer_state.json").unlink()  # killed before the Trainer wrote its state
    checkpoint, removed = latest_valid_checkpoint(tmp_path)
    assert checkpoint == good
    assert not broken.exists() and not no_state.exists()
    assert removed[0].startswith("checkpoint-6 (trainer_state.json") and removed[1].startswith("checkpoint-4 (model")


def test_a_checkpoint_from_another_process_count_is_still_resumed(tmp_path):
    checkpoint = _fake_checkpoint(tmp_path, 2)  # written by one process: rng_state.pth
    assert latest_valid_checkpoint(tmp_path) == (checkpoint, [])
    (checkpoint / "rng_state.pth").unlink()
    assert latest_valid_checkpoint(tmp_path)[1] == ["checkpoint-2 (no RNG state (rng_state*.pth))"]


# --------------------------------------------------------------------------- progress and report
def test_progress_lines_give_elapsed_and_remaining_time():
    ticks = iter([0.0, 0.0, 10.0, 10.0, 10.0, 10.0, 30.0, 30.0, 32.0])
    lines: list[str] = []
    progress = StageProgress({"fine-tune": 3, "merge": 1}, printer=lines.append, clock=lambda: next(ticks))
    progress.start()
    progress.finish("fine-tune", "A/saft", "trained")
    progress.start()
    progress.finish("fine-tune", "B/saft", "skipped", worked=False)
    progress.start()
    progress.finish("fine-tune", "C/saft", "trained")
    progress.start()
    progress.finish("merge", "ties/saft", "merged")
    assert lines[0] == "[1/4] fine-tune A/saft: trained in 10.0s (elapsed 10.0s, about 20.0s left + merge stages not timed yet)"
    assert lines[1] == "[2/4] fine-tune B/saft: skipped (elapsed 10.0s, about 10.0s left + merge stages not timed yet)"
    assert lines[2].endswith("in 20.0s (elapsed 30.0s, merge stages not timed yet)")
    assert lines[3] == "[4/4] merge ties/saft: merged in 2.0s (elapsed 32.0s, done)"


def _merge_result(accuracies: dict[str, float], individual: dict[str, float], scaling: float | None) -> dict:
    rows = [{"task": t, "merged": a, "individual": individual[t], "normalized": a / individual[t]} for t, a in accuracies.items()]
    mean = sum(accuracies.values()) / len(accuracies)
    return {"scaling": scaling, "evaluation": {"tasks": rows, "mean_accuracy": mean,
                                               "mean_normalized": sum(r["normalized"] for r in rows) / len(rows)}}  # fmt: skip


def test_table_rows_are_methods_by_variant_with_individual_and_gain():
    finetune = {"standard": {"A": {"test_accuracy": 0.8}, "B": {"test_accuracy": 0.5}},
                "saft": {"A": {"test_accuracy": 0.8}, "B": {"test_accuracy": 0.4}}}  # fmt: skip
    merges = {
        "standard": {"ties": _merge_result({"A": 0.6, "B": 0.25}, {"A": 0.8, "B": 0.5}, 0.3)},
        "saft": {"ties": _merge_result({"A": 0.7, "B": 0.3}, {"A": 0.8, "B": 0.4}, 0.4)},
    }
    summary = summarize(["A", "B"], ["standard", "saft"], ["ties"], finetune, merges)
    table = format_table(summary)
    assert "| Individual | SAFT | 80.00 | 40.00 | 60.00 |" in table
    assert "| ties | standard | 60.00 | 25.00 | 42.50 |" in table
    assert "| ties | SAFT | 87.50 | 75.00 | 81.25 |" in table  # normalised: 0.7/0.8, 0.3/0.4
    assert "| ties | 7.50 | 18.75 |" in table  # SAFT − standard: 50.00 − 42.50, 81.25 − 62.50
    assert "ties standard: 0.3; ties SAFT: 0.4" in table


# --------------------------------------------------------------------------- exact resume of a SAM fine-tune
class _CountSteps(TrainerCallback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


class _Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 5:
            raise KeyboardInterrupt("simulated pre-emption at step 5")


def _train(script, out: Path, clip_dir: Path, data_dir: Path, callbacks=None, resume: str | None = None) -> dict:
    parser = script.build_parser()
    _, training_args = parser.parse_args_into_dataclasses(
        args=["--output_dir", str(out), "--max_steps", "8", "--save_steps", "3", "--per_device_train_batch_size", "16",
              "--learning_rate", "1e-3", "--warmup_steps", "2", "--logging_steps", "1", "--use_cpu", "--disable_tqdm", "true",
              "--sam_eta", "0.01", "--sam_exclude", "bias"]  # fmt: skip
    )
    assert (training_args.sam_rho, training_args.sam_adaptive) == (0.5, True)  # the paper's ASAM
    training_args.resume_from_checkpoint = resume
    script_args = script.train_saft.ScriptArguments(task="TinyColors", model_name_or_path=str(clip_dir), data_dir=str(data_dir))
    return script.train_saft.train_task("TinyColors", script_args, training_args, callbacks=callbacks)


@pytest.mark.slow
def test_an_interrupted_asam_fine_tune_resumed_from_its_checkpoint_ends_bitwise_equal(tmp_path, tiny_clip_dir, tiny_task_data_dir):
    script = load_reproduce_script()
    whole = _train(script, tmp_path / "whole", tiny_clip_dir, tiny_task_data_dir)
    with pytest.raises(KeyboardInterrupt):
        _train(script, tmp_path / "cut", tiny_clip_dir, tiny_task_data_dir, callbacks=[_Interrupt()])
    assert sorted(p.name for p in (tmp_path / "cut").glob("checkpoint-*")) == ["checkpoint-3"]
    counter = _CountSteps()
    checkpoint = str(tmp_path / "cut" / "checkpoint-3")
    resumed = _train(script, tmp_path / "cut", tiny_clip_dir, tiny_task_data_dir, callbacks=[counter], resume=checkpoint)
    assert counter.steps == [4, 5, 6, 7, 8]  # it did resume, rather than start over
    assert resumed["global_step"] == whole["global_step"] == 8 and resumed["method"] == "ASAM"
    expected = load_file(tmp_path / "whole" / "vision_model" / "model.safetensors")
    actual = load_file(tmp_path / "cut" / "vision_model" / "model.safetensors")
    assert expected.keys() == actual.keys()
    differing = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not differing, f"resumed weights differ from the uninterrupted run's in {differing[:5]}"
    assert resumed["loss_history"] == whole["loss_history"]  # steps 4-8 recomputed identically


# --------------------------------------------------------------------------- end to end under accelerate launch
def _arguments(tmp: Path, out: Path, processes: int) -> list[str]:
    """reproduce_saft.py's arguments for the tiny tasks: 4 steps, a checkpoint every 2, a total batch of 16."""
    return [
        "--model_name_or_path", str(tmp / "tiny" / "clip"), "--data_dir", str(tmp / "tiny" / "data"),
        "--output_dir", str(out), "--tasks", *TASKS, "--methods", *METHODS, "--grid", "0.5", "1.0",
        "--max_steps", "4", "--save_steps", "2", "--per_device_train_batch_size", str(16 // processes),
        "--learning_rate", "1e-3", "--warmup_steps", "0", "--use_cpu", "--disable_tqdm", "true",
        "--merge_batch_size", "16",
    ]  # fmt: skip


def _launch(tmp: Path, out: Path, processes: int, log_name: str, runner: list[str] | None = None) -> Launch:
    """Start one reproduce_saft.py invocation (tests/launching.py); its output goes to tmp/<log_name>."""
    command = [*launcher(processes), *(runner or [str(SCRIPT)]), *_arguments(tmp, out, processes)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp / "hf_home"), "PYTHONPATH": str(REPO)}
    return Launch(command, env, tmp / log_name)


def _wait(tmp: Path, launch: Launch, log_name: str, expect_ok: bool = True) -> str:
    returncode = launch.wait()
    log = launch.output()
    if expect_ok:
        assert returncode == 0, f"{log_name} failed:\n{log[-6000:]}"
    return log


def _run_in_process(tmp: Path, out: Path) -> str:
    """A re-run in this process (one process, no launcher start-up); returns what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert load_reproduce_script().main(_arguments(tmp, out, 1)) == 0
    return printed.getvalue()


def _runs_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "reproduce_runs.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, tiny_clip_dir, tiny_task_data_dir):
    """Full runs on 1 and 2 processes and a run killed in its second fine-tune (side by side), then re-runs.

    The re-runs go in-process: the launcher's start-up is what costs most here, and the 2-process run's
    outputs (total batch 16) are those a 1-process invocation with batch 16 must find finished.
    """
    tmp = tmp_path_factory.mktemp("reproduce")
    (tmp / "tiny").mkdir()
    os.symlink(tiny_clip_dir, tmp / "tiny" / "clip")
    os.symlink(tiny_task_data_dir, tmp / "tiny" / "data")
    one, two, killed = tmp / "one", tmp / "two", tmp / "killed"
    kill = [str(KILL_RUNNER), "2", "2"]  # SIGKILL after checkpoint-2 of the second fine-tune
    first = {"one": _launch(tmp, one, 1, "one.log"), "two": _launch(tmp, two, 2, "two.log"),
             "killed": _launch(tmp, killed, 1, "killed.log", runner=kill)}  # fmt: skip
    logs = {name: _wait(tmp, p, f"{name}.log", expect_ok=name != "killed") for name, p in first.items()}
    assert first["killed"].process.returncode != 0, f"the killed run finished:\n{logs['killed'][-3000:]}"
    stage2 = killed / "finetune" / "standard" / "TinyPatterns"
    state = {
        "stage1_marker": (killed / "finetune" / "standard" / "TinyColors" / "reproduce_stage.json").is_file(),
        "stage2_checkpoints": sorted(p.name for p in stage2.glob("checkpoint-*")),
        "stage2_results": (stage2 / "results.json").exists(),
    }
    # Before re-running: a half-written task vector in the finished stage, and a half-written newer checkpoint.
    weights = killed / "finetune" / "standard" / "TinyColors" / "task_vector" / "task_vector.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (stage2 / "checkpoint-3").mkdir()
    (stage2 / "checkpoint-3" / "model.safetensors").write_bytes(b"\0" * 10)
    logs["killed_again"] = _run_in_process(tmp, killed)
    two_table = (two / "results.md").read_text()
    logs["two_again"] = _run_in_process(tmp, two)
    return {"one": one, "two": two, "killed": killed, "logs": logs, "killed_state": state, "two_table": two_table}


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def _table_rows(table: str, section: str) -> dict[tuple[str, str], list[str]]:
    body = table.split(f"## {section}")[1].split("##")[0]
    rows = [line.strip("| ").split(" | ") for line in body.splitlines() if line.startswith("| ") and "---" not in line]
    return {(r[0], r[1]): r[2:] for r in rows[1:]}


def _assert_report_matches_run_results(out: Path) -> None:
    table = (out / "results.md").read_text()
    absolute, normalised = _table_rows(table, "Absolute accuracy"), _table_rows(table, "Normalised accuracy")
    gains = {}
    for variant, label in (("standard", "standard"), ("saft", "SAFT")):
        individual = [json.loads((out / "finetune" / variant / t / "results.json").read_text())["test_accuracy"] for t in TASKS]
        assert absolute[("Individual", label)][:2] == [_pct(a) for a in individual]
        for method in METHODS:
            evaluation = json.loads((out / "merges" / variant / method / "results.json").read_text())["evaluation"]
            by_task = {row["task"]: row for row in evaluation["tasks"]}
            assert absolute[(method, label)] == [*(_pct(by_task[t]["merged"]) for t in TASKS), _pct(evaluation["mean_accuracy"])]
            assert normalised[(method, label)][-1] == _pct(evaluation["mean_normalized"])
            gains.setdefault(method, {})[variant] = evaluation["mean_accuracy"]
    chart = Image.open(out / "saft_minus_standard.png")
    assert chart.size[0] > 300 and chart.size[1] > 200
    plotted = json.loads(chart.text["saft_minus_standard"])
    for method in METHODS:
        assert plotted[method]["absolute"] == pytest.approx(gains[method]["saft"] - gains[method]["standard"], abs=1e-12)
    summary = json.loads((out / "results.json").read_text())
    assert summary["saft_minus_standard"] == plotted and summary["tasks"] == TASKS


@pytest.mark.slow
def test_one_process_run_writes_table_and_chart_that_agree_with_each_runs_results(e2e):
    _assert_report_matches_run_results(e2e["one"])
    runs = _runs_log(e2e["one"])
    assert len(runs[0]["trained"]) == 4 and len(runs[0]["merged"]) == 4 and runs[0]["world_size"] == 1
    assert re.search(r"\[2/8\] fine-tune TinyPatterns/standard: trained .* in .*s \(elapsed .*s, about .* left", e2e["logs"]["one"])


@pytest.mark.slow
def test_two_process_run_writes_table_and_chart_that_agree_with_each_runs_results(e2e):
    _assert_report_matches_run_results(e2e["two"])
    assert _runs_log(e2e["two"])[0]["world_size"] == 2
    assert json.loads((e2e["two"] / "finetune" / "saft" / "TinyColors" / "results.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_a_second_invocation_trains_and_merges_nothing_and_keeps_the_table(e2e):
    first, second = _runs_log(e2e["two"])
    assert second["trained"] == [] and second["merged"] == [] and second["world_size"] == 1
    assert len(second["skipped"]) == 4 and len(second["reused"]) == 4
    assert "trained 0 (0 resumed), skipped 4 fine-tunes; ran 0, reused 4 merges" in e2e["logs"]["two_again"]
    assert (e2e["two"] / "results.md").read_text() == e2e["two_table"]


@pytest.mark.slow
def test_a_run_killed_in_its_second_fine_tune_resumes_and_ends_with_the_same_table(e2e):
    assert e2e["killed_state"] == {"stage1_marker": True, "stage2_checkpoints": ["checkpoint-2"], "stage2_results": False}
    rerun = _runs_log(e2e["killed"])[-1]
    assert rerun["resumed"] == ["TinyPatterns/standard@checkpoint-2"]
    # the finished stage whose task vector was then half overwritten is redone, not trusted
    assert rerun["trained"] == ["TinyColors/standard", "TinyPatterns/standard", "TinyColors/saft", "TinyPatterns/saft"]
    assert "task_vector/task_vector.safetensors differs" in e2e["logs"]["killed_again"]
    assert "removed broken checkpoint-3" in e2e["logs"]["killed_again"]
    assert (e2e["killed"] / "results.md").read_text() == (e2e["one"] / "results.md").read_text()
    _assert_report_matches_run_results(e2e["killed"])


def test_a_finished_fine_tune_with_other_settings_stops_every_process_with_the_reason(
    tmp_path, tiny_task_data_dir, capsys
):
    script = load_reproduce_script()
    argv = ["--output_dir", str(tmp_path), "--data_dir", str(tiny_task_data_dir), "--tasks", *TASKS, "--max_steps", "4"]
    args, training_args = script.build_parser().parse_args_into_dataclasses(args=argv)
    training_args.sam_rho, training_args.sam_adaptive = 0.0, False  # as run_finetunes sets for 'standard'
    stage = tmp_path / "finetune" / "standard" / "TinyColors"
    stage.mkdir(parents=True)
    (stage / "results.json").write_text("{}")
    write_marker(stage, ["results.json"], script.stage_settings(args, training_args, "TinyColors"), {})
    training_args.max_steps = 8000
    plan = script.plan_finetune(stage, script.stage_settings(args, training_args, "TinyColors"))
    assert plan["action"] == "error" and "max_steps" in plan["note"]  # broadcast, so no process waits forever
    assert script.main([*argv[:-1], "8000", "--variants", "standard"]) == 1
    assert re.search(r"reproduce_saft.py: error: fine-tune TinyColors/standard: .*max_steps: 4 now 8000",
                     capsys.readouterr().err)  # fmt: skip
    assert (stage / "results.json").is_file()  # the finished result is kept


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--variants", "sam"], "--variants must be among"),
        (["--methods", "ties", "ties"], "each once"),
        (["--methods", "ties", "tie"], "unknown merge method 'tie'; available methods"),
        (["--tasks", "TinyColors"], "at least two different tasks"),
        (["--tasks", "TinyColors", "Nope"], "unknown task 'Nope'"),
        (["--no_progress"], "--disable_tqdm true"),
    ],
)
def test_bad_inputs_are_one_error_line_before_anything_is_written(extra, message, tmp_path, tiny_task_data_dir, capsys):
    script = load_reproduce_script()
    argv = ["--output_dir", str(tmp_path / "out"), "--data_dir", str(tiny_task_data_dir), "--tasks", *TASKS]
    if "--tasks" in extra:
        argv = argv[:-len(TASKS) - 1]
    assert script.main([*argv, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("reproduce_saft.py: error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_ctrl_c_is_one_line_exit_130_and_the_invocation_is_logged(tmp_path, tiny_clip_dir, tiny_task_data_dir, capsys):
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise KeyboardInterrupt

    script = load_reproduce_script()
    argv = ["--output_dir", str(tmp_path), "--data_dir", str(tiny_task_data_dir), "--tasks", *TASKS,
            "--model_name_or_path", str(tiny_clip_dir), "--max_steps", "4", "--per_device_train_batch_size", "8",
            "--use_cpu", "true", "--disable_tqdm", "true", "--variants", "standard"]  # fmt: skip
    assert script.main(argv, callbacks=[Interrupt()]) == 130
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("reproduce_saft.py")]
    assert err == ["reproduce_saft.py: interrupted (Ctrl-C); finished stages are kept, run the same command to continue."]
    [line] = (tmp_path / "reproduce_runs.jsonl").read_text().splitlines()
    assert json.loads(line)["outcome"] == "interrupted"
