"""Security and data safety of what saft-hf reads and writes: names from downloaded files, pickles, modes, secrets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from saft_hf.cli.merge import main
from saft_hf.clip import ZeroShotHead, load_vision_tower
from saft_hf.task_vectors import TaskVector
from tests.fixtures_clip import TINY_TASKS


def _vector_dir(base_dir: Path, target: Path, task: str, seed: int, head_task: str = "TinyColors") -> Path:
    """A task vector of the tiny tower whose config records ``task`` (any string), with a zero-shot head."""
    base = load_vision_tower(base_dir)
    generator = torch.Generator().manual_seed(seed)
    tau = {n: 0.01 * torch.randn(p.shape, generator=generator) for n, p in base.named_parameters()}
    head_dir = target.parent / f"{target.name}-head"
    prototypes = torch.randn(len(TINY_TASKS[head_task]), base.config.projection_dim, generator=generator)
    ZeroShotHead.from_prototypes(prototypes, TINY_TASKS[head_task], task=head_task).save_pretrained(head_dir)
    config = {"task": task, "base_model": str(base_dir)}
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
