"""Atomic outputs: a folder or file appears complete or not at all, and a good one is never half replaced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saft_hf.io_utils import atomic_output_dir, atomic_save_file, atomic_write_json, atomic_write_text


def _entries(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_output_dir_appears_only_when_the_block_succeeds(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_output_dir(target) as tmp:
        (tmp / "a.txt").write_text("done")
        assert not target.exists() and tmp.parent == tmp_path
    assert (target / "a.txt").read_text() == "done" and _entries(tmp_path) == ["out"]


def test_failed_block_leaves_no_output_and_no_temp_folder(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "half.txt").write_text("partial")
            raise RuntimeError("boom")
    assert _entries(tmp_path) == []


def test_existing_output_is_refused_without_overwrite(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists.*overwrite"):
        with atomic_output_dir(tmp_path / "out"):
            pass


def test_overwrite_replaces_only_after_success(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(target, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("fail")
    assert _entries(target) == ["old.txt"]
    with atomic_output_dir(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _entries(target) == ["new.txt"] and _entries(tmp_path) == ["out"]


def test_a_file_in_the_way_is_reported(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        with atomic_output_dir(tmp_path / "out", overwrite=True):
            pass


def test_text_json_and_safetensors_are_written_whole(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "sub" / "a.txt", "héllo")
    atomic_write_json(tmp_path / "b.json", {"b": 1, "a": [1.5]})
    atomic_save_file({"w": torch.arange(6.0).view(2, 3).t()}, tmp_path / "c.safetensors", {"k": "v"})
    assert (tmp_path / "sub" / "a.txt").read_text(encoding="utf-8") == "héllo"
    assert json.loads((tmp_path / "b.json").read_text()) == {"a": [1.5], "b": 1}
    assert torch.equal(load_file(str(tmp_path / "c.safetensors"))["w"], torch.arange(6.0).view(2, 3).t())
    assert _entries(tmp_path) == ["b.json", "c.safetensors", "sub"]


def test_failed_file_write_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    atomic_write_json(path, {"ok": True})
    with pytest.raises(TypeError):
        atomic_write_text(path, 123)  # type: ignore[arg-type]
    assert json.loads(path.read_text()) == {"ok": True} and _entries(tmp_path) == ["b.json"]
