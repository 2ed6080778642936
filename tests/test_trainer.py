"""SAMTrainer against a hand-written SAM/ASAM reference, and its guarantees."""

import copy

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from saft_hf import SAMTrainer, SAMTrainingArguments
from tests.sam_toy import ToyClassifier, micro_batches, reference_sam, sgd_args, toy_dataset


def _train(tmp_path, trainer_cls=SAMTrainer, model=None, **overrides):
    model = model or ToyClassifier()
    trainer = trainer_cls(model=model, args=sgd_args(str(tmp_path), **overrides), train_dataset=toy_dataset())
    trainer.train()
    return trainer


def _assert_same_weights(model, expected, atol=1e-6):
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[name], atol=atol, rtol=0, msg=f"parameter {name}")


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("adaptive", [False, True])
def test_trainer_matches_hand_written_reference(tmp_path, accumulation, adaptive):
    rho = 0.5 if adaptive else 0.05
    trainer = _train(tmp_path, gradient_accumulation_steps=accumulation, sam_rho=rho, sam_adaptive=adaptive)
    expected = reference_sam(
        ToyClassifier(),
        micro_batches(toy_dataset(), 4),
        steps=4,
        accumulation=accumulation,
        rho=rho,
        lr=0.1,
        adaptive=adaptive,
    )
    _assert_same_weights(trainer.model, expected)


