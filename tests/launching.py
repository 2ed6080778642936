"""Multi-process launches for the tests that can neither hang the suite nor outlive it.

Why the 2-process runs used to hang on a loaded machine: the tests picked a free port, closed it and
passed it to ``accelerate launch --main_process_port``; between the close and torch's bind another
process could take it, and a rank left waiting at a rendezvous that never completes waited until the
test's timeout. ``subprocess.run(timeout=...)`` then killed only the launcher: torch's elastic agent
starts every rank in a session of its own, so the ranks kept running after the suite had ended.

Here a launch with several processes runs ``torch.distributed.run --standalone`` (what ``accelerate
launch --multi_gpu`` runs underneath): its agent binds the rendezvous store on port 0 itself, so there
is no port to steal. Each launch is tagged through an environment variable that its ranks inherit;
on a timeout, and after every launch, whatever carries the tag is killed, sessions of its own or not.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

TAG = "SAFT_TEST_LAUNCH"
SESSION = uuid.uuid4().hex[:12]
TIMEOUT = float(os.environ.get("SAFT_TEST_LAUNCH_TIMEOUT", "1200"))  # a generous bound for a loaded 2-core machine


class LaunchTimeout(AssertionError):
    """A launch ran past its timeout; every process it started has been killed."""


def launcher(processes: int) -> list[str]:
    """The command prefix that starts ``processes`` copies of a script (one: ``accelerate launch`` itself)."""
    if processes == 1:
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]


def tagged_pids(prefix: str) -> list[int]:
    """Processes whose environment carries a launch tag starting with ``prefix`` (Linux ``/proc``)."""
    found = []
    needle = f"{TAG}={prefix}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if any(item.startswith(needle) for item in environ.split(b"\0")):
            found.append(int(entry.name))
    return found


def kill_tagged(prefix: str = SESSION) -> int:
    """SIGKILL every process carrying a tag that starts with ``prefix``; returns how many there were."""
    pids = tagged_pids(prefix)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return len(pids)


class Launch:
    """One started launch: ``wait()`` returns its exit status, and nothing it started survives it."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path) -> None:
        self.tag = f"{SESSION}-{uuid.uuid4().hex[:8]}"
        self.log = log
        with open(log, "w") as handle:  # the child keeps its own copy of the file descriptor
            self.process = subprocess.Popen(
                command, env={**env, TAG: self.tag}, stdout=handle, stderr=subprocess.STDOUT, text=True,
                start_new_session=True,
            )  # fmt: skip

    def wait(self, timeout: float = TIMEOUT) -> int:
        """The exit status; past ``timeout`` every process of the launch is killed and ``LaunchTimeout`` raised."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise LaunchTimeout(f"launch timed out after {timeout:.0f} s; killed:\n{self.output()[-4000:]}") from None
        finally:
            kill_tagged(self.tag)  # ranks in sessions of their own, left by a launcher that died

    def stop(self) -> None:
        """SIGTERM to the launcher's group (torch's agent then stops its ranks), SIGKILL to anything left."""
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except OSError:
            pass
        self.process.wait()
        deadline = time.monotonic() + 5
        while kill_tagged(self.tag) and time.monotonic() < deadline:
            time.sleep(0.1)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""


def run(command: list[str], env: dict[str, str], log: Path, timeout: float = TIMEOUT) -> tuple[int, str]:
    """Start, wait and return (exit status, output)."""
    launch = Launch(command, env, log)
    code = launch.wait(timeout)
    return code, launch.output()
