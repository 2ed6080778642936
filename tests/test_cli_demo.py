"""saft-demo's command line: help texts (the demo itself is tested in test_demo.py)."""

from __future__ import annotations

import pytest

from saft_hf.cli.demo import parse_args


def test_no_progress_help_says_it_hides_the_bars(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    after = text.split("--no_progress, --no-progress", 1)[1]
    assert after.lstrip().startswith("Hide the progress bars")
    assert not parse_args(["--no-progress"]).progress
