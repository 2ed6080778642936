"""tests/launching.py: a launch that times out leaves no process behind, ranks in sessions of their own included."""

from __future__ import annotations

import os
import time

import pytest

from tests.launching import Launch, LaunchTimeout, launcher, tagged_pids


@pytest.mark.slow
def test_a_timed_out_two_process_launch_kills_the_launcher_and_every_rank(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text("import os, time\nprint('rank', os.environ.get('RANK'), os.getsid(0), flush=True)\ntime.sleep(3600)\n")
    launch = Launch([*launcher(2), str(script)], {**os.environ}, tmp_path / "log.txt")
    deadline = time.monotonic() + 600  # the agent imports torch first: slow on a loaded machine
    while len(tagged_pids(launch.tag)) < 3 and time.monotonic() < deadline and launch.process.poll() is None:
        time.sleep(0.2)
    started = tagged_pids(launch.tag)
    assert len(started) >= 3, f"launcher and two ranks expected, got {started}:\n{launch.output()}"
    sessions = {os.getsid(pid) for pid in started}
    assert len(sessions) > 1  # the ranks run in sessions of their own: killing the launcher's group is not enough
    with pytest.raises(LaunchTimeout):
        launch.wait(timeout=1)
    assert tagged_pids(launch.tag) == []
