"""Test-suite wide setup: everything runs offline against what the tests build themselves."""

import os

# Set before huggingface_hub is imported anywhere: it reads these at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["tests.fixtures_clip", "tests.fixtures_hub"]


def pytest_sessionfinish(session, exitstatus):  # noqa: ARG001
    """No process started by a test launch outlives the suite (see tests/launching.py)."""
    from tests.launching import kill_tagged

    kill_tagged()
