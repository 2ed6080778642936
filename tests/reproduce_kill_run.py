"""Run by `accelerate launch` from tests/test_reproduce.py: reproduce_saft.py, SIGKILLed after a checkpoint.

    reproduce_kill_run.py STAGE STEP [reproduce_saft arguments...]

The process kills itself (no clean-up, like a pre-empted node) right after the Trainer has saved
``checkpoint-STEP`` of the STAGE-th fine-tune this invocation starts.
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import TrainerCallback  # noqa: E402

from tests.test_reproduce import load_reproduce_script  # noqa: E402


class KillAfterCheckpoint(TrainerCallback):
    """SIGKILL this process once ``checkpoint-<step>`` of the ``stage``-th fine-tune is on disk."""

    def __init__(self, stage: int, step: int) -> None:
        self.stage, self.step, self.started = stage, step, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started += 1

    def on_save(self, args, state, control, **kwargs):
        if self.started == self.stage and state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    stage, step = int(sys.argv[1]), int(sys.argv[2])
    sys.exit(load_reproduce_script().main(sys.argv[3:], callbacks=[KillAfterCheckpoint(stage, step)]))
