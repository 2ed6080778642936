"""Security and data safety of what saft-hf reads and writes: names from downloaded files, pickles, modes, secrets."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from saft_hf.cli.merge import main
from saft_hf.clip import ZeroShotHead, load_vision_tower
from saft_hf.task_vectors import TaskVector
from tests.fixtures_clip import TINY_TASKS


def _vector_dir(
    base_dir: Path, target: Path, task: str, seed: int, head_task: str = "TinyColors", base_id: str | None = None
) -> Path:
    """A task vector of the tiny tower whose config records ``task`` (any string), with a zero-shot head."""
    base = load_vision_tower(base_dir)
    generator = torch.Generator().manual_seed(seed)
    tau = {n: 0.01 * torch.randn(p.shape, generator=generator) for n, p in base.named_parameters()}
    head_dir = target.parent / f"{target.name}-head"
    prototypes = torch.randn(len(TINY_TASKS[head_task]), base.config.projection_dim, generator=generator)
    ZeroShotHead.from_prototypes(prototypes, TINY_TASKS[head_task], task=head_task).save_pretrained(head_dir)
    config = {"task": task, "base_model": base_id or str(base_dir)}
    return TaskVector(tau, config, head_dir=head_dir).save_pretrained(target)


# ----------------------------------------------------------------------------- item 1: names become paths
def test_task_names_from_vector_configs_cannot_write_outside_the_output(
    tiny_clip_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    planted_abs = tmp_path / "abs" / "PLANTED"
    work = tmp_path / "work"
    vectors = [
        _vector_dir(tiny_clip_dir, work / "tv-a", str(planted_abs), 1),
        _vector_dir(tiny_clip_dir, work / "tv-b", "../../PLANTED", 2),
    ]
    output = work / "out" / "merged"
    code = main(["--repos", ",".join(map(str, vectors)), "--method", "task_arithmetic", "--scaling", "0.3",
                 "--output", str(output), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0
    assert not planted_abs.exists() and not (work / "PLANTED").exists() and not (work / "out" / "PLANTED").exists()
    assert not output.exists()
    assert "not a plain name" in err and ("PLANTED" in err)


@pytest.mark.parametrize("task", ["../x", "/abs/x", "a/b", "..", ".", "", "a\\b", "x\x00y"])
def test_a_task_vector_whose_task_is_not_a_plain_name_is_refused_on_load(tmp_path: Path, task: str) -> None:
    from saft_hf.task_vectors import CorruptedTaskVectorError

    directory = TaskVector({"w": torch.ones(2)}, {"task": task}).save_pretrained(tmp_path / "tv", model_card=False)
    with pytest.raises(CorruptedTaskVectorError, match="not a plain name"):
        TaskVector.from_pretrained(directory)


def test_plain_task_names_load(tmp_path: Path) -> None:
    for task in ("mnist", "Stanford Cars", "sun397-v2", "TinyColors"):
        directory = TaskVector({"w": torch.ones(2)}, {"task": task}).save_pretrained(tmp_path / "tv", model_card=False)
        assert TaskVector.from_pretrained(directory).config["task"] == task


# ----------------------------------------------------------------------------- item 3: no pickle path
PICKLE_REFUSED = "never pickled"


@pytest.fixture(scope="module")
def pickle_only_clip(tiny_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny CLIP with its weights as ``pytorch_model.bin`` only (config, tokenizer, processor kept)."""
    import shutil

    from safetensors.torch import load_file

    directory = tmp_path_factory.mktemp("pickle_clip") / "clip"
    shutil.copytree(tiny_clip_dir, directory)
    torch.save(load_file(str(directory / "model.safetensors")), directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()
    return directory


@pytest.fixture
def no_torch_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any torch.load call fails the test loudly instead of unpickling."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load was called: a pickle was about to be read")

    monkeypatch.setattr(torch, "load", refuse)


def test_load_vision_tower_refuses_a_pickle_only_folder(pickle_only_clip: Path, no_torch_load: None) -> None:
    with pytest.raises(ValueError, match=PICKLE_REFUSED):
        load_vision_tower(pickle_only_clip)


def test_build_zero_shot_head_refuses_a_pickle_only_folder(pickle_only_clip: Path, no_torch_load: None) -> None:
    from saft_hf.clip import build_zero_shot_head

    with pytest.raises(ValueError, match=PICKLE_REFUSED):
        build_zero_shot_head(pickle_only_clip, None, ["a", "b"], ["a photo of a {}."])


