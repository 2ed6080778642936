"""Run by `accelerate launch` from tests/test_trainer_distributed.py: train the toy model, save each rank's weights."""

import faulthandler
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from saft_hf import SAMTrainer  # noqa: E402
from tests.sam_toy import ToyClassifier, sgd_args, toy_dataset  # noqa: E402

# AdamW with decay and a clip that binds, so that every quirk of the authors' loop shows in the weights.
AUTHORS_SETTINGS = {"optim": "adamw_torch", "learning_rate": 1e-2, "weight_decay": 0.1, "max_grad_norm": 0.05}


def main() -> None:
    # A rank stuck this long dumps every thread's stack to the launch log and exits, so a hang fails the test
    # with its location instead of holding the suite (tests/launching.py kills whatever is left).
    faulthandler.dump_traceback_later(float(os.environ.get("SAFT_TEST_RANK_TIMEOUT", "300")), exit=True)
    out, ascent, batch, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    mode, interval = (sys.argv[5], int(sys.argv[6])) if len(sys.argv) > 6 else ("sam", 1)
    # optional: the SAFT authors' loop and rho (tests/test_trainer_authors_distributed.py)
    loop, rho = (sys.argv[7], float(sys.argv[8])) if len(sys.argv) > 8 else ("clean", 0.05)
    torch.set_num_threads(1)
    extra = AUTHORS_SETTINGS if loop == "authors" else {}
    args = sgd_args(out, sam_rho=rho, sam_ascent=ascent, per_device_train_batch_size=batch, max_steps=steps,
                    sam_mode=mode, sam_interval=interval, sam_loop=loop, **extra)
    trainer = SAMTrainer(model=ToyClassifier(), args=args, train_dataset=toy_dataset())
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    state = {k: v.detach().contiguous() for k, v in trainer.model.state_dict().items()}
    save_file(state, os.path.join(out, f"rank{rank}.safetensors"))
    if rank == 0:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        Path(out, "world.json").write_text(json.dumps({"world_size": world}))
    # Tear the gloo group down before exit: left to interpreter shutdown, its threads can abort the process.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
    # Leave without interpreter finalisation: on a loaded machine a rank was seen stuck for 5 minutes after
    # main() had returned, in a native thread of the torch.distributed teardown (faulthandler dump, 2026-12-04).
    # Everything the test reads is written and closed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
