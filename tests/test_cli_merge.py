"""``saft-merge`` end to end on a tiny CLIP: exact task arithmetic, λ search + report, errors, Hub round trip."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from saft_hf.cli.merge import main
from saft_hf.clip import ZeroShotHead, load_vision_tower
from saft_hf.task_vectors import WEIGHTS_NAME, TaskVector
from tests.fixtures_clip import TINY_TASKS

FINETUNED_ACCURACY = {"TinyColors": 0.9, "TinyPatterns": 0.8}  # test accuracy: normalises the --eval report
FINETUNED_VALIDATION_ACCURACY = {"TinyColors": 0.5, "TinyPatterns": 0.25}  # normalises the --select score


def _make_vector(
    base_dir: Path, task: str, seed: int, target: Path, base_id: str | None = None, validation: bool = True
) -> Path:
    """A task vector of a randomly perturbed tiny vision tower, with a zero-shot head for ``task``."""
    base = load_vision_tower(base_dir)
    generator = torch.Generator().manual_seed(seed)
    tau = {n: 0.05 * torch.randn(p.shape, generator=generator) for n, p in base.named_parameters()}
    head_dir = target.parent / f"{target.name}-head"
    prototypes = torch.randn(len(TINY_TASKS[task]), base.config.projection_dim, generator=generator)
    ZeroShotHead.from_prototypes(prototypes, TINY_TASKS[task], task=task).save_pretrained(head_dir)
    config = {
        "task": task,
        "base_model": base_id or str(base_dir),
        "metrics": {"accuracy": FINETUNED_ACCURACY[task]},
        "finetuning": {"method": "sam"},
    }
    if validation:
        config["metrics"]["validation_accuracy"] = FINETUNED_VALIDATION_ACCURACY[task]
    return TaskVector(tau, config, head_dir=head_dir).save_pretrained(target)


@pytest.fixture(scope="module")
def vector_dirs(tiny_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("vectors")
    return [_make_vector(tiny_clip_dir, task, seed, root / task) for seed, task in enumerate(TINY_TASKS, start=1)]


def _repos(dirs: list[Path]) -> str:
    return ",".join(str(d) for d in dirs)


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def _no_debris(parent: Path) -> list[str]:
    """Leftover temp folders (``.name.*``) beside an output."""
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------- merging
def test_task_arithmetic_writes_base_plus_lambda_sum_exactly(tiny_clip_dir: Path, vector_dirs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    code = main(["--repos", _repos(vector_dirs), "--method", "task_arithmetic", "--scaling", "0.4",
                 "--output", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    merged = _weights(out)
    base = {n: p.detach() for n, p in load_vision_tower(tiny_clip_dir).named_parameters()}
    taus = [TaskVector.from_pretrained(d) for d in vector_dirs]
    assert set(merged) == set(base)
    for name, theta in base.items():
        assert torch.equal(merged[name], theta + (taus[0][name] + taus[1][name]) * 0.4), name
    config = json.loads((out / "merge_config.json").read_text())
    assert config["method"] == "task_arithmetic" and config["scaling"] == 0.4
    # local inputs are named by folder name and content hash, never by their path on this machine
    assert [r["repo"] for r in config["repos"]] == [d.name for d in vector_dirs]
    assert all(len(r["sha256"]) == 64 for r in config["repos"])
    assert config["base_model"]["id"] == tiny_clip_dir.name and config["base_model"]["weights_file"] == "model.safetensors"
    published = "".join(p.read_text() for p in out.rglob("*") if p.suffix in (".json", ".md"))
    assert str(tmp_path.parent) not in published and str(tiny_clip_dir) not in published
    assert sorted(os.listdir(out / "heads")) == sorted(TINY_TASKS) and (out / "preprocessor_config.json").is_file()
    assert ZeroShotHead.from_pretrained(out / "heads" / "TinyPatterns").classnames == TINY_TASKS["TinyPatterns"]


def test_ties_method_args_are_recorded_and_card_has_merge_metadata(vector_dirs: list[Path], tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    out = tmp_path / "ties"
    code = main(["--repos", _repos(vector_dirs), "--method", "ties", "--method-arg", "density=0.5",
                 "--scaling", "0.7", "--output", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    config = json.loads((out / "merge_config.json").read_text())
    assert config["method_args"] == {"density": 0.5, "scaling": 0.7}
    card = ModelCard.load(out / "README.md")
    assert {"saft", "model-merging", "merge"} <= set(card.data.tags)
    assert card.data.merged_repos == [d.name for d in vector_dirs]


def test_search_and_eval_pick_a_grid_lambda_and_write_the_report(
    vector_dirs: list[Path], tiny_task_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "searched"
    grid = [0.1, 0.3, 0.5]
    code = main(["--repos", _repos(vector_dirs), "--method", "task_arithmetic", "--search", "--grid", "0.1,0.3,0.5",
                 "--select", "normalized", "--eval", "--data-dir", str(tiny_task_data_dir),
                 "--max-eval-samples", "8", "--batch-size", "4", "--output", str(out), "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    search = results["search"]
    assert search["best_scaling"] in grid and [row["scaling"] for row in search["table"]] == grid
    assert search["best_score"] == max(row["score"] for row in search["table"])
    tasks = {row["task"]: row for row in results["evaluation"]["tasks"]}
    assert set(tasks) == set(TINY_TASKS)
    for task, row in tasks.items():
        assert 0 <= row["merged"] <= 1 and row["individual"] == FINETUNED_ACCURACY[task]
        assert math.isclose(row["normalized"], row["merged"] / row["individual"])
    assert json.loads((out / "merge_config.json").read_text())["scaling"] == search["best_scaling"]
    printed = capsys.readouterr().out
    assert "TinyColors" in printed and f"chosen λ = {search['best_scaling']}" in printed


def test_normalized_selection_divides_by_recorded_validation_accuracy_never_test(
    vector_dirs: list[Path], tiny_task_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "normalized"
    code = main(["--repos", _repos(vector_dirs), "--method", "task_arithmetic", "--search", "--grid", "0.1,0.5",
                 "--select", "normalized", "--data-dir", str(tiny_task_data_dir), "--max-eval-samples", "8",
                 "--output", str(out), "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    search = json.loads((out / "results.json").read_text())["search"]
    assert search["normalized"] is True
    for row in search["table"]:
        by_validation = sum(row["accuracies"][t] / FINETUNED_VALIDATION_ACCURACY[t] for t in TINY_TASKS) / 2
        assert math.isclose(row["score"], by_validation)
    assert json.loads((out / "merge_config.json").read_text())["search"]["selection"] == "normalized"
    assert "note: --select" not in capsys.readouterr().out


def test_normalized_selection_measures_a_missing_fine_tuned_validation_accuracy_and_says_so(
    tiny_clip_dir: Path, tiny_task_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoImageProcessor

    from saft_hf.clip import CLIPImageClassifier, evaluate_accuracy
    from saft_hf.tasks import load_task

    dirs = [_make_vector(tiny_clip_dir, task, seed, tmp_path / task, validation=(task == "TinyColors"))
            for seed, task in enumerate(TINY_TASKS, start=1)]  # fmt: skip
    out = tmp_path / "measured"
    code = main(["--repos", _repos(dirs), "--method", "task_arithmetic", "--search", "--grid", "0.1,0.5",
                 "--select", "normalized", "--data-dir", str(tiny_task_data_dir), "--max-eval-samples", "8",
                 "--output", str(out), "--no-progress"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "note: --select normalized: 1 task vector(s) record no fine-tuned validation accuracy" in captured.out
    # what it must have measured: θ₀ + τ(TinyPatterns) on TinyPatterns' first 8 validation images
    tower = TaskVector.from_pretrained(dirs[1]).apply_to(load_vision_tower(tiny_clip_dir))
    data = load_task("TinyPatterns", tiny_task_data_dir, AutoImageProcessor.from_pretrained(tiny_clip_dir))
    head = ZeroShotHead.from_pretrained(dirs[1])
    validation = data["validation"].select(range(min(8, len(data["validation"]))))
    measured = evaluate_accuracy(CLIPImageClassifier(tower, head), validation, batch_size=8)
    assert f"TinyPatterns {measured:.4f}" in captured.out
    search = json.loads((out / "results.json").read_text())["search"]
    assert search["normalized"] is True
    reference = {"TinyColors": FINETUNED_VALIDATION_ACCURACY["TinyColors"], "TinyPatterns": measured}
    for row in search["table"]:
        expected = sum(row["accuracies"][t] / reference[t] for t in TINY_TASKS) / 2
        assert math.isclose(row["score"], expected)


def test_base_is_inferred_from_the_vectors_and_must_agree(
    tiny_clip_dir: Path, vector_dirs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = _make_vector(tiny_clip_dir, "TinyColors", 7, tmp_path / "other", base_id="openai/clip-vit-base-patch32")
    out = tmp_path / "out"
    assert main(["--repos", f"{vector_dirs[1]},{other}", "--output", str(out), "--no-progress"]) == 1
    assert "different base models" in capsys.readouterr().err and not out.exists()
    code = main(["--repos", f"{vector_dirs[1]},{other}", "--base", str(tiny_clip_dir), "--output", str(out)])
    assert code == 1 and "openai/clip-vit-base-patch32" in capsys.readouterr().err and not out.exists()


# ----------------------------------------------------------------------------- bad input
def _nan_vector(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    tensors = load_file(str(target / WEIGHTS_NAME))
    name = sorted(tensors)[0]
    tensors[name][0] = float("nan")
    save_file(tensors, str(target / WEIGHTS_NAME))
    return target


def _corrupt_vector(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    weights = target / WEIGHTS_NAME
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    return target


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("one_repo", 2, "at least two task vectors"),
        ("duplicate", 2, "given twice"),
        ("missing_repo", 1, "neither an existing local directory"),
        ("unknown_method", 2, "unknown merge method 'magic'"),
        ("unknown_param", 2, "has no parameter 'rho'"),
        ("bad_param_type", 2, "expects float"),
        ("zero_lambda", 2, "must be a finite number > 0"),
        ("negative_grid", 2, "--grid values must be finite"),
        ("scaling_and_search", 2, "both set λ"),
        ("search_without_data", 2, "needs task data"),
        ("eval_without_data", 2, "needs task data"),
        ("nan_vector", 1, "NaN or inf"),
        ("corrupted", 1, "truncated or corrupted"),
        ("shape_mismatch", 1, "shape"),
    ],
)
def test_bad_input_gives_clear_error_and_no_output(
    case: str, code: int, message: str, tiny_clip_dir: Path, vector_dirs: list[Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    a, b = (str(d) for d in vector_dirs)
    out = tmp_path / "out"
    args = {
        "one_repo": ["--repos", a],
        "duplicate": ["--repos", f"{a},{b},{a}"],
        "missing_repo": ["--repos", f"{a},{tmp_path / 'nope'}"],
        "unknown_method": ["--repos", f"{a},{b}", "--method", "magic"],
        "unknown_param": ["--repos", f"{a},{b}", "--method", "ties", "--method-arg", "rho=1"],
        "bad_param_type": ["--repos", f"{a},{b}", "--method", "ties", "--method-arg", "density=lots"],
        "zero_lambda": ["--repos", f"{a},{b}", "--scaling", "0"],
        "negative_grid": ["--repos", f"{a},{b}", "--search", "--grid=-0.1,0.2", "--data-dir", str(tmp_path)],
        "scaling_and_search": ["--repos", f"{a},{b}", "--scaling", "0.3", "--search"],
        "search_without_data": ["--repos", f"{a},{b}", "--search"],
        "eval_without_data": ["--repos", f"{a},{b}", "--eval"],
        "nan_vector": ["--repos", f"{a},{_nan_vector(vector_dirs[1], tmp_path / 'nan')}"],
        "corrupted": ["--repos", f"{a},{_corrupt_vector(vector_dirs[1], tmp_path / 'bad')}"] if case == "corrupted" else [],
        "shape_mismatch": ["--repos", f"{a},{b}"],
    }[case]
    if case == "shape_mismatch":
        tensors = load_file(str(vector_dirs[1] / WEIGHTS_NAME))
        name = sorted(tensors)[0]
        tensors[name] = torch.zeros(3, 3)
        bad = tmp_path / "shape"
        shutil.copytree(vector_dirs[1], bad)
        (bad / "task_vector_config.json").write_text(
            json.dumps({k: v for k, v in json.loads((bad / "task_vector_config.json").read_text()).items()
                        if k != "fingerprint"})
        )  # fmt: skip
        save_file(tensors, str(bad / WEIGHTS_NAME))
        args = ["--repos", f"{a},{bad}"]
    assert main([*args, "--output", str(out), "--no-progress"]) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists() and _no_debris(tmp_path) == []


def test_existing_output_is_refused_and_kept_when_a_replacement_fails(
    vector_dirs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "merged"
    assert main(["--repos", _repos(vector_dirs), "--output", str(out), "--no-progress"]) == 0
    before = _weights(out)
    assert main(["--repos", _repos(vector_dirs), "--output", str(out), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    nan = _nan_vector(vector_dirs[1], tmp_path / "nan")
    code = main(["--repos", f"{vector_dirs[0]},{nan}", "--output", str(out), "--overwrite", "--no-progress"])
    assert code == 1
    after = _weights(out)
    assert all(torch.equal(before[n], after[n]) for n in before) and _no_debris(tmp_path) == []


def test_debug_shows_the_traceback(vector_dirs: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="given twice"):
        main(["--repos", f"{vector_dirs[0]},{vector_dirs[0]}", "--output", str(tmp_path / "o"), "--debug"])


# ----------------------------------------------------------------------------- Hub
def test_hub_ids_merge_like_local_dirs_and_push_uploads_the_folder(
    hub_env, vector_dirs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from huggingface_hub import snapshot_download

    for directory, repo in zip(vector_dirs, ("user/a", "user/b")):
        TaskVector.from_pretrained(directory).push_to_hub(repo, token=hub_env.token)
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert main(["--repos", _repos(vector_dirs), "--output", str(local), "--no-progress"]) == 0
    code = main(["--repos", "user/a,user/b", "--output", str(remote), "--push-to-hub", "user/merged", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert hub_env.token not in captured.out + captured.err
    local_w, remote_w = _weights(local), _weights(remote)
    assert all(torch.equal(local_w[n], remote_w[n]) for n in local_w)
    config = json.loads((remote / "merge_config.json").read_text())
    assert [r["repo"] for r in config["repos"]] == ["user/a", "user/b"]
    assert all(len(r["resolved_revision"]) == 40 for r in config["repos"])
    pulled = Path(snapshot_download("user/merged"))
    written = sorted(str(p.relative_to(remote)) for p in remote.rglob("*") if p.is_file())
    uploaded = sorted(str(p.relative_to(pulled)) for p in pulled.rglob("*") if p.is_file())
    assert [f for f in uploaded if f != ".gitattributes"] == written  # the Hub adds .gitattributes
    assert all((pulled / f).read_bytes() == (remote / f).read_bytes() for f in written)


def test_help_works_as_an_installed_console_script() -> None:
    script = Path(sys.executable).with_name("saft-merge")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for text in ("--repos", "--revisions", "--search", "--select", "--method-arg", "--no-progress", "--list-methods"):
        assert text in result.stdout


def test_list_methods_prints_every_registered_method_with_paper_and_parameters() -> None:
    from saft_hf.cli.merge import EPILOG
    from saft_hf.merging import METHODS

    script = Path(sys.executable).with_name("saft-merge")
    result = subprocess.run([str(script), "--list-methods"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for text in ("ties:", "density=0.2", "Yadav et al. 2023", "pcb:"):
        assert text in result.stdout
    for name in METHODS:  # the --help epilog names them all without importing the registry
        assert f"\n{'  '}{name}: " in result.stdout and name in EPILOG


@pytest.mark.parametrize("argv", [["--help"], ["--repos", "a"], ["--repos", "a,b", "--output", "o", "--grid", "1:0:1"]])
def test_help_and_usage_errors_do_not_import_torch(argv: list[str]) -> None:
    code = (
        "import sys\nfrom saft_hf.cli.merge import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print('torch imported' if 'torch' in sys.modules else 'torch not imported')"
    )
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().splitlines()[-1] == "torch not imported", result.stderr


# ----------------------------------------------------------------------------- grids, output path, Ctrl-C
@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ("0.05:1.0:20", "for 20 values from 0.05 to 1 write 0.05:1:0.05"),  # start:stop:num is not our syntax
        ("0.3", "a search needs at least two"),
        ("0.3,0.3", "a search needs at least two"),
        ("0.5:0.5:0.1", "a search needs at least two"),
    ],
)
def test_search_grid_with_fewer_than_two_values_is_a_usage_error(
    grid: str, message: str, vector_dirs: list[Path], tiny_task_data_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    out = tmp_path / "out"
    code = main(["--repos", _repos(vector_dirs), "--method", "task_arithmetic", "--search", "--grid", grid,
                 "--data-dir", str(tiny_task_data_dir), "--max-eval-samples", "4", "--output", str(out),
                 "--no-progress"])  # fmt: skip
    assert code == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_unwritable_output_parent_is_named_in_the_error(vector_dirs: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--repos", _repos(vector_dirs), "--output", "/sys/saft-merged", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "parent folder '/sys' is not writable" in err and "Traceback" not in err


_INTERRUPTIBLE = """
import signal, sys, time
from pathlib import Path
signal.signal(signal.SIGINT, signal.default_int_handler)  # a shell's background job starts with SIGINT ignored
import saft_hf.pipeline.run as run
from saft_hf.cli.merge import main

