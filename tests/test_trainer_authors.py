"""sam_loop='authors' against a hand transcription of the SAFT authors' released loop (tests/authors_reference.py)."""

import pytest
import torch

from saft_hf import SAMTrainer
from saft_hf.authors_loop import CARRIED_GRADIENTS_NAME
from tests.authors_reference import authors_reference
from tests.sam_toy import ToyClassifier, micro_batches, sgd_args, toy_dataset

STEPS = 12
# A tight clip so that clipping binds on the toy (the authors use 1.0 on CLIP's gradients).
CLIP = 0.05
VARIANTS = {"standard": (0.0, False), "sam": (0.05, False), "asam": (0.5, True)}


def _authors_args(tmp_path, variant="standard", loop="authors", **overrides):
    rho, adaptive = VARIANTS[variant]
    settings = dict(
        optim="adamw_torch", learning_rate=1e-2, weight_decay=0.1, max_grad_norm=CLIP, max_steps=STEPS,
        sam_loop=loop, sam_rho=rho, sam_adaptive=adaptive, sam_eta=0.0, sam_adaptive_scope="all",
    )
    return sgd_args(str(tmp_path), **{**settings, **overrides})


def _train(tmp_path, variant="standard", **overrides):
    trainer = SAMTrainer(model=ToyClassifier(), args=_authors_args(tmp_path, variant, **overrides),
                         train_dataset=toy_dataset())
    trainer.train()
    return trainer.model.state_dict()


def _reference(variant="standard", accumulation=1, **quirks):
    rho, adaptive = VARIANTS[variant]
    return authors_reference(ToyClassifier(), micro_batches(toy_dataset(), 4), steps=STEPS, accumulation=accumulation,
                             rho=rho, adaptive=adaptive, clip=CLIP, **quirks)


def _same(actual, expected, atol=1e-5):
    return all(torch.allclose(actual[n], expected[n], atol=atol, rtol=0) for n in expected)


def _assert_same(actual, expected, atol=1e-5):
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, atol=atol, rtol=0, msg=f"parameter {name}")


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_authors_loop_matches_the_transcription_of_their_finetune_py(tmp_path, variant, accumulation):
    weights = _train(tmp_path, variant, gradient_accumulation_steps=accumulation)
    _assert_same(weights, _reference(variant, accumulation))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_q1_gradients_carried_over_matter_on_the_toy(tmp_path, variant):
    weights = _train(tmp_path, variant)
    assert not _same(weights, _reference(variant, zero_grad=True))


@pytest.mark.parametrize("variant", ["sam", "asam"])
def test_q2_the_descent_gradient_is_not_clipped(tmp_path, variant):
    weights = _train(tmp_path, variant)
    assert not _same(weights, _reference(variant, clip_descent=True))


@pytest.mark.parametrize("variant", ["standard", "asam"])
def test_q4_weight_decay_applies_to_biases_and_layernorms(tmp_path, variant):
    weights = _train(tmp_path, variant)
    assert not _same(weights, _reference(variant, decay_all=False))


def test_the_clean_loop_is_not_the_authors_loop(tmp_path):
    clean = _train(tmp_path / "clean", "asam", loop="clean")
    assert not _same(clean, _reference("asam"))


@pytest.mark.parametrize("variant", ["standard", "asam"])
def test_a_resumed_run_restores_the_carried_gradient(tmp_path, variant):
    straight = _train(tmp_path / "straight", variant)
    out = tmp_path / "resumed"
    first = SAMTrainer(model=ToyClassifier(), train_dataset=toy_dataset(),
                       args=_authors_args(out, variant, save_strategy="steps", save_steps=5))
    first.train()
    checkpoint = out / "checkpoint-5"
    assert (checkpoint / CARRIED_GRADIENTS_NAME).is_file()
    resumed = SAMTrainer(model=ToyClassifier(seed=7), train_dataset=toy_dataset(), args=_authors_args(out, variant))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    _assert_same(resumed.model.state_dict(), straight)


def test_resuming_from_a_checkpoint_without_the_carried_gradient_is_refused(tmp_path):
    out = tmp_path / "run"
    SAMTrainer(model=ToyClassifier(), train_dataset=toy_dataset(),
               args=_authors_args(out, save_strategy="steps", save_steps=5)).train()
    (out / "checkpoint-5" / CARRIED_GRADIENTS_NAME).unlink()
    trainer = SAMTrainer(model=ToyClassifier(), train_dataset=toy_dataset(), args=_authors_args(out))
    with pytest.raises(ValueError, match="sam_loop='clean' or start the run afresh"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-5"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"sam_loop": "released"}, "sam_loop must be one of"),
        ({"sam_mode": "periodic", "sam_interval": 2}, "sam_loop='authors' reproduces"),
    ],
)
def test_bad_loop_arguments_raise_clear_errors(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _authors_args(tmp_path, "asam", **overrides)
