"""`SAMTrainer`: a `transformers.Trainer` whose `training_step` does the SAM/ASAM two-pass update.

Only the HF glue lives here; the ascent math is in :mod:`saft_hf.sam`. The optimizer step, gradient
clipping, LR schedule, gradient accumulation, mixed precision and logging stay the Trainer's own.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.training_args import OptimizerNames

from . import sam
from .authors_loop import AuthorsLoopMixin

__all__ = ["SAMTrainer", "SAMTrainingArguments"]

_ASCENT_MODES = ("local", "global")
_ADAPTIVE_SCOPES = ("weights", "all")
_SAM_MODES = ("sam", "periodic", "looksam")
_SAM_LOOPS = ("clean", "authors")


@dataclass
class SAMTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the sharpness-aware minimisation settings (SAM / ASAM)."""

    sam_rho: float = field(
        default=0.05,
        metadata={
            "help": "Radius rho of the ascent step. 0 disables SAM (identical to a plain Trainer run). "
            "SAM: 0.05 is usual; ASAM (--sam_adaptive): the SAFT paper uses 0.5."
        },
    )
    sam_adaptive: bool = field(
        default=False,
        metadata={"help": "Use adaptive SAM (ASAM, Kwon et al. 2021): eps = rho T^2 g / ||T g||, T = |w| + eta."},
    )
    sam_eta: float = field(
        default=0.01,
        metadata={"help": "ASAM's eta in T = |w| + eta (0 reproduces the SAFT paper's code)."},
    )
    sam_adaptive_scope: str = field(
        default="weights",
        metadata={
            "help": "Which parameters ASAM rescales by |w| + eta: 'weights' (names ending in 'weight', as "
            "the ASAM authors' code; T = 1 for biases) or 'all' (as the SAFT paper's code).",
            "choices": list(_ADAPTIVE_SCOPES),
        },
    )
    sam_ascent: str = field(
        default="local",
        metadata={
            "help": "'local': each process perturbs with its own micro-batch gradient (the original SAM's "
            "m-sharpness, no communication); 'global': the ascent gradient is averaged across processes.",
            "choices": list(_ASCENT_MODES),
        },
    )
    sam_exclude: list[str] | None = field(
        default=None,
        metadata={
            "help": "Regular expressions: trainable parameters whose name matches one (re.search) are "
            "trained but never perturbed, e.g. 'bias' 'layer_norm'. Applied after --sam_include.",
        },
    )
    sam_include: list[str] | None = field(
        default=None,
        metadata={
            "help": "Regular expressions: perturb only the trainable parameters whose name matches one "
            "(re.search); all are still trained, and the ascent norm is taken over these only. 'norm' "
            "selects CLIP's LayerNorms (pre_layrnorm, layer_norm1/2, post_layernorm): SAM-ON (Mueller et al., "
            "NeurIPS 2023, 'Normalization Layers Are All That Sharpness-Aware Minimization Needs'). Default: all.",
        },
    )
    sam_mode: str = field(
        default="sam",
        metadata={
            "help": "'sam': an ascent on every step (Foret et al. 2021). 'periodic': the two-pass SAM step on "
            "every --sam_interval-th optimizer step (steps 0, k, 2k, ...) and a plain one-pass step otherwise, "
            "the fixed-period 'SAM-k' of Liu et al. (CVPR 2022). 'looksam': LookSAM (Liu et al., CVPR 2022, "
            "'Towards Efficient and Scalable Sharpness-Aware Minimization'): the SAM step every k-th step keeps "
            "the part g_v of the SAM gradient orthogonal to the plain gradient g; the steps in between cost one "
            "pass and descend along g + alpha ||g||/||g_v|| g_v. Under accumulation and DDP g and g_s are the "
            "step's gradients over all micro-batches and processes; a resumed run starts with a SAM step. "
            "Refused: 'sam' with --sam_interval > 1 (say 'periodic'); FSDP and DeepSpeed as for SAM.",
            "choices": list(_SAM_MODES),
        },
    )
    sam_interval: int = field(
        default=1,
        metadata={"help": "k for --sam_mode periodic/looksam: one SAM step every k optimizer steps (1 = every step)."},
    )
    sam_looksam_alpha: float = field(
        default=0.7,
        metadata={"help": "LookSAM's alpha, the weight of the reused g_v (Liu et al., CVPR 2022; 0.7 as there)."},
    )

    sam_loop: str = field(
        default="clean",
        metadata={
            "help": "'clean': the Trainer's loop (gradients zeroed after every step, the descent gradient clipped "
            "to --max_grad_norm, no weight decay on biases/LayerNorms). 'authors': the SAFT paper's released "
            "code (BAIKLAB/SAFT-Merge finetune.py): gradients never zeroed (standard: a running sum, clipped in "
            "place; SAM/ASAM: each step's descent gradient carried into the next ascent), the clip before the "
            "ascent only, weight decay on every parameter, micro-batch losses summed. The carried gradient is "
            "saved in checkpoints. --sam_mode sam only; no fp16, DeepSpeed or FSDP.",
            "choices": list(_SAM_LOOPS),
        },
    )

    def __post_init__(self) -> None:
        if self.sam_loop not in _SAM_LOOPS:
            raise ValueError(f"sam_loop must be one of {_SAM_LOOPS}, got {self.sam_loop!r}.")
        if self.sam_loop == "authors" and self.sam_mode != "sam":
            raise ValueError(
                f"sam_loop='authors' reproduces the authors' SAM step on every step; sam_mode={self.sam_mode!r} "
                "is not part of it (use sam_loop='clean' for the cheap modes)."
            )
        if not math.isfinite(self.sam_rho) or self.sam_rho < 0:
            raise ValueError(f"sam_rho must be a finite number >= 0 (0 disables SAM), got {self.sam_rho!r}.")
        if not math.isfinite(self.sam_eta) or self.sam_eta < 0:
            raise ValueError(f"sam_eta must be a finite number >= 0, got {self.sam_eta!r}.")
        if self.sam_ascent not in _ASCENT_MODES:
            raise ValueError(f"sam_ascent must be one of {_ASCENT_MODES}, got {self.sam_ascent!r}.")
        if self.sam_adaptive_scope not in _ADAPTIVE_SCOPES:
            raise ValueError(
                f"sam_adaptive_scope must be one of {_ADAPTIVE_SCOPES}, got {self.sam_adaptive_scope!r}."
            )
        if self.sam_mode not in _SAM_MODES:
            raise ValueError(f"sam_mode must be one of {_SAM_MODES}, got {self.sam_mode!r}.")
        if isinstance(self.sam_interval, bool) or not isinstance(self.sam_interval, int) or self.sam_interval < 1:
            raise ValueError(f"sam_interval must be an integer >= 1 (steps between SAM steps), got {self.sam_interval!r}.")
        if self.sam_mode == "sam" and self.sam_interval != 1:
            raise ValueError(
                f"sam_interval={self.sam_interval} needs sam_mode 'periodic' or 'looksam'; 'sam' ascends on every step."
            )
        if not math.isfinite(self.sam_looksam_alpha) or self.sam_looksam_alpha < 0:
            raise ValueError(f"sam_looksam_alpha must be a finite number >= 0, got {self.sam_looksam_alpha!r}.")
        for name in ("sam_exclude", "sam_include"):
            patterns = getattr(self, name)
            if isinstance(patterns, str):
                patterns = [patterns]
                setattr(self, name, patterns)
            for pattern in patterns or []:
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"{name} pattern {pattern!r} is not a valid regular expression: {err}") from err
        super().__post_init__()