class _LeakyAccumulationTrainer(SAMTrainer):
    """Broken on purpose: does not set aside gradients of earlier micro-batches before the ascent."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        named = self._sam_parameters()
        params = [p for _, p in named]
        before = [None if p.grad is None else p.grad.clone() for p in params]
        self._ascent(model, inputs, num_items_in_batch)
        grads = [p.grad.clone() for p in params]  # ascent grad polluted by earlier micro-batches
        for p, b in zip(params, before):
            p.grad = b
        from saft_hf import sam

        backup, _ = sam.first_step(params, grads, self.args.sam_rho)
        loss = Trainer.training_step(self, model, inputs, num_items_in_batch)
        sam.second_step(params, backup)
        return loss


def test_reference_comparison_catches_an_ascent_that_leaks_accumulated_gradients(tmp_path):
    trainer = _train(tmp_path, trainer_cls=_LeakyAccumulationTrainer, gradient_accumulation_steps=2, sam_rho=0.5)
    expected = reference_sam(
        ToyClassifier(), micro_batches(toy_dataset(), 4), steps=4, accumulation=2, rho=0.5, lr=0.1
    )
    with pytest.raises(AssertionError):
        _assert_same_weights(trainer.model, expected)


def test_rho_zero_gives_the_same_weights_as_plain_trainer(tmp_path):
    sam_run = _train(tmp_path / "sam", sam_rho=0.0, optim="adamw_torch", learning_rate=1e-2)
    plain_args = sgd_args(str(tmp_path / "plain"), TrainingArguments, optim="adamw_torch", learning_rate=1e-2)
    plain = Trainer(model=ToyClassifier(), args=plain_args, train_dataset=toy_dataset())
    plain.train()
    for name, value in plain.model.state_dict().items():
        assert torch.equal(sam_run.model.state_dict()[name], value), name


class _WeightsAtStepBegin(TrainerCallback):
    """Records whether the weights at the optimizer step equal those at step begin."""

    def __init__(self, model):
        self.model, self.snapshot, self.checked = model, None, 0

    def on_step_begin(self, args, state, control, **kwargs):
        self.snapshot = copy.deepcopy(self.model.state_dict())

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for name, value in self.model.state_dict().items():
            assert torch.equal(value, self.snapshot[name]), f"{name} not restored before the optimizer step"
        self.checked += 1


@pytest.mark.parametrize("adaptive", [False, True])
def test_weights_are_restored_bitwise_before_each_optimizer_step(tmp_path, adaptive):
    model = ToyClassifier()
    watcher = _WeightsAtStepBegin(model)
    args = sgd_args(str(tmp_path), sam_rho=0.5, sam_adaptive=adaptive, gradient_accumulation_steps=2)
    trainer = SAMTrainer(model=model, args=args, train_dataset=toy_dataset(), callbacks=[watcher])
    trainer.train()
    assert watcher.checked == 4


def test_learning_rate_zero_never_changes_the_weights(tmp_path):
    before = ToyClassifier().state_dict()
    trainer = _train(tmp_path, sam_rho=0.5, sam_adaptive=True, optim="adamw_torch", learning_rate=0.0)
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_sharpness_and_skips_are_logged_like_trainer_metrics(tmp_path):
    trainer = _train(tmp_path, sam_rho=0.05)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4
    assert all("sam_sharpness" in e and e["sam_skipped"] == 0 for e in logs)
    # An ascent step along the gradient raises the loss on its own micro-batch.
    assert all(e["sam_sharpness"] > 0 for e in logs)


class _OverflowOnSecondStep(ToyClassifier):
    """Its loss is inf on the second call of every four (the ascent of step 2)."""

    calls = 0

    def forward(self, x, labels=None):
        out = super().forward(x, labels)
        type(self).calls += 1
        if type(self).calls == 3 and out.loss is not None:
            out.loss = out.loss * float("inf")
        return out


def test_an_overflowing_ascent_skips_the_perturbation_and_keeps_weights_finite(tmp_path):
    trainer = _train(tmp_path, model=_OverflowOnSecondStep(), sam_rho=0.05)
    skipped = sum(e.get("sam_skipped", 0) for e in trainer.state.log_history)
    assert skipped == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_excluded_parameters_are_trained_but_not_perturbed(tmp_path):
    trainer = _train(tmp_path, sam_rho=0.05, sam_exclude=["bias", r"^norm\."])
    names = [n for n, _ in trainer._sam_parameters()]
    assert names == ["fc1.weight", "fc2.weight"]


def test_bf16_autocast_on_cpu_trains(tmp_path):
    trainer = _train(
        tmp_path, sam_rho=0.05, bf16=True, optim="adamw_torch", learning_rate=3e-2, max_steps=24,
        per_device_train_batch_size=8, num_train_epochs=100,
    )
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4


def test_peft_lora_changes_only_the_adapters(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = ToyClassifier()
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"]))
    trainer = _train(tmp_path, model=model, sam_rho=0.5, sam_adaptive=True, optim="adamw_torch", learning_rate=1e-2)
    perturbed = [n for n, _ in trainer._sam_parameters()]
    assert perturbed and all("lora_" in n for n in perturbed)
    state = model.state_dict()
    changed = [k for k in state if "lora_B" in k and not torch.equal(state[k], torch.zeros_like(state[k]))]
    assert changed, "the LoRA adapters did not train"
    for key, value in frozen.items():
        peft_key = f"base_model.model.{key}".replace("fc1.", "fc1.base_layer.").replace("fc2.", "fc2.base_layer.")
        assert torch.equal(state[peft_key], value), key


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"sam_rho": -0.1}, "sam_rho"),
        ({"sam_rho": float("nan")}, "sam_rho"),
        ({"sam_eta": -1.0}, "sam_eta"),
        ({"sam_ascent": "everywhere"}, "sam_ascent"),
        ({"sam_adaptive_scope": "biases"}, "sam_adaptive_scope"),
        ({"sam_exclude": ["("]}, "sam_exclude"),
    ],
)
def test_bad_arguments_raise_clear_errors(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        SAMTrainingArguments(output_dir=str(tmp_path), report_to="none", **bad)


def test_arguments_parse_from_the_command_line():
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(SAMTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", "x", "--sam_rho", "0.5", "--sam_adaptive", "--sam_exclude", "bias", "norm",
         "--sam_ascent", "global", "--report_to", "none"]
    )
    assert (args.sam_rho, args.sam_adaptive, args.sam_exclude, args.sam_ascent) == (0.5, True, ["bias", "norm"], "global")


def test_trainer_refuses_plain_training_arguments(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(TypeError, match="SAMTrainingArguments"):
        SAMTrainer(model=ToyClassifier(), args=args, train_dataset=toy_dataset())


def test_lomo_optimizers_are_refused(tmp_path):
    with pytest.raises(ValueError, match="lomo"):
        SAMTrainer(model=ToyClassifier(), args=sgd_args(str(tmp_path), optim="lomo"), train_dataset=toy_dataset())


def test_gradient_checkpointing_gives_the_same_sam_update(tmp_path):
    from tests.sam_toy import TinyCLIPClassifier, image_dataset

    def run(checkpointing: bool, out: str):
        model = TinyCLIPClassifier()
        if checkpointing:
            model.tower.activation_checkpointing_enable()
        args = sgd_args(out, sam_rho=0.5, sam_adaptive=True, max_steps=3, gradient_accumulation_steps=2,
                        per_device_train_batch_size=2)
        trainer = SAMTrainer(model=model, args=args, train_dataset=image_dataset())
        trainer.train()
        return trainer.model.state_dict()

    plain, checkpointed = run(False, str(tmp_path / "a")), run(True, str(tmp_path / "b"))
    assert not torch.equal(plain["tower.visual_projection.weight"], TinyCLIPClassifier().state_dict()[
        "tower.visual_projection.weight"])
    _assert_same_weights_dict(checkpointed, plain)


def _assert_same_weights_dict(actual, expected, atol=1e-6):
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, atol=atol, rtol=0, msg=f"parameter {name}")


def _train_with_scaler(tmp_path, init_scale, **overrides):
    """fp16 with loss scaling on CPU: Accelerate uses no GradScaler there, so give it a real one."""
    args = sgd_args(str(tmp_path), fp16=True, **overrides)
    trainer = SAMTrainer(model=ToyClassifier(), args=args, train_dataset=toy_dataset())
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=10**6)
    trainer.accelerator.native_amp = True
    trainer.train()
    return trainer


def test_ascent_is_invariant_to_the_fp16_loss_scale(tmp_path):
    # eps = rho g / ||g|| does not depend on the loss scale (the ascent grads are left scaled), and
    # gradient clipping still unscales exactly once without raising.
    common = dict(sam_rho=0.05, max_grad_norm=1.0, gradient_accumulation_steps=2)
    low = _train_with_scaler(tmp_path / "low", 2.0**2, **common).model.state_dict()
    high = _train_with_scaler(tmp_path / "high", 2.0**10, **common).model.state_dict()
    for name, value in low.items():
        assert torch.equal(value, high[name]), name
    plain = _train_with_scaler(tmp_path / "plain", 2.0**2, **{**common, "sam_rho": 0.0}).model.state_dict()
    assert not torch.equal(plain["fc1.weight"], low["fc1.weight"]), "SAM had no effect under fp16"


def test_loss_scale_overflow_skips_the_perturbation_and_never_corrupts_weights(tmp_path):
    trainer = _train_with_scaler(tmp_path, 2.0**126, sam_rho=0.05, max_grad_norm=1.0, max_steps=6)
    assert sum(e.get("sam_skipped", 0) for e in trainer.state.log_history) >= 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert trainer.accelerator.scaler.get_scale() < 2.0**126  # the scaler saw the overflow and backed off


@pytest.mark.parametrize("flag, name", [("is_fsdp_enabled", "FSDP"), ("is_deepspeed_enabled", "DeepSpeed")])
def test_sharded_backends_are_refused_with_a_way_out(tmp_path, monkeypatch, flag, name):
    # FSDP/DeepSpeed need a launcher and GPUs; fake the plugin flag Trainer derives from the accelerator.
    original = Trainer.create_accelerator_and_postprocess

    def with_plugin(self):
        original(self)
        setattr(self, flag, True)

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", with_plugin)
    with pytest.raises(ValueError, match=f"does not support {name}") as error:
        SAMTrainer(model=ToyClassifier(), args=sgd_args(str(tmp_path)), train_dataset=toy_dataset())
    assert "sam_rho=0" in str(error.value) and "--multi_gpu" in str(error.value)
    # the same backend with SAM off is a plain Trainer run and is allowed
    SAMTrainer(model=ToyClassifier(), args=sgd_args(str(tmp_path), sam_rho=0.0), train_dataset=toy_dataset())
