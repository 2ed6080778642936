"""AdaMerging (Yang et al., ICLR 2024): merging coefficients learned by entropy minimisation on unlabeled inputs.

θ = θ₀ + Σ_i λ_i^b τ_i^b, with one λ per task (``task``) or per task and parameter tensor (``layer``),
trained with Adam to minimise the Shannon entropy of each task's zero-shot head on that task's
unlabeled inputs. ``ties=True`` is AdaMerging++: the τ_i are first TIES-trimmed and sign-elected.

Not a pure tensor function (it needs a model and data), so it lives beside the λ search: the model
is loaded once, only λ is trained, and the weights are written into that model at the end. The
forward pass goes through ``torch.func.functional_call`` with ONE merged copy of the parameters per
step; dL/dλ_i^b = ⟨dL/dθ^b, τ_i^b⟩ is then taken by hand from that copy's gradient, so no graph keeps
T scaled copies of the vectors alive.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from ..task_vectors import add_scaled_
from .registry import (
    MergeError,
    MethodParam,
    check_fraction,
    check_positive_finite,
    get_method,
    register_method,
)
from .streaming import TensorReader, _shapes_of, check_vectors, iter_names
from .ties import elect_sign, magnitude_thresholds

GRANULARITIES = ("task", "layer")
# The authors' loop (main_*_adamerging*.py) breaks after ``i > 0``: two shuffled batches per task and
# step, their mean entropies summed. The paper only says "batch size 16"; we follow the code.
BATCHES_PER_TASK = 2
TASK_WISE_BLOCK = "all"


class UnlabeledInputs(Protocol):
    """Random access to one task's inputs: ``len()`` and ``inputs[indices]`` → pixel_values [n, C, H, W]."""

    def __len__(self) -> int: ...

    def __getitem__(self, indices: Tensor) -> Tensor: ...


def _check_unit_interval(name: str, value: float) -> None:
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise MergeError(f"parameter {name!r} must lie in [0, 1] (λ is clamped there), got {value!r}; e.g. 0.3.")


def _check_positive_int(name: str, value: int) -> None:
    if value < 1:
        raise MergeError(f"parameter {name!r} must be a positive integer, got {value!r}.")


def _check_seed(name: str, value: int) -> None:
    if value < 0:
        raise MergeError(f"parameter {name!r} must be ≥ 0, got {value!r}.")


PARAMS = [
    MethodParam("granularity", "layer", "one λ per task, or per task and parameter tensor", choices=GRANULARITIES),
    MethodParam("ties", False, "AdaMerging++: TIES trim + sign election applied to the vectors first"),
    MethodParam("density", 0.2, "with ties=true: kept fraction of each whole task vector (K=20 in the code)",
                check=check_fraction),  # fmt: skip
    MethodParam("steps", 500, "Adam steps on λ", check=_check_positive_int),
    MethodParam("lr", 1e-3, "Adam learning rate", check=check_positive_finite),
    MethodParam("init", 0.3, "initial λ (clamped to [0, 1] throughout)", check=_check_unit_interval),
    MethodParam("batch_size", 16, f"unlabeled inputs per batch; {BATCHES_PER_TASK} batches per task per step",
                check=_check_positive_int),  # fmt: skip
    MethodParam("seed", 0, "seed of the batch sampling", check=_check_seed),
]


@register_method(
    "adamerging",
    params=PARAMS,
    paper="Yang et al. 2024 (ICLR), AdaMerging: Adaptive Model Merging for Multi-Task Learning",
    summary="λ per task (or per task × tensor) learned by minimising prediction entropy on unlabeled inputs; "
    "needs data (saft-merge --data-dir, --adapt-split)",
    needs_data=True,
)
def adamerging_needs_data(vectors: Sequence[Mapping[str, Tensor]], *, progress: bool = False, **params: Any) -> dict:
    """Registry entry: AdaMerging cannot run without a model and inputs, so say where it does run."""
    raise MergeError(
        "method 'adamerging' learns its coefficients on unlabeled inputs and is no pure merge of the vectors; "
        "call saft_hf.merging.adamerging_coefficients(model, base_state, vectors, heads, inputs, ...) or run "
        "saft-merge --method adamerging --data-dir DIR."
    )