def copy_heads_then_wait(*args, **kwargs):  # called inside the temporary output folder
    Path(sys.argv[1]).write_text("ready")
    time.sleep(600)

run.copy_heads = copy_heads_then_wait
sys.exit(main(sys.argv[2:]))
"""


def test_ctrl_c_prints_one_line_exits_130_and_leaves_nothing(vector_dirs: list[Path], tmp_path: Path) -> None:
    import signal
    import time

    ready, out = tmp_path / "ready", tmp_path / "merged"
    process = subprocess.Popen(
        [sys.executable, "-c", _INTERRUPTIBLE, str(ready), "--repos", _repos(vector_dirs), "--output", str(out),
         "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 900  # generous: on a loaded 2-core machine importing torch alone can take a minute
    while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if not ready.exists():
        process.kill()
        pytest.fail(f"the merge never started writing:\n{process.communicate()[1][-3000:]}")
    assert any(p.name.startswith(".merged.") for p in tmp_path.iterdir())  # the temporary output exists now
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 130
    assert stderr.strip().splitlines() == [f"saft-merge: interrupted (Ctrl-C); {str(out)!r} was not written or changed."]
    assert not out.exists() and _no_debris(tmp_path) == []


def test_a_lora_vector_merges_with_a_full_one_its_untouched_parameters_being_zero(
    tiny_clip_dir: Path, vector_dirs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from peft import LoraConfig, get_peft_model

    tower = load_vision_tower(tiny_clip_dir)
    torch.manual_seed(5)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(tower, config).save_pretrained(tmp_path / "lora")
    out = tmp_path / "mixed"
    code = main(["--repos", f"{tmp_path / 'lora'},{vector_dirs[0]}", "--base", str(tiny_clip_dir),
                 "--method", "task_arithmetic", "--scaling", "0.5", "--output", str(out), "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    lora = TaskVector.from_pretrained(tmp_path / "lora")
    full = TaskVector.from_pretrained(vector_dirs[0])
    assert 0 < len(lora) < len(full)  # the LoRA vector changes only q/v projections
    merged = _weights(out)
    base = {n: p.detach() for n, p in load_vision_tower(tiny_clip_dir).named_parameters()}
    for name, theta in base.items():
        lora_tau = lora[f"{name}"] if name in lora else torch.zeros_like(theta)
        torch.testing.assert_close(merged[name], theta + 0.5 * (lora_tau + full[name]), rtol=0, atol=1e-6)
