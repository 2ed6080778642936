"""The SAFT authors' released training loop as Trainer glue (``SAMTrainingArguments.sam_loop="authors"``).

Read from BAIKLAB/SAFT-Merge, ``sgd_saft/src/finetune.py`` and ``sam.py`` (the same in ``linearized_saft/``):

- Q1: gradients are never zeroed. Standard fine-tuning: ``loss.backward()`` every micro-batch, then
  ``clip_grad_norm_(params, 1.0)`` in place on the running sum and ``AdamW.step()``; the clipped sum stays in
  ``.grad`` and the next step's gradients are added to it. SAM/ASAM: the same sum (carried + this step's
  micro-batches) gives the ascent, ``first_step(zero_grad=True)`` then clears it, the descent pass at
  w + eps runs on the step's *last* micro-batch, and ``second_step()`` steps without zeroing, so that
  descent gradient is carried into the next step's ascent.
- Q2: the clip comes before the ascent only; the descent gradient AdamW uses is not clipped.
- Q4: AdamW's weight decay on every parameter (biases and LayerNorms too).
- Micro-batch losses are summed, not averaged (their loop calls ``loss.backward()`` per micro-batch of
  32 for ViT-L/14 with 4-step accumulation): the Trainer's 1/accumulation scaling and
  ``num_items_in_batch`` are not used in this loop.

The Trainer zeroes gradients after every optimizer step; here a callback takes the gradients off the
parameters right after the step (before that zeroing) and the next step's first micro-batch puts them
back, so nothing is copied. They are part of the training state: a checkpoint saves them
(``CARRIED_GRADIENTS_NAME``) and a resumed run restores them.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainerCallback

from . import sam

CARRIED_GRADIENTS_NAME = "authors_carried_gradients.safetensors"


class _CarryGradients(TrainerCallback):
    """Right after each optimizer step (before the Trainer's zero_grad) take the gradients off the parameters."""

    def __init__(self, trainer: AuthorsLoopMixin) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._carry_gradients()


class AuthorsLoopMixin:
    """The pieces of `SAMTrainer` that run the authors' loop; inert unless ``args.sam_loop == "authors"``."""

    _carried: list[tuple[str, torch.Tensor | None]] | None = None
    _authors_ascent_norm: torch.Tensor | None = None

    @property
    def authors_loop(self) -> bool:
        return getattr(self.args, "sam_loop", "clean") == "authors"

    def _authors_init(self) -> None:
        if not self.authors_loop:
            return
        if self.args.fp16:
            raise ValueError(
                "sam_loop='authors' does not support fp16: the carried gradient would mix GradScaler scales from "
                "step to step. The authors trained in fp32; drop --fp16 (bf16 autocast works) or use sam_loop='clean'."
            )
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                "sam_loop='authors' needs the gradients on the parameters between steps, which DeepSpeed and FSDP "
                "shard or free; use DDP (accelerate launch --multi_gpu) or sam_loop='clean'."
            )
        self.add_callback(_CarryGradients(self))

    def _trainable_named(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    # --- Q1: the carried gradient -------------------------------------------------------------------
    def _carry_gradients(self) -> None:
        """Take .grad off every trainable parameter (no copy) so the Trainer's zero_grad leaves it alone."""
        carried = []
        for name, p in self._trainable_named():
            carried.append((name, p.grad))
            p.grad = None
        self._carried = carried

    def _restore_carried(self) -> None:
        """First micro-batch after an optimizer step: the carried gradient goes back into .grad."""
        if self._carried is None:
            return
        params = dict(self._trainable_named())
        for name, grad in self._carried:
            p = params[name]
            if grad is not None:
                p.grad = grad if p.grad is None else p.grad.add_(grad)
        self._carried = None

    # --- the step -----------------------------------------------------------------------------------
    def _plain_backward(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """The parent's forward/backward with the micro-batch's mean loss unscaled (summed over accumulation)."""
        steps = self.current_gradient_accumulation_steps
        self.current_gradient_accumulation_steps = 1
        try:
            return Trainer.training_step(self, model, inputs, None)
        finally:
            self.current_gradient_accumulation_steps = steps

    def _authors_training_step(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """One micro-batch of the authors' loop (standard fine-tuning when sam_rho = 0, SAM/ASAM otherwise)."""
        self._restore_carried()
        if not self.sam_enabled or not self.accelerator.sync_gradients:
            return self._plain_backward(model, inputs)  # loss.backward(), added to the running sum
        named = self._sam_parameters()
        params = [p for _, p in named]
        trainable = [p for _, p in self._trainable_named()]
        # The step's last micro-batch: its backward at w completes the ascent gradient
        # (carried + every micro-batch of the step), kept local under DDP as the clean loop's ascent is.
        ascent_loss = self._ascent(model, inputs, None)
        if self.args.sam_ascent == "global":
            self._all_reduce_mean(params)
        # Q2: the authors clip here, before the ascent (eps is normalised, so only the logged norm sees it).
        norm_before = torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])
        if self.args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, self.args.max_grad_norm)
        self._authors_ascent_norm = norm_before
        backup, norm = sam.first_step(
            params, [p.grad for p in params], self.args.sam_rho, self._sam_adaptive, self.args.sam_eta
        )
        for p in trainable:  # first_step(zero_grad=True): torch's zero_grad sets them to None
            p.grad = None
        try:
            loss = self._plain_backward(model, inputs)  # the descent on this micro-batch alone (synced under DDP)
        finally:
            if backup is not None:
                sam.second_step(params, backup)
        self._record(ascent_loss, self._sam_loss, norm, skipped=backup is None)
        return loss

    # --- Trainer hooks ------------------------------------------------------------------------------
    def _clip_grad_norm(self, model: nn.Module) -> Any:
        """Q2: under SAM the descent gradient is not clipped (the clip came before the ascent)."""
        if self.authors_loop and self.sam_enabled:
            return self._authors_ascent_norm
        return super()._clip_grad_norm(model)

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """Q4: the authors' AdamW decays every parameter; the clean loop exempts biases and LayerNorms."""
        if self.authors_loop:
            return [name for name, _ in model.named_parameters()]
        return super().get_decay_parameter_names(model)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.authors_loop and self.args.should_save and self._carried is not None:
            tensors = {n: g.detach().contiguous() for n, g in self._carried if g is not None}
            save_file(tensors, os.path.join(output_dir, CARRIED_GRADIENTS_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or not self.authors_loop:
            return
        path = os.path.join(checkpoint, CARRIED_GRADIENTS_NAME)
        if not os.path.isfile(path):
            raise ValueError(
                f"checkpoint {checkpoint} has no {CARRIED_GRADIENTS_NAME}: it was not saved by a sam_loop='authors' "
                "run, and resuming without the carried gradient would not be the authors' loop; resume it with "
                "sam_loop='clean' or start the run afresh."
            )
        saved = load_file(path)
        self._carried = [
            (n, saved[n].to(device=p.device, dtype=p.dtype) if n in saved else None)
            for n, p in self._trainable_named()
        ]
