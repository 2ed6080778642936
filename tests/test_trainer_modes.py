"""SAMTrainer's cheap-SAM modes (periodic, LookSAM, layer-restricted) against references written from the papers."""

import pytest
import torch

from saft_hf import SAMTrainer, SAMTrainingArguments
from tests.sam_toy import ToyClassifier, micro_batches, reference_sam, sgd_args, toy_dataset

STEPS = 6  # 32 examples: 8 micro-batches of 4, so accumulation 2 leaves 4 steps per epoch; 6 crosses an epoch


def _train(tmp_path, model=None, **overrides):
    model = model or ToyClassifier()
    args = sgd_args(str(tmp_path), **{"max_steps": STEPS, "num_train_epochs": 10, **overrides})
    trainer = SAMTrainer(model=model, args=args, train_dataset=toy_dataset())
    trainer.train()
    return trainer


def _reference(accumulation, **kwargs):
    batches = micro_batches(toy_dataset(), 4) * 10  # sequential sampler, epoch after epoch
    return reference_sam(ToyClassifier(), batches, steps=STEPS, accumulation=accumulation, lr=0.1, **kwargs)


def _assert_same_weights(model, expected, atol=1e-6):
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[name], atol=atol, rtol=0, msg=f"parameter {name}")


def _differ(a, b, atol=1e-6):
    return any(not torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_periodic_mode_matches_sam_every_kth_step_reference(tmp_path, accumulation):
    trainer = _train(tmp_path, gradient_accumulation_steps=accumulation, sam_rho=0.5, sam_mode="periodic",
                     sam_interval=2)
    expected = _reference(accumulation, rho=0.5, interval=2)
    _assert_same_weights(trainer.model, expected)
    assert _differ(expected, _reference(accumulation, rho=0.5)), "k=2 must differ from SAM on every step"


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("adaptive", [False, True])
def test_looksam_matches_the_papers_algorithm(tmp_path, accumulation, adaptive):
    rho = 0.5
    trainer = _train(tmp_path, gradient_accumulation_steps=accumulation, sam_rho=rho, sam_adaptive=adaptive,
                     sam_mode="looksam", sam_interval=3, sam_looksam_alpha=0.7)
    expected = _reference(accumulation, rho=rho, adaptive=adaptive, interval=3, looksam_alpha=0.7)
    _assert_same_weights(trainer.model, expected)
    # the reused g_v matters: the same schedule without it (periodic) lands elsewhere
    assert _differ(expected, _reference(accumulation, rho=rho, adaptive=adaptive, interval=3))


def test_looksam_with_alpha_zero_is_periodic_sam(tmp_path):
    looksam = _train(tmp_path / "a", sam_rho=0.5, sam_mode="looksam", sam_interval=2, sam_looksam_alpha=0.0)
    periodic = _train(tmp_path / "b", sam_rho=0.5, sam_mode="periodic", sam_interval=2)
    for name, value in periodic.model.state_dict().items():
        assert torch.equal(looksam.model.state_dict()[name], value), name


@pytest.mark.parametrize("mode", ["periodic", "looksam"])
def test_interval_one_is_plain_sam_bitwise(tmp_path, mode):
    cheap = _train(tmp_path / "a", sam_rho=0.5, sam_mode=mode, gradient_accumulation_steps=2)
    full = _train(tmp_path / "b", sam_rho=0.5, gradient_accumulation_steps=2)
    for name, value in full.model.state_dict().items():
        assert torch.equal(cheap.model.state_dict()[name], value), name


@pytest.mark.parametrize("accumulation", [1, 2])
def test_sam_on_perturbs_only_normalisation_layers_as_the_reference(tmp_path, accumulation):
    trainer = _train(tmp_path, gradient_accumulation_steps=accumulation, sam_rho=0.5, sam_include=["norm"])
    assert [n for n, _ in trainer._sam_parameters()] == ["norm.weight", "norm.bias"]
    expected = _reference(accumulation, rho=0.5, perturb=lambda name: name.startswith("norm."))
    _assert_same_weights(trainer.model, expected)
    assert _differ(expected, _reference(accumulation, rho=0.5)), "SAM-ON must differ from full SAM"


def test_exclude_applies_after_include(tmp_path):
    trainer = _train(tmp_path, sam_rho=0.05, sam_include=["weight"], sam_exclude=["^norm"])
    assert [n for n, _ in trainer._sam_parameters()] == ["fc1.weight", "fc2.weight"]


def test_an_include_that_matches_nothing_names_the_parameters(tmp_path):
    with pytest.raises(ValueError, match="sam_include") as error:
        _train(tmp_path, sam_rho=0.05, sam_include=["attention"])
    assert "fc1.weight" in str(error.value)


class _GradientLog(SAMTrainer):
    """Records, at every forward, which storage each perturbed weight's .grad uses (None: no gradient)."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        named = self._sam_parameters()
        self.forward_grads = getattr(self, "forward_grads", [])
        self.forward_grads.append([None if p.grad is None else p.grad.data_ptr() for _, p in named])
        return super().compute_loss(model, inputs, *args, **kwargs)


@pytest.mark.parametrize("adaptive", [False, True])
def test_the_ascent_gradients_live_in_the_backup_buffers_and_the_descent_holds_none(tmp_path, adaptive):
    args = sgd_args(str(tmp_path), sam_rho=0.05, sam_adaptive=adaptive, max_steps=3)
    trainer = _GradientLog(model=ToyClassifier(), args=args, train_dataset=toy_dataset())
    trainer.train()
    buffers = [b.data_ptr() for b in trainer._sam_backup]
    ascents, descents = trainer.forward_grads[0::2], trainer.forward_grads[1::2]
    assert len(ascents) == len(descents) == 3
    # the same buffers, allocated once, receive every step's ascent gradient ...
    assert all(ptrs == buffers for ptrs in ascents)
    # ... and no gradient set is alive through the descent forward (peak memory as a plain step + backup)
    assert all(ptr is None for ptrs in descents for ptr in ptrs)


def _train_with_scaler(tmp_path, init_scale, **overrides):
    """fp16 with loss scaling on CPU: Accelerate uses no GradScaler there, so give it a real one."""
    args = sgd_args(str(tmp_path), fp16=True, max_steps=STEPS, num_train_epochs=10, **overrides)
    trainer = SAMTrainer(model=ToyClassifier(), args=args, train_dataset=toy_dataset())
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=10**6)
    trainer.accelerator.native_amp = True
    trainer.train()
    return trainer.model.state_dict()


@pytest.mark.parametrize("mode", ["periodic", "looksam"])
def test_cheap_modes_are_invariant_to_the_fp16_loss_scale(tmp_path, mode):
    common = dict(sam_rho=0.5, sam_mode=mode, sam_interval=2, max_grad_norm=1.0, gradient_accumulation_steps=2)
    low = _train_with_scaler(tmp_path / "low", 2.0**2, **common)
    high = _train_with_scaler(tmp_path / "high", 2.0**10, **common)
    for name, value in low.items():
        torch.testing.assert_close(value, high[name], atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("mode", ["periodic", "looksam"])
def test_cheap_modes_train_under_bf16_autocast(tmp_path, mode):
    trainer = _train(
        tmp_path, sam_rho=0.05, sam_mode=mode, sam_interval=2, bf16=True, optim="adamw_torch", learning_rate=3e-2,
        max_steps=24, per_device_train_batch_size=8, num_train_epochs=100,
    )
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.parametrize("mode", ["periodic", "looksam"])
def test_cheap_modes_with_peft_change_only_the_adapters(tmp_path, mode):
    from peft import LoraConfig, get_peft_model

    base = ToyClassifier()
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"]))
    trainer = _train(tmp_path, model=model, sam_rho=0.5, sam_mode=mode, sam_interval=2, optim="adamw_torch",
                     learning_rate=1e-2)
    assert all("lora_" in n for n, _ in trainer._sam_parameters())
    assert trainer._looksam_u is None or len(trainer._looksam_u) == len(trainer._sam_trainable)
    state = model.state_dict()
    assert any("lora_B" in k and state[k].abs().sum() > 0 for k in state), "the LoRA adapters did not train"
    for key, value in frozen.items():
        peft_key = f"base_model.model.{key}".replace("fc1.", "fc1.base_layer.").replace("fc2.", "fc2.base_layer.")
        assert torch.equal(state[peft_key], value), key


class _CountedToy(ToyClassifier):
    """The Trainer counts FLOPs only for models with ``main_input_name`` and ``num_parameters``."""

    main_input_name = "x"

    def num_parameters(self, exclude_embeddings=True):
        return sum(p.numel() for p in self.parameters())


def test_flops_count_two_passes_only_on_sam_steps(tmp_path):
    periodic = _train(tmp_path / "p", _CountedToy(), sam_rho=0.05, sam_mode="periodic", sam_interval=2, max_steps=4)
    full = _train(tmp_path / "f", _CountedToy(), sam_rho=0.05, max_steps=4)
    plain = _train(tmp_path / "n", _CountedToy(), sam_rho=0.0, max_steps=4)
    assert plain.state.total_flos > 0
    assert full.state.total_flos == 2 * plain.state.total_flos
    assert periodic.state.total_flos == pytest.approx(1.5 * plain.state.total_flos)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"sam_mode": "esam"}, "sam_mode"),
        ({"sam_mode": "periodic", "sam_interval": 0}, "sam_interval"),
        ({"sam_interval": 5}, "periodic"),
        ({"sam_mode": "looksam", "sam_looksam_alpha": -0.1}, "sam_looksam_alpha"),
        ({"sam_include": ["[norm"]}, "sam_include"),
    ],
)
def test_bad_mode_arguments_raise_clear_errors(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        SAMTrainingArguments(output_dir=str(tmp_path), report_to="none", **bad)


def test_mode_arguments_parse_from_the_command_line():
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(SAMTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", "x", "--sam_mode", "looksam", "--sam_interval", "5", "--sam_looksam_alpha", "0.5",
         "--sam_include", "norm", "--report_to", "none"]
    )
    assert (args.sam_mode, args.sam_interval, args.sam_looksam_alpha, args.sam_include) == ("looksam", 5, 0.5, ["norm"])
