"""Every public name listed by saft_hf resolves, and the SAM math imports without transformers."""

import subprocess
import sys

import pytest

import saft_hf


def test_every_public_name_is_importable_from_saft_hf():
    for name in saft_hf.__all__:
        assert getattr(saft_hf, name) is not None, name


def test_unknown_attribute_raises_attribute_error():
    try:
        saft_hf.NotAThing  # noqa: B018
    except AttributeError as err:
        assert "NotAThing" in str(err)
    else:
        raise AssertionError("expected AttributeError")


def test_sam_math_does_not_import_transformers():
    code = "import sys, saft_hf.sam; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_testing_module_builds_the_offline_setup_the_readme_uses(tmp_path):
    from datasets import load_from_disk
    from transformers import CLIPModel, CLIPTokenizer

    from saft_hf.testing import TINY_TASKS, main

    main([str(tmp_path)])
    assert CLIPModel.from_pretrained(tmp_path / "clip").config.projection_dim == 16
    assert CLIPTokenizer.from_pretrained(tmp_path / "clip")("a red thing")["input_ids"]
    for task, classes in TINY_TASKS.items():
        data = load_from_disk(str(tmp_path / "data" / task))
        assert data["train"].features["label"].names == classes


@pytest.mark.parametrize("command", ["analyze", "demo"])
def test_help_of_the_analysis_and_demo_commands_imports_no_torch(command):
    """--help answers at once: neither torch nor datasets is loaded to print it."""
    code = (
        f"import sys\nfrom saft_hf.cli.{command} import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'datasets') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stderr
    assert "usage:" in result.stdout
