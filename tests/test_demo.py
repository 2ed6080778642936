"""saft-demo: deterministic tasks, the cached base, and the whole pipeline at toy size."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch

from saft_hf.cli.demo import main
from saft_hf.demo import base as demo_base
from saft_hf.demo.base import BaseSpec, ensure_base
from saft_hf.demo.data import TASK_NAMES, TASKS, _digit_pools, build_split, build_task
from saft_hf.demo.report import summarize_seeds
from saft_hf.task_vectors import TaskVector

TINY_BASE = BaseSpec(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, projection_dim=16,
                     pretext_scenes=16, pretrain_steps=2, pretrain_batch_size=8)  # fmt: skip


def _pixels(dataset) -> np.ndarray:
    return np.stack([np.asarray(image) for image in dataset["image"]])


def test_tasks_are_deterministic_for_a_seed():
    first, again = build_split("counts", "train", 10, seed=3), build_split("counts", "train", 10, seed=3)
    other = build_split("counts", "train", 10, seed=4)
    assert np.array_equal(_pixels(first), _pixels(again)) and list(first["label"]) == list(again["label"])
    assert not np.array_equal(_pixels(first), _pixels(other))


def test_splits_of_a_task_differ():
    data = build_task("shapes", seed=0, n_train=6, n_validation=6, n_test=6)
    assert not np.array_equal(_pixels(data["train"]), _pixels(data["test"]))
    assert not np.array_equal(_pixels(data["validation"]), _pixels(data["test"]))


@pytest.mark.parametrize("task", TASK_NAMES)
def test_every_task_is_balanced_rgb_32px_with_its_class_names(task):
    n_classes = len(TASKS[task].classes)
    data = build_split(task, "validation", 2 * n_classes, seed=0)
    assert data.features["label"].names == list(TASKS[task].classes)
    assert np.bincount(list(data["label"]), minlength=n_classes).tolist() == [2] * n_classes
    image = data[0]["image"]
    assert image.mode == "RGB" and image.size == (32, 32)


def test_eight_tasks_of_different_kinds():
    assert len(TASK_NAMES) == 8 and len({TASKS[t].render for t in TASK_NAMES}) == 8


def test_digit_images_are_never_shared_between_splits():
    pools = _digit_pools()
    flat = {split: {images.tobytes() for images in pools[split][0]} for split in pools}
    assert not flat["train"] & flat["test"] and not flat["validation"] & flat["test"]


def test_unknown_task_is_refused_with_the_known_names():
    with pytest.raises(ValueError, match="choose from digits"):
        build_split("mnist", "train", 4)


def test_base_cache_is_reused_on_a_second_call(tmp_path, monkeypatch):
    path, trained = ensure_base(TINY_BASE, tmp_path)
    assert trained and path.name == f"base-{TINY_BASE.cache_key()}"
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "pretext.json"} <= {
        p.name for p in path.iterdir()
    }

    def no_pretraining(*args, **kwargs):
        raise AssertionError("pre-trained again although the base is cached")

    monkeypatch.setattr(demo_base, "pretrain", no_pretraining)
    again, trained_again = ensure_base(TINY_BASE, tmp_path)
    assert again == path and not trained_again


def test_base_cache_key_changes_with_the_spec():
    assert TINY_BASE.cache_key() != BaseSpec(**{**TINY_BASE.__dict__, "seed": 1}).cache_key()


def test_cache_dir_follows_saft_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFT_HF_CACHE", str(tmp_path))
    assert demo_base.default_cache_dir() == tmp_path / "demo"


def test_interrupted_pretraining_leaves_no_cache_entry(tmp_path, monkeypatch):
    def crash(spec, output_dir, progress=True):
        (output_dir / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_base, "pretrain", crash)
    with pytest.raises(KeyboardInterrupt):
        ensure_base(TINY_BASE, tmp_path)
    assert list(tmp_path.iterdir()) == []


def _toy_argv(output, cache):
    return [
        "--output", str(output), "--cache-dir", str(cache), "--no-progress",
        "--tasks", "sizes", "colours", "--steps", "3", "--batch-size", "8",
        "--n-train", "8", "--n-validation", "8", "--n-test", "8",
        "--lambda-grid", "0.5", "1.0", "--ties-densities", "0.2", "--pcb-ratios", "0.1",
        "--analysis-alphas", "0.0", "1.0", "--analysis-samples", "8", "--analysis-pairs", "1",
        "--base-hidden-size", "32", "--base-layers", "1", "--base-pretrain-steps", "2",
        "--base-pretext-scenes", "16", "--threads", "1", "--variants", "standard", "sam", "--adamerging-steps", "4",
        "--seed-start", "2",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """One toy-sized demo run (fresh cache): its output folder, cache and printed text."""
    root = tmp_path_factory.mktemp("demo")
    torch.manual_seed(0)
    printed, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        code = main(_toy_argv(root / "out", root / "cache"))
    return {
        "code": code,
        "output": root / "out",
        "cache": root / "cache",
        "printed": printed.getvalue(),
        "stderr": errors.getvalue(),
    }


def test_demo_end_to_end_writes_table_json_vectors_and_figures(toy_run):
    assert toy_run["code"] == 0
    output = toy_run["output"]
    results = json.loads((output / "results.json").read_text())
    summary = results["summary"]
    assert set(summary) == {"zero_shot", "individual", "task_arithmetic", "ties", "pcb", "tsv_m", "iso_c", "iso_cts",
                            "adamerging"}
    for row in summary.values():
        diff = row["sam"]["mean"]["mean"] - row["standard"]["mean"]["mean"]
        assert row["difference"]["sam"]["mean"]["mean"] == pytest.approx(diff)
    assert results["variants"] == {"standard": "standard", "sam": "SAM ρ=0.05"}
    seed = results["seeds"][0]
    assert seed["seed"] == 2  # --seed-start 2
    assert seed["merged"]["ties"]["sam"]["method_args"] == {"density": 0.2}
    ada = seed["merged"]["adamerging"]["sam"]  # learned on the unlabeled test inputs, 4 Adam steps from λ = 0.3
    assert ada["method_args"] == {"granularity": "layer", "adapt_split": "test", "steps": 4}
    assert 0.0 <= ada["scaling"] <= 1.0 and ada["scaling"] != 0.3 and len(ada["coefficients_per_task"]) == 2
    assert set(ada["test"]) == {"sizes", "colours"} and "AdaMerging" in (output / "results.md").read_text()
    assert seed["merged"]["task_arithmetic"]["standard"]["scaling"] in (0.5, 1.0)
    assert summary["task_arithmetic"]["standard"]["lambda"]["mean"] in (0.5, 1.0)
    assert -1.0 <= seed["merged"]["ties"]["sam"]["mean_cosine"] <= 1.0
    assert seed["task_vectors"]["sam"]["mean_norm"] > 0 and set(seed["sharpness"]["sam"]) == {"sizes", "colours"}
    for variant in ("standard", "sam"):
        for task in ("sizes", "colours"):
            vector = TaskVector.from_pretrained(output / "task_vectors" / "seed-2" / variant / task)
            assert vector.config["task"] == task and vector.config["variant"] == variant
            assert vector.config["finetuning"]["method"] == ("SAM" if variant == "sam" else "standard")
            assert vector.class_names == list(TASKS[task].classes)
            metrics = vector.config["metrics"]  # validation accuracy recorded for --select normalized
            assert metrics["accuracy"] == seed["individual"][variant][task] and 0 <= metrics["validation_accuracy"] <= 1
    figures = output / "analysis" / "sizes+colours"
    assert (figures / "disentanglement.png").is_file() and (figures / "joint_loss.png").is_file()
    table = (output / "results.md").read_text()
    assert "task arithmetic" in table and "TIES" in table and "PCB" in table and "difference" in table
    assert "individual fine-tuned" in toy_run["printed"] and "pre-trained now" in toy_run["printed"]
    assert "it/s" not in toy_run["stderr"]  # --no-progress silences every bar, the base's pre-training included


def test_second_run_reuses_the_base_and_refuses_an_existing_output(toy_run, tmp_path, capsys):
    assert main(_toy_argv(tmp_path / "b", toy_run["cache"])) == 0
    assert not json.loads((tmp_path / "b" / "results.json").read_text())["base"]["pretrained_this_run"]
    assert main(_toy_argv(toy_run["output"], toy_run["cache"])) == 2
    assert "already exists" in capsys.readouterr().err


def test_bad_task_name_is_a_clear_cli_error(capsys):
    assert main(["--tasks", "digits", "mnist"]) == 2
    assert "mnist" in capsys.readouterr().err


def _seed(std_acc, saft_acc):
    merged = {
        m: {"standard": {"test": {"a": std_acc}, "scaling": 0.3}, "saft": {"test": {"a": saft_acc}, "scaling": 0.2}}
        for m in ("task_arithmetic", "ties", "pcb")
    }
    return {"zero_shot": {"a": 0.1}, "individual": {"standard": {"a": 0.9}, "saft": {"a": 0.9}}, "merged": merged}


def test_seed_summary_reports_the_paired_difference_with_a_95_percent_t_interval():
    summary = summarize_seeds([_seed(0.5, 0.6), _seed(0.5, 0.8)], ["a"], ["standard", "saft"])
    diff = summary["ties"]["difference"]["saft"]["mean"]
    assert diff["mean"] == pytest.approx(0.2) and diff["std"] == pytest.approx(np.std([0.1, 0.3], ddof=1))
    half = 12.706 * diff["std"] / np.sqrt(2)  # t(0.975, 1 df)
    assert diff["ci_low"] == pytest.approx(0.2 - half, rel=1e-3) and diff["ci_high"] == pytest.approx(0.2 + half, rel=1e-3)


def test_seed_summary_reports_gap_recovered_and_lambda():
    summary = summarize_seeds([_seed(0.5, 0.7)], ["a"], ["standard", "saft"])
    assert summary["task_arithmetic"]["standard"]["gap_recovered"]["mean"] == pytest.approx(0.5)  # (0.5-0.1)/(0.9-0.1)
    assert summary["task_arithmetic"]["saft"]["gap_recovered"]["mean"] == pytest.approx(0.75)
    assert summary["pcb"]["saft"]["lambda"]["mean"] == pytest.approx(0.2)


def test_attribute_pretext_keeps_every_attribute_and_drops_some_mentions():
    from saft_hf.demo.attributes import ATTRIBUTES, IGNORE, build_attribute_pretext

    data = build_attribute_pretext(300, seed=0, drop=0.3)
    labels = np.array(data["attributes"])
    assert labels.shape == (300, len(ATTRIBUTES))
    dropped = (labels == IGNORE).mean()
    assert 0.2 < dropped < 0.4
    for column, size in enumerate(ATTRIBUTES.values()):  # every coarse value occurs, none out of range
        seen = set(labels[labels[:, column] != IGNORE, column].tolist())
        assert seen == set(range(size))
    again = build_attribute_pretext(300, seed=0, drop=0.3)
    assert np.array_equal(_pixels(data), _pixels(again))


def test_attribute_pretext_model_ignores_unmentioned_attributes():
    from transformers import CLIPVisionModelWithProjection

    from saft_hf.demo.base import AttributePretextModel

    torch.manual_seed(0)
    model = AttributePretextModel(CLIPVisionModelWithProjection(TINY_BASE.vision_config()), {"a": 3, "b": 2})
    pixels = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([[0, 1], [2, -100], [1, 0], [0, -100]])
    out = model(pixel_values=pixels, labels=labels)
    assert out["logits"].shape == (4, 5)
    logits = out["logits"]
    expected = (
        torch.nn.functional.cross_entropy(logits[:, :3], labels[:, 0], reduction="sum")
        + torch.nn.functional.cross_entropy(logits[[0, 2], 3:], labels[[0, 2], 1], reduction="sum")
    ) / 6
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_help_describes_the_job_and_its_main_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "parsing and printing only" not in text  # the module docstring is not the user's description
    assert "fine-tune eight small tasks" in text
    for option in ("--output", "--seeds", "--seed_start", "--variants", "--tasks", "--steps", "--sam_rho", "--asam_rho", "--cache_dir"):
        assert option in text


def test_preset_small_restores_the_first_regime_and_explicit_flags_override_it():
    from saft_hf.cli.demo import parse_args

    small = parse_args(["--preset", "small", "--steps", "7"])
    assert (small.base_pretext, small.task_domains, small.learning_rate, small.steps) == ("recipes", "shared", 1e-3, 7)
    default = parse_args([])
    assert (default.preset, default.base_pretext, default.task_domains) == ("default", "attributes", "distinct")
    assert (default.base_pretext_detail, default.learning_rate, default.base_pretrain_steps) == ("fine", 1e-4, 4000)


def test_distinct_domains_change_the_background_but_not_the_labels():
    distinct = build_split("counts", "train", 6, seed=1, distinct_domains=True)
    shared = build_split("counts", "train", 6, seed=1, distinct_domains=False)
    assert list(distinct["label"]) == list(shared["label"])
    assert not np.array_equal(_pixels(distinct), _pixels(shared))


def test_combine_merges_disjoint_seeds_and_refuses_different_settings(toy_run, tmp_path, capsys):
    second = tmp_path / "second"
    argv = _toy_argv(second, toy_run["cache"])
    argv[argv.index("--seed-start") + 1] = "5"
    assert main([*argv, "--analysis-pairs", "0"]) == 0
    combined = tmp_path / "combined"
    assert main(["--combine", str(toy_run["output"]), str(second), "--output", str(combined)]) == 0
    results = json.loads((combined / "results.json").read_text())
    assert [s["seed"] for s in results["seeds"]] == [2, 5]
    assert results["summary"]["ties"]["standard"]["mean"]["n"] == 2
    assert main(["--combine", str(toy_run["output"]), str(toy_run["output"]), "--output", str(tmp_path / "x")]) == 2
    assert "repeat a seed" in capsys.readouterr().err
    other = tmp_path / "other"
    assert main([*_toy_argv(other, toy_run["cache"]), "--steps", "2", "--analysis-pairs", "0"]) == 0
    assert main(["--combine", str(toy_run["output"]), str(other), "--output", str(tmp_path / "y")]) == 2
    assert "differ in ['steps']" in capsys.readouterr().err


def test_two_demo_task_vectors_merge_with_the_command_their_card_prints(toy_run, tmp_path, monkeypatch, capsys):
    """The card's command runs beside the vector; the base id it records (saft-demo/base-…) is found in the cache."""
    import json as _json
    import re
    import shlex

    from saft_hf.cli.merge import main as saft_merge

    folder = toy_run["output"] / "task_vectors" / "seed-2" / "sam"
    card = (folder / "sizes" / "README.md").read_text()
    assert str(toy_run["output"]) not in card and ".tmp" not in card  # no path of the machine, no temp folder
    [block] = re.findall(r"```bash\n(.*?)```", card, flags=re.DOTALL)
    argv = shlex.split(next(line for line in block.splitlines() if line.startswith("saft-merge ")))
    assert "./sizes,OWNER/OTHER_TASK_VECTOR" in argv
    argv = [arg.replace("OWNER/OTHER_TASK_VECTOR", "./colours").replace("merged", str(tmp_path / "merged")) for arg in argv]
    monkeypatch.chdir(folder)
    (tmp_path / "saft").mkdir()
    (tmp_path / "saft" / "demo").symlink_to(toy_run["cache"])  # the demo's cache as saft-hf's default one
    monkeypatch.setenv("SAFT_HF_CACHE", str(tmp_path / "saft"))
    assert saft_merge(argv[1:] + ["--no-progress"]) == 0, capsys.readouterr().err
    config = _json.loads((tmp_path / "merged" / "merge_config.json").read_text())
    assert config["base_model"]["id"].startswith("saft-demo/base-") and [r["repo"] for r in config["repos"]] == ["sizes", "colours"]
    # elsewhere (the demo ran with --cache-dir): the error names the fix, and --base with the cached folder works
    monkeypatch.setenv("SAFT_HF_CACHE", str(tmp_path / "empty"))
    assert saft_merge(argv[1:] + ["--no-progress", "--overwrite"]) == 1
    assert "pass --base with the demo's cached folder" in capsys.readouterr().err
    [cached] = [p for p in toy_run["cache"].iterdir() if p.name.startswith("base-")]
    assert saft_merge(argv[1:] + ["--no-progress", "--overwrite", "--base", str(cached)]) == 0


def test_a_one_seed_table_says_its_difference_has_no_interval(toy_run):
    table = (toy_run["output"] / "results.md").read_text()
    assert "[95% CI]" not in table and "1 seed: an interval needs ≥ 2" in table
