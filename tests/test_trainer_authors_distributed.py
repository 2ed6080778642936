"""sam_loop='authors' on 2 processes (accelerate launch, gloo on CPU) against its one-process equivalent."""

import pytest
import torch

from saft_hf import SAMTrainer
from tests.dist_sam_run import AUTHORS_SETTINGS
from tests.sam_toy import ToyClassifier, sgd_args, toy_dataset
from tests.test_trainer_distributed import _assert_close, _launch


def _single_process(tmp, rho, **layout):
    args = sgd_args(str(tmp), sam_rho=rho, max_steps=4, sam_loop="authors", sam_ascent="global",
                    **AUTHORS_SETTINGS, **layout)  # fmt: skip
    trainer = SAMTrainer(model=ToyClassifier(), args=args, train_dataset=toy_dataset())
    trainer.train()
    return trainer.model.state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("rho", [0.0, 0.05])
def test_authors_loop_on_two_ranks_equals_one_process_on_the_union_batch(tmp_path, rho):
    # The carried gradient is the all-reduced one, the same on both ranks; the global ascent averages
    # (carried + local gradient) over ranks = carried + the union batch's gradient; the descent is all-reduced.
    ranks = _launch(tmp_path / "dist", "global", "sam", "1", "authors", str(rho))
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), f"ranks disagree on {name}"
    _assert_close(ranks[0], _single_process(tmp_path / "ref", rho, per_device_train_batch_size=8))