class SAMTrainer(AuthorsLoopMixin, Trainer):
    """Trainer whose `training_step` does SAM/ASAM: ascent at w, descent at w + eps, restore w.

    Logged with the Trainer's metrics: ``sam_sharpness`` (mean L(w + eps) - L(w) over the
    micro-batches since the last log), ``sam_ascent_norm`` and ``sam_skipped`` (perturbations skipped
    because the ascent gradient norm was zero or not finite, e.g. an fp16 overflow).
    """

    args: SAMTrainingArguments

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, SAMTrainingArguments):
            raise TypeError(
                f"SAMTrainer needs SAMTrainingArguments, got {type(self.args).__name__}; "
                "build the arguments with saft_hf.SAMTrainingArguments(...)."
            )
        self._check_supported()
        self._authors_init()  # sam_loop='authors': the released code's loop (saft_hf/authors_loop.py)
        self._sam_named_params: list[tuple[str, nn.Parameter]] | None = None
        self._sam_trainable: list[nn.Parameter] = []
        self._sam_adaptive: list[bool] | None = None
        self._sam_backup: list[torch.Tensor] | None = None
        self._sam_loss: torch.Tensor | None = None
        self._looksam_u: list[torch.Tensor] | None = None  # accumulates g on a SAM step, then holds g_v/||g_v||
        self._looksam_ready = False
        self._looksam_step = -1  # the optimizer step whose ascent gradients the buffer holds
        self._sam_stats: dict[str, Any] = {"sharpness": 0.0, "norm": 0.0, "steps": 0, "skipped": 0}

    @property
    def sam_enabled(self) -> bool:
        return self.args.sam_rho > 0

    def _check_supported(self) -> None:
        """Refuse setups where the two-pass update would be silently wrong."""
        if not self.sam_enabled:
            return
        if self.is_deepspeed_enabled:
            raise ValueError(
                "SAMTrainer does not support DeepSpeed: its backward steps the engine at the accumulation "
                "boundary and ZeRO>=2 ignores no_sync, so the ascent pass would update the weights. Use DDP "
                "(accelerate launch --multi_gpu) or set sam_rho=0."
            )
        if self.is_fsdp_enabled:
            raise ValueError(
                "SAMTrainer does not support FSDP yet: the ascent norm over sharded gradients needs a "
                "cross-rank reduction this trainer does not do. Use DDP (accelerate launch --multi_gpu) "
                "or set sam_rho=0."
            )
        if self.args.optim in (OptimizerNames.LOMO, OptimizerNames.ADALOMO):
            raise ValueError(
                f"optim={self.args.optim!r} updates weights inside backward, which SAM's restore cannot undo; "
                "choose another optimizer (e.g. adamw_torch)."
            )

    def _sam_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Trainable parameters to perturb (sam_include, then sam_exclude; PEFT: the adapters), in a stable order."""
        if self._sam_named_params is None:
            trainable = [(name, param) for name, param in self.model.named_parameters() if param.requires_grad]
            chosen = sam.select([n for n, _ in trainable], self.args.sam_include, self.args.sam_exclude)
            named = [pair for pair, keep in zip(trainable, chosen, strict=True) if keep]
            if not named:
                raise ValueError(
                    "SAMTrainer found no parameter to perturb: none requires grad, or sam_include "
                    f"({self.args.sam_include}) matches none / sam_exclude ({self.args.sam_exclude}) matches all "
                    f"of them. Trainable parameters start with: {[n for n, _ in trainable[:5]]}."
                )
            self._sam_named_params = named
            if self.args.sam_adaptive:
                self._sam_adaptive = sam.adaptive_mask([n for n, _ in named], self.args.sam_adaptive_scope)
            self._sam_trainable = [p for _, p in trainable]
        return self._sam_named_params

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        """The parent's loss; remembers its value so both passes' losses can be compared."""
        result = super().compute_loss(model, inputs, *args, **kwargs)
        loss = result[0] if isinstance(result, tuple) else result
        self._sam_loss = loss.detach().float().mean()
        return result

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        if self.authors_loop:
            return self._authors_training_step(model, inputs)
        if not self.sam_enabled:
            return super().training_step(model, inputs, num_items_in_batch)
        looksam = self.args.sam_mode == "looksam"
        if self._ascent_due():
            loss = self._sam_step(model, inputs, num_items_in_batch, keep_ascent=looksam)
            if looksam and self.accelerator.sync_gradients:
                self._looksam_refresh()
            return loss
        # periodic / LookSAM between SAM steps: one plain pass.
        loss = super().training_step(model, inputs, num_items_in_batch)
        if looksam and self.accelerator.sync_gradients:  # the step's gradient is complete (and all-reduced)
            sam.looksam_reuse([p.grad for p in self._sam_trainable], self._looksam_u, self.args.sam_looksam_alpha)
        return loss

    def _ascent_due(self) -> bool:
        """Whether this optimizer step is a two-pass SAM step (the same answer on every rank and micro-batch)."""
        mode, k = self.args.sam_mode, self.args.sam_interval
        if mode == "sam":
            return True
        if mode == "looksam" and not self._looksam_ready:  # no g_v yet (first step, resumed run, degenerate g_v)
            return True
        # Fixed period, as LookSAM and the SAM-k baseline of Liu et al. (CVPR 2022): steps 0, k, 2k, ...
        # (the randomised schedule of Zhao et al. 2022, "Randomized Sharpness-Aware Training", is not this).
        return self.state.global_step % k == 0

    def _sam_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None,
        keep_ascent: bool = False,
    ) -> torch.Tensor:
        """One micro-batch of SAM/ASAM: ascent at w, descent at w + eps, restore w."""
        named = self._sam_parameters()
        params = [p for _, p in named]
        trainable = self._sam_trainable

        # 1. Set aside gradients accumulated by earlier micro-batches: the ascent needs this
        #    micro-batch's gradient alone, and the accumulated ones must come out untouched.
        accumulated = [p.grad for p in trainable]
        for p in trainable:
            p.grad = None
        # The perturbed parameters' ascent gradients accumulate into the backup buffers (kept across
        # steps), which then take the copy of w: SAM allocates no gradient set of its own per step, and
        # holds no more memory than the backup it needs anyway.
        buffers = self._backup_buffers(params)
        torch._foreach_zero_(buffers)
        for p, buffer in zip(params, buffers, strict=True):
            p.grad = buffer

        # 2. Ascent pass at w, without DDP's all-reduce (forward and backward both inside no_sync).
        ascent_loss = self._ascent(model, inputs, num_items_in_batch)
        if self.args.sam_ascent == "global":
            self._all_reduce_mean(params)
        if keep_ascent:  # LookSAM: sum the plain gradients g of the step's micro-batches
            self._looksam_accumulate(trainable)

        # 3. w -> w + eps (fp32 norm; skipped when zero/inf/nan, the same on every rank in 'global');
        #    each buffer's gradient is consumed and replaced by its weight's copy.
        backup, norm = sam.first_step(
            params, buffers, self.args.sam_rho, self._sam_adaptive, self.args.sam_eta, backup=buffers
        )

        # 4. Put the accumulated gradients back before the descent, so DDP all-reduces them with it
        #    (None on the first micro-batch: the descent's gradients are allocated as a plain step's are).
        for p, grad in zip(trainable, accumulated, strict=True):
            p.grad = grad
        del accumulated

        # 5. Descent through the parent: same loss scaling, num_items_in_batch, GradScaler, backward.
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            # 6. Restore w bitwise before the optimizer step.
            if backup is not None:
                sam.second_step(params, backup)
        self._record(ascent_loss, self._sam_loss, norm, skipped=backup is None)
        return loss

    def _looksam_accumulate(self, trainable: list[nn.Parameter]) -> None:
        """Add this micro-batch's ascent gradient g into the buffer that later holds g_v (one buffer for both)."""
        if self._looksam_u is None:
            self._looksam_u = [torch.zeros_like(p, requires_grad=False) for p in trainable]
        elif self._looksam_step != self.state.global_step:  # first micro-batch of this SAM step: drop the old g_v
            torch._foreach_zero_(self._looksam_u)
        self._looksam_step = self.state.global_step
        self._looksam_ready = False
        for buf, p in zip(self._looksam_u, trainable, strict=True):
            if p.grad is not None:
                buf.add_(p.grad)

    def _looksam_refresh(self) -> None:
        """End of a LookSAM SAM step: g_v from the step's g (averaged over processes) and g_s (the .grad)."""
        buffers = self._looksam_u
        if buffers is None:
            return
        self._all_reduce_mean_tensors(buffers)  # g must be the same on every rank, as g_s already is
        norm = sam.looksam_direction([p.grad for p in self._sam_trainable], buffers)
        self._looksam_ready = norm is not None

    def _backup_buffers(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        """One buffer per perturbed weight, allocated once: the ascent gradient, then the copy of w."""
        buffers = self._sam_backup
        if buffers is None or len(buffers) != len(params) or any(
            b.shape != p.shape or b.dtype != p.dtype or b.device != p.device for b, p in zip(buffers, params)
        ):
            buffers = self._sam_backup = [torch.empty_like(p, requires_grad=False) for p in params]
        return buffers

    def _ascent(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None
    ) -> torch.Tensor | None:
        """Forward and backward at w on this micro-batch; returns the (unscaled) loss value."""
        model.train()
        ascent_inputs = self._prepare_inputs(dict(inputs))  # compute_loss pops labels: use a copy
        with self.accelerator.no_sync(model), self.compute_loss_context_manager():
            loss = self.compute_loss(model, ascent_inputs, num_items_in_batch=num_items_in_batch)
            if self.args.n_gpu > 1:
                loss = loss.mean()
            # Through accelerator.backward so fp16 uses the GradScaler: eps = rho g/||g|| is
            # invariant to the scale, and an overflow shows up as a non-finite norm (skipped).
            self.accelerator.backward(loss)
        return self._sam_loss

    def _all_reduce_mean(self, params: list[nn.Parameter]) -> None:
        """'global' ascent: average the ascent gradient over processes (one flat all-reduce)."""
        if not self._distributed():
            return
        for p in params:  # every rank must take part in the collective with the same layout
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self._all_reduce_mean_tensors([p.grad for p in params])

    @staticmethod
    def _distributed() -> bool:
        return (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        )

    def _all_reduce_mean_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Average ``tensors`` in place over processes with one flat all-reduce (no-op in one process)."""
        if not self._distributed():
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        torch.distributed.all_reduce(flat)
        flat.div_(torch.distributed.get_world_size())
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n

    def _record(
        self, ascent_loss: torch.Tensor | None, descent_loss: torch.Tensor | None, norm: torch.Tensor, skipped: bool
    ) -> None:
        stats = self._sam_stats
        if skipped:
            stats["skipped"] += 1
            return
        if ascent_loss is not None and descent_loss is not None:
            # kept as tensors: no device sync per step
            stats["sharpness"] = stats["sharpness"] + (descent_loss - ascent_loss).double()
            stats["norm"] = stats["norm"] + norm.double().to(descent_loss.device)
            stats["steps"] += 1

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the SAM metrics to each training log (averaged over processes)."""
        if self.sam_enabled and "loss" in logs:
            stats = self._sam_stats
            totals = torch.stack(
                [
                    torch.as_tensor(stats[key], dtype=torch.float64).to(self.args.device)
                    for key in ("sharpness", "norm", "steps", "skipped")
                ]
            )
            totals = self.accelerator.reduce(totals, reduction="sum")
            sharpness, norm, steps, skipped = totals.tolist()
            if steps:
                logs["sam_sharpness"] = sharpness / steps
                logs["sam_ascent_norm"] = norm / steps
            logs["sam_skipped"] = int(skipped)
            self._sam_stats = {"sharpness": 0.0, "norm": 0.0, "steps": 0, "skipped": 0}
        super().log(logs, *args, **kwargs)

    def floating_point_ops(self, inputs: dict[str, torch.Tensor | Any]) -> int:
        """Two forward/backward passes per micro-batch on a SAM step, one otherwise."""
        flops = super().floating_point_ops(inputs)
        # Called after training_step, before global_step advances: the schedule still answers for this step.
        return 2 * flops if self.sam_enabled and self._ascent_due() else flops