@pytest.fixture
def weights_only_loads(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """torch.load as transformers' loader calls it; any call without ``weights_only=True`` fails the test."""
    calls: list[object] = []
    original = torch.load

    def checked(*args: object, **kwargs: object) -> object:
        calls.append(kwargs.get("weights_only"))
        if kwargs.get("weights_only") is not True:
            raise AssertionError("torch.load without weights_only=True: a full pickle was about to be read")
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", checked)
    return calls


def test_saft_analyze_reads_a_pickle_only_base_through_transformers_weights_only_loader(
    tiny_clip_dir: Path, pickle_only_clip: Path, tiny_task_data_dir: Path, tmp_path: Path,
    weights_only_loads: list[object],
) -> None:  # fmt: skip
    from saft_hf.analysis.inputs import load_analysis_inputs

    vectors = [_vector_dir(tiny_clip_dir, tmp_path / f"tv{i}", task, i, head_task=task)
               for i, task in enumerate(["TinyColors", "TinyPatterns"], start=1)]  # fmt: skip
    inputs = load_analysis_inputs(pickle_only_clip, {"sam": vectors}, tasks=["TinyColors", "TinyPatterns"],
                                  data_dir=tiny_task_data_dir, max_samples=4)  # fmt: skip
    expected = load_vision_tower(tiny_clip_dir).state_dict()
    assert all(torch.equal(t, expected[n]) for n, t in inputs.model.state_dict().items() if n in expected)
    assert weights_only_loads  # the .bin was read, and only with weights_only=True


def test_saft_merge_reads_a_pickle_only_base_only_through_the_weights_only_loader(
    tiny_clip_dir: Path, pickle_only_clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    weights_only_loads: list[object],
) -> None:  # fmt: skip
    vectors = [_vector_dir(tiny_clip_dir, tmp_path / f"tv{i}", f"task{i}", i, base_id=str(pickle_only_clip))
               for i in (1, 2)]  # fmt: skip
    code = main(["--repos", ",".join(map(str, vectors)), "--method", "task_arithmetic",
                 "--scaling", "0.3", "--output", str(tmp_path / "out"), "--no-progress"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "pytorch_model.bin (transformers' weights_only loader)" in captured.out and weights_only_loads


def test_a_pickle_only_task_vector_or_fine_tuned_model_is_never_read(
    tiny_clip_dir: Path, pickle_only_clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_torch_load: None
) -> None:
    good = _vector_dir(tiny_clip_dir, tmp_path / "tv", "TinyColors", 1)
    code = main(["--repos", f"{good},{pickle_only_clip}", "--base", str(tiny_clip_dir), "--method", "task_arithmetic",
                 "--scaling", "0.3", "--output", str(tmp_path / "out"), "--no-progress"])  # fmt: skip
    assert code == 1 and "reads safetensors only" in capsys.readouterr().err


# ----------------------------------------------------------------------------- item 4: modes follow the umask
@pytest.fixture(params=[0o022, 0o002])
def umask(request: pytest.FixtureRequest) -> object:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    """Permission bits of ``root`` and everything under it, by path relative to ``root``."""
    paths = [root, *root.rglob("*")]
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in paths}


def _assert_umask_modes(root: Path, umask: int) -> None:
    for name, mode in _modes(root).items():
        expected = (0o777 if (root / name).is_dir() else 0o666) & ~umask
        assert mode == expected, f"{name}: {oct(mode)} != {oct(expected)} under umask {oct(umask)}"


def test_atomic_outputs_get_the_modes_of_a_plain_mkdir_and_open(tmp_path: Path, umask: int) -> None:
    from saft_hf.io_utils import atomic_output_dir, atomic_save_file, atomic_write_json

    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "sub").mkdir()
        atomic_save_file({"w": torch.ones(2)}, tmp / "sub" / "w.safetensors")
    atomic_write_json(tmp_path / "single" / "a.json", {"a": 1})
    atomic_save_file({"w": torch.ones(2)}, tmp_path / "single" / "w.safetensors")
    _assert_umask_modes(tmp_path / "out", umask)
    _assert_umask_modes(tmp_path / "single", umask)


def test_saved_task_vector_and_classifier_follow_the_umask(tmp_path: Path, umask: int) -> None:
    from saft_hf.clip import CLIPImageClassifier
    from tests.tiny_models import tiny_tower

    TaskVector({"w": torch.ones(3)}, {"task": "x"}).save_pretrained(tmp_path / "tv", max_shard_size=8)
    _assert_umask_modes(tmp_path / "tv", umask)
    head = ZeroShotHead.from_prototypes(torch.randn(3, 16), ["a", "b", "c"])
    CLIPImageClassifier(tiny_tower(0), head).save_pretrained(tmp_path / "clf")
    _assert_umask_modes(tmp_path / "clf", umask)


def test_merged_output_follows_the_umask(tiny_clip_dir: Path, tmp_path: Path, umask: int) -> None:
    vectors = [_vector_dir(tiny_clip_dir, tmp_path / f"tv{i}", f"task{i}", i) for i in (1, 2)]
    output = tmp_path / "merged"
    code = main(["--repos", ",".join(map(str, vectors)), "--method", "task_arithmetic", "--scaling", "0.3",
                 "--output", str(output), "--no-progress"])  # fmt: skip
    assert code == 0
    _assert_umask_modes(output, umask)


# ----------------------------------------------------------------------------- item 5: no secret in a repr
def test_merge_job_repr_and_outputs_never_carry_the_token(tiny_clip_dir: Path, tmp_path: Path) -> None:
    from saft_hf.pipeline import MergeJob, run_merge_job
    from tests.fixtures_hub import FAKE_TOKEN

    vectors = [_vector_dir(tiny_clip_dir, tmp_path / f"tv{i}", f"task{i}", i) for i in (1, 2)]
    job = MergeJob(repos=[str(v) for v in vectors], output=tmp_path / "out", method="task_arithmetic", scaling=0.3,
                   token=FAKE_TOKEN, progress=False)  # fmt: skip
    assert job.token == FAKE_TOKEN
    assert FAKE_TOKEN not in repr(job) and FAKE_TOKEN not in str(job)
    outcome = run_merge_job(job)
    assert FAKE_TOKEN not in repr(outcome)
    for path in outcome.output.rglob("*"):
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path