@dataclass
class AdaMergingResult:
    """Learned λ (tasks × blocks, clamped), the entropy per step, and the settings that produced them."""

    tasks: list[str]
    blocks: list[str]
    coefficients: list[list[float]]
    entropy: list[float]
    method_args: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format_table(self) -> str:
        """Markdown table, one row per block and one column per task (λ to 4 decimals)."""
        return coefficient_table(self.tasks, self.blocks, self.coefficients)


def coefficient_table(tasks: Sequence[str], blocks: Sequence[str], coefficients: Sequence[Sequence[float]]) -> str:
    """Markdown table of λ: rows are blocks, columns tasks (``coefficients`` is tasks × blocks)."""
    lines = ["| block | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for b, block in enumerate(blocks):
        lines.append(f"| {block} | " + " | ".join(f"{row[b]:.4f}" for row in coefficients) + " |")
    return "\n".join(lines)


def softmax_entropy(logits: Tensor) -> Tensor:
    """Shannon entropy −Σ_c p_c log p_c of softmax(logits) per row (AdaMerging, eq. 5)."""
    return -(logits.softmax(dim=-1) * logits.log_softmax(dim=-1)).sum(dim=-1)


def ties_selected(stacked: Tensor, majority: float) -> Tensor:
    """AdaMerging++'s vectors from [T, d] trimmed τ: keep the entries agreeing with the elected sign.

    The authors' ``ties_merging_split`` (EnnengYang/AdaMerging ``ties_merging_utils.py``) returns these
    per-task entries (not their disjoint mean); λ_i then weighs them. A column whose sum is 0 takes
    ``majority``, the sign of the sum of every column's elected sign over the *whole* vector (their
    ``resolve_zero_signs(..., "majority")``); if that is 0 too, their ``torch.where(sign > 0, τ > 0, τ < 0)``
    keeps the negative entries, as here. Modifies and returns ``stacked``.
    """
    sign = elect_sign(stacked)
    sign[sign == 0] = majority
    return stacked.mul_(torch.where(sign > 0, stacked > 0, stacked < 0))


def stack_vectors(
    vectors: Sequence[Mapping[str, Tensor]],
    ties: bool = False,
    density: float = 0.2,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, Tensor]:
    """Per parameter, the T task vectors' tensors as one float32 [T, numel] matrix (TIES-selected with ``ties``)."""
    names = check_vectors(vectors)
    reader = TensorReader(vectors)
    thresholds = magnitude_thresholds(vectors, density, progress, reader) if ties else None
    threshold = torch.tensor(thresholds).unsqueeze(1) if thresholds is not None else None
    stacked: dict[str, Tensor] = {}
    votes = 0  # Σ of the elected signs over the whole vector: the majority sign that breaks zero-sum ties
    for name in iter_names(names, progress, "adamerging: read vectors"):
        matrix = torch.stack([t.reshape(-1) for t in reader.read(name)])
        if threshold is not None:  # TIES step 1, trim each whole vector to its top `density`
            matrix.mul_(matrix.abs() >= threshold)
        if ties:
            votes += int(elect_sign(matrix).sum())
        stacked[name] = matrix
    majority = float(math.copysign(1, votes)) if votes else 0.0
    for name, matrix in stacked.items():
        stacked[name] = (ties_selected(matrix, majority) if ties else matrix).to(device)
    return stacked


def _check_inputs(
    model: nn.Module,
    base_state: Mapping[str, Tensor],
    names: Sequence[str],
    heads: Mapping[str, nn.Module],
    inputs: Mapping[str, UnlabeledInputs],
    vectors: Sequence[Mapping[str, Tensor]],
) -> list[str]:
    tasks = list(heads)
    if len(tasks) != len(vectors):
        raise MergeError(f"got {len(vectors)} task vectors but {len(tasks)} heads; give one head per vector, in order.")
    if set(inputs) != set(tasks):
        raise MergeError(f"inputs are for tasks {sorted(inputs)} but heads for {sorted(tasks)}; give one per task.")
    empty = [task for task in tasks if len(inputs[task]) == 0]
    if empty:
        raise MergeError(f"task {empty[0]!r} has no unlabeled inputs; AdaMerging needs some for every task.")
    params = dict(model.named_parameters())
    shapes = _shapes_of(vectors[0])
    for name in names:
        if name not in params or name not in base_state:
            raise MergeError(
                f"task vector tensor {name!r} is not a parameter of {type(model).__name__} (or missing from "
                "base_state); build the vectors against this model."
            )
        if shapes[name] != tuple(params[name].shape):
            raise MergeError(
                f"task vector tensor {name!r} has shape {shapes[name]} but the model's parameter has "
                f"{tuple(params[name].shape)}; build the vectors against this model."
            )
    return tasks


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """A fresh shuffle of ``range(n)``, cut into at most ``BATCHES_PER_TASK`` batches (the code's shuffled loader)."""
    order = torch.randperm(n, generator=generator)[: BATCHES_PER_TASK * batch_size]
    return list(order.split(batch_size))


def adamerging_coefficients(
    model: nn.Module,
    base_state: Mapping[str, Tensor],
    vectors: Sequence[Mapping[str, Tensor]],
    heads: Mapping[str, nn.Module],
    inputs: Mapping[str, UnlabeledInputs],
    *,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
    **method_args: Any,
) -> AdaMergingResult:
    """Learn λ on unlabeled ``inputs`` (task → pixel_values source; labels are never asked for).

    ``heads`` (task → frozen zero-shot head) give the task order; ``vectors[i]`` belongs to the i-th
    head. ``method_args`` are the registered parameters (granularity, ties, density, steps, lr, init,
    batch_size, seed). ``callback(step, mean_entropy)`` runs after each step (logging, timing).
    ``model`` is left at θ₀ + Σ λ τ with the learned, clamped λ.
    """
    args = get_method("adamerging").resolve(method_args)
    names = check_vectors(vectors)
    tasks = _check_inputs(model, base_state, names, heads, inputs, vectors)
    device = next(model.parameters()).device
    params = dict(model.named_parameters())
    names = [name for name in params if name in set(names)]  # blocks in model order, as in the paper's heatmap
    stacked = stack_vectors(vectors, args["ties"], args["density"], device, progress)
    stacked = {name: stacked[name] for name in names}
    base = {name: base_state[name].to(device, torch.float32).reshape(-1) for name in names}
    heads = {task: head.to(device).eval() for task, head in heads.items()}
    shape = (len(tasks),) if args["granularity"] == "task" else (len(tasks), len(names))
    # Authors' code: λ_raw is trained, the forward uses clamp(λ_raw, 0, 1) (zero gradient outside).
    raw = nn.Parameter(torch.full(shape, args["init"], device=device))
    optimizer = torch.optim.Adam([raw], lr=args["lr"], betas=(0.9, 0.999), weight_decay=0.0)
    generator = torch.Generator().manual_seed(args["seed"])

    add_scaled_(model, base_state, [], [])  # start at θ₀: parameters outside the vectors stay there
    was_training, grad_flags = model.training, {n: p.requires_grad for n, p in params.items()}
    model.eval().requires_grad_(False)
    history: list[float] = []
    bar = tqdm(range(args["steps"]), desc="adamerging", disable=not progress)
    try:
        for step in bar:
            lam = raw.clamp(0.0, 1.0)
            columns = lam.detach().reshape(len(tasks), -1).expand(len(tasks), len(names))
            batches = (
                (heads[task], inputs[task][indices].to(device))
                for task in tasks
                for indices in _batches(len(inputs[task]), args["batch_size"], generator)
            )
            total, count, grad = entropy_gradient(model, base, stacked, columns, batches)
            optimizer.zero_grad()
            lam.backward(grad.sum(dim=1) if args["granularity"] == "task" else grad)
            optimizer.step()
            history.append(total / count)
            bar.set_postfix(entropy=f"{history[-1]:.4f}")
            if callback is not None:
                callback(step, history[-1])
            del grad
    finally:
        bar.close()
        model.train(was_training)
        for name, p in params.items():
            p.requires_grad_(grad_flags[name])

    coefficients = raw.detach().clamp(0.0, 1.0).reshape(len(tasks), -1).cpu()
    _write_merged(model, base_state, stacked, coefficients.to(device), names)
    blocks = [TASK_WISE_BLOCK] if args["granularity"] == "task" else list(names)
    return AdaMergingResult(tasks, blocks, coefficients.tolist(), history, args)


def entropy_gradient(
    model: nn.Module,
    base: Mapping[str, Tensor],
    stacked: Mapping[str, Tensor],
    columns: Tensor,
    batches: Iterable[tuple[nn.Module, Tensor]],
) -> tuple[float, int, Tensor]:
    """Σ over (head, pixel_values) batches of the mean entropy at θ = θ₀ + Σ_i λ_i^b τ_i^b, the batch count,
    and the gradient of that sum w.r.t. λ ([T, B], ``columns`` holds λ with the same layout).

    ``base`` and ``stacked`` map parameter names (in block order) to flat θ₀ and [T, numel] τ. The
    model's own parameters must not require grad: only the one merged copy collects dL/dθ.
    """
    params = dict(model.named_parameters())
    with torch.no_grad():  # the one merged copy of this step: a leaf that collects dL/dθ
        merged = {
            name: torch.addmv(base[name], stacked[name].t(), columns[:, b])
            .view_as(params[name]).to(params[name].dtype).requires_grad_()
            for b, name in enumerate(stacked)
        }  # fmt: skip
    total, count = 0.0, 0
    for head, pixel_values in batches:
        embeds = functional_call(model, merged, args=(), kwargs={"pixel_values": pixel_values}).image_embeds
        loss = softmax_entropy(head(embeds)).mean()
        loss.backward()  # frees this batch's activations; dL/dθ accumulates in merged[name].grad
        total, count = total + loss.item(), count + 1
    with torch.no_grad():  # dL/dλ_i^b = ⟨dL/dθ^b, τ_i^b⟩
        grad = torch.stack(
            [stacked[n] @ merged[n].grad.reshape(-1).float() if merged[n].grad is not None
             else stacked[n].new_zeros(stacked[n].shape[0]) for n in stacked],
            dim=1,
        )  # fmt: skip
    return total, count, grad


def _write_merged(
    model: nn.Module, base_state: Mapping[str, Tensor], stacked: Mapping[str, Tensor], lam: Tensor, names: Sequence[str]
) -> None:
    """θ = θ₀ + Σ_i λ_i^b τ_i^b into ``model`` in place (parameters outside the vectors reset to θ₀)."""
    params = dict(model.named_parameters())
    columns = lam.expand(lam.shape[0], len(names))
    delta = {name: (stacked[name].t() @ columns[:, b]).view_as(params[name]) for b, name in enumerate(names)}
    add_scaled_(model, base_state, delta, 1.0)


def mean_entropy(
    model: nn.Module, heads: Mapping[str, nn.Module], inputs: Mapping[str, UnlabeledInputs], batch_size: int = 64
) -> dict[str, float]:
    """Mean prediction entropy of ``model`` + each task's head over all of that task's inputs (no grad)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = {}
    try:
        with torch.no_grad():
            for task, head in heads.items():
                total, n = 0.0, len(inputs[task])
                for indices in torch.arange(n).split(batch_size):
                    embeds = model(pixel_values=inputs[task][indices].to(device)).image_embeds
                    total += float(softmax_entropy(head.to(device)(embeds)).sum())
                out[task] = total / n
    finally:
        model.train(was_training)
    return out
