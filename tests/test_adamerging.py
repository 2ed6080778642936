"""AdaMerging: entropy goes down, λ stays in [0, 1], labels are never read, seeds reproduce, CLI end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk
from safetensors.torch import load_file
from torch.func import functional_call

from saft_hf.cli.merge import main
from saft_hf.clip import ZeroShotHead, load_vision_tower
from saft_hf.merging import MergeError, adamerging_coefficients, merge
from saft_hf.merging.adamerging import entropy_gradient, mean_entropy, stack_vectors
from saft_hf.task_vectors import TaskVector, add_scaled_
from tests.fixtures_clip import TINY_TASKS
from tests.test_cli_merge import _make_vector

FAST = {"steps": 8, "lr": 0.02}


@pytest.fixture()
def setup(tiny_clip_dir: Path) -> dict:
    """Tiny CLIP, its θ₀, two random task vectors, two heads (logit scale 10) and random unlabeled inputs."""
    model = load_vision_tower(tiny_clip_dir)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    vectors = [{n: 0.05 * torch.randn(p.shape, generator=g) for n, p in base.items()} for _ in range(2)]
    heads = {
        "a": ZeroShotHead.from_prototypes(torch.randn(4, 16, generator=g), logit_scale=10.0),
        "b": ZeroShotHead.from_prototypes(torch.randn(3, 16, generator=g), logit_scale=10.0),
    }
    inputs = {"a": torch.randn(40, 3, 32, 32, generator=g), "b": torch.randn(36, 3, 32, 32, generator=g)}
    return {"model": model, "base": base, "vectors": vectors, "heads": heads, "inputs": inputs}


def _run(setup: dict, **args: object):
    return adamerging_coefficients(
        setup["model"], setup["base"], setup["vectors"], setup["heads"], setup["inputs"], progress=False, **args
    )


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_entropy_decreases_from_the_initial_merge(setup: dict, granularity: str) -> None:
    add_scaled_(setup["model"], setup["base"], setup["vectors"], [0.3, 0.3])  # λ init = 0.3 everywhere
    before = mean_entropy(setup["model"], setup["heads"], setup["inputs"])
    seen: list[tuple[int, float]] = []
    result = _run(setup, granularity=granularity, callback=lambda step, h: seen.append((step, h)), **FAST)
    after = mean_entropy(setup["model"], setup["heads"], setup["inputs"])
    # descent on Σ_task entropy: the total falls (one task may rise); per-tensor λ have more room to lower it
    assert sum(after.values()) < (0.99 if granularity == "task" else 0.9) * sum(before.values())
    assert result.entropy[-1] < result.entropy[0]
    assert len(result.entropy) == FAST["steps"] and seen == list(enumerate(result.entropy))


def test_coefficients_stay_in_unit_interval_and_are_written_into_the_model(setup: dict) -> None:
    result = _run(setup, steps=6, lr=0.5)  # big steps push λ against the clamp
    lam = torch.tensor(result.coefficients)
    assert lam.shape == (2, len(setup["base"]))
    assert lam.min() >= 0.0 and lam.max() <= 1.0
    assert lam.min() == 0.0 or lam.max() == 1.0  # the clamp was reached
    weights = dict(setup["model"].named_parameters())
    for b, name in enumerate(result.blocks):
        expected = setup["base"][name] + lam[0, b] * setup["vectors"][0][name] + lam[1, b] * setup["vectors"][1][name]
        torch.testing.assert_close(weights[name].detach(), expected, rtol=1e-5, atol=1e-6)


def test_parameters_outside_the_vectors_are_base_weights_during_and_after(setup: dict) -> None:
    names = [n for n in setup["base"] if "layers.0." in n]
    setup["vectors"] = [{n: v[n] for n in names} for v in setup["vectors"]]
    from_base = _run(setup, steps=2)
    with torch.no_grad():
        for p in setup["model"].parameters():
            p.add_(0.5)  # a model left elsewhere, e.g. by an earlier search
    from_elsewhere = _run(setup, steps=2)
    assert from_base.blocks == names
    assert from_elsewhere.coefficients == from_base.coefficients
    weights = dict(setup["model"].named_parameters())
    for name in set(setup["base"]) - set(names):
        assert torch.equal(weights[name].detach(), setup["base"][name]), name


def test_vectors_of_another_shape_are_refused_before_training(setup: dict) -> None:
    name = next(iter(setup["base"]))
    setup["vectors"] = [{**v, name: torch.zeros(3)} for v in setup["vectors"]]
    with pytest.raises(MergeError, match=f"{name}.*shape"):
        _run(setup, steps=1)


def test_task_granularity_learns_one_coefficient_per_task(setup: dict) -> None:
    result = _run(setup, granularity="task", steps=2)
    assert result.blocks == ["all"] and [len(row) for row in result.coefficients] == [1, 1]
    assert result.coefficients != [[0.3], [0.3]]


def test_same_seed_gives_same_coefficients_and_another_seed_other_ones(setup: dict) -> None:
    first = _run(setup, steps=3, seed=1).coefficients
    second = _run(setup, steps=3, seed=1).coefficients
    other = _run(setup, steps=3, seed=2).coefficients
    assert first == second
    assert first != other  # 40 and 36 inputs, 32 drawn per step: the seed picks which


def test_gradient_equals_autograd_through_the_merged_weights(setup: dict) -> None:
    """Reference: build θ = θ₀ + Σ λ τ with autograd and differentiate the summed mean entropies."""
    model, base, vectors = setup["model"], setup["base"], setup["vectors"]
    names = list(base)
    lam = torch.rand(2, len(names), generator=torch.Generator().manual_seed(3))
    batches = [(setup["heads"][t], setup["inputs"][t][:16]) for t in ("a", "b")]
    model.requires_grad_(False)
    stacked = stack_vectors(vectors)
    flat = {n: base[n].reshape(-1) for n in names}
    total, count, grad = entropy_gradient(model, flat, {n: stacked[n] for n in names}, lam, iter(batches))

    reference = lam.clone().requires_grad_()
    theta = {n: base[n] + reference[0, b] * vectors[0][n] + reference[1, b] * vectors[1][n] for b, n in enumerate(names)}
    loss = 0.0
    for head, pixels in batches:
        logits = head(functional_call(model, theta, kwargs={"pixel_values": pixels}).image_embeds)
        p = logits.softmax(-1)
        loss = loss + (-(p * p.log()).sum(-1)).mean()
    loss.backward()
    assert count == 2 and total == pytest.approx(loss.item(), rel=1e-5)
    torch.testing.assert_close(grad, reference.grad, rtol=1e-4, atol=1e-6)


def test_ties_variant_trims_and_keeps_only_entries_agreeing_with_the_elected_sign() -> None:
    """Reference from TIES (Yadav et al. 2023) as AdaMerging++ uses it: per-task entries, not their mean."""
    g = torch.Generator().manual_seed(0)
    vectors = [{"w": torch.randn(6, 5, generator=g), "b": torch.randn(7, generator=g)} for _ in range(3)]
    stacked = stack_vectors(vectors, ties=True, density=0.3)
    thresholds = []  # |τ| at rank d − ⌊0.3·d⌋ of each whole vector: its top 30% are kept
    for vector in vectors:
        flat = torch.cat([t.reshape(-1) for t in vector.values()]).abs()
        thresholds.append(flat.kthvalue(flat.numel() - int(flat.numel() * 0.3)).values)
    for name in ("w", "b"):
        trimmed = [v[name] * (v[name].abs() >= t) for v, t in zip(vectors, thresholds)]
        elected = torch.where(sum(trimmed) >= 0, 1.0, -1.0)
        for i, tau in enumerate(trimmed):
            expected = tau * (torch.sign(tau) == elected)
            torch.testing.assert_close(stacked[name][i].view_as(expected), expected)
    assert 0 < int((stacked["w"] != 0).sum()) < stacked["w"].numel()


def test_pure_merge_and_bad_parameters_say_what_to_do(setup: dict) -> None:
    with pytest.raises(MergeError, match="adamerging_coefficients"):
        merge(setup["vectors"], "adamerging")
    with pytest.raises(MergeError, match="granularity"):
        _run(setup, granularity="block")
    with pytest.raises(MergeError, match=r"\[0, 1\]"):
        _run(setup, init=1.5)
    with pytest.raises(MergeError, match="heads"):
        adamerging_coefficients(setup["model"], setup["base"], setup["vectors"], {"a": setup["heads"]["a"]},
                                {"a": setup["inputs"]["a"]}, progress=False)  # fmt: skip


# --------------------------------------------------------------------------------- saft-merge end to end
@pytest.fixture(scope="module")
def vector_dirs(tiny_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("ada-vectors")
    return [_make_vector(tiny_clip_dir, task, seed, root / task) for seed, task in enumerate(TINY_TASKS, start=1)]


def _cli(vector_dirs: list[Path], data_dir: Path, out: Path, *extra: str) -> int:
    return main(["--repos", ",".join(map(str, vector_dirs)), "--method", "adamerging", "--method-arg", "steps=3",
                 "--method-arg", "lr=0.05", "--data-dir", str(data_dir), "--output", str(out), "--no-progress",
                 *extra])  # fmt: skip


def test_cli_writes_merged_weights_coefficients_heatmap_and_card(
    tiny_clip_dir: Path, vector_dirs: list[Path], tiny_task_data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ada"
    assert _cli(vector_dirs, tiny_task_data_dir, out, "--adapt-split", "validation", "--eval") == 0
    learned = json.loads((out / "adamerging_coefficients.json").read_text())
    config = json.loads((out / "merge_config.json").read_text())
    assert config["adaptation"] == {"split": "validation", "labels_read": False}
    assert config["method_args"]["granularity"] == "layer" and config["method_args"]["steps"] == 3
    assert json.loads((out / "results.json").read_text())["adamerging"] == learned
    assert learned["tasks"] == list(TINY_TASKS) and len(learned["entropy"]) == 3
    base = {n: p.detach() for n, p in load_vision_tower(tiny_clip_dir).named_parameters()}
    taus = [TaskVector.from_pretrained(d) for d in vector_dirs]
    merged = load_file(str(out / "model.safetensors"))
    lam = learned["coefficients"]
    for b, name in enumerate(learned["blocks"]):
        expected = base[name] + lam[0][b] * taus[0][name] + lam[1][b] * taus[1][name]
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)
    assert (out / "adamerging_coefficients.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (out / "README.md").read_text()
    assert "## AdaMerging coefficients" in card and f"| {learned['blocks'][0]} |" in card
    assert "(adamerging_coefficients.png)" in card and "unlabeled\nvalidation inputs" in card


def _relabel(data_dir: Path, target: Path) -> Path:
    """A copy of the tiny data whose test labels are all changed (label → label + 1 mod classes)."""
    shutil.copytree(data_dir, target)
    for task, classes in TINY_TASKS.items():
        data = load_from_disk(str(data_dir / task))
        k = len(classes)
        data["test"] = data["test"].map(lambda row, k=k: {"label": (row["label"] + 1) % k})
        shutil.rmtree(target / task / "test")
        data["test"].save_to_disk(str(target / task / "test"))
    return target


def test_poisoned_labels_give_the_same_coefficients(
    vector_dirs: list[Path], tiny_task_data_dir: Path, tmp_path: Path
) -> None:
    poisoned = _relabel(tiny_task_data_dir, tmp_path / "poisoned")
    for task in TINY_TASKS:
        clean, bad = (load_from_disk(str(d / task))["test"]["label"] for d in (tiny_task_data_dir, poisoned))
        assert all(x != y for x, y in zip(clean, bad))
    half = ("--method-arg", "batch_size=8")  # 16 of the 32 test inputs per step: which ones depends on the rows
    assert _cli(vector_dirs, tiny_task_data_dir, tmp_path / "clean", *half) == 0
    assert _cli(vector_dirs, poisoned, tmp_path / "bad", *half) == 0
    clean, bad = (json.loads((tmp_path / d / "adamerging_coefficients.json").read_text()) for d in ("clean", "bad"))
    assert clean["coefficients"] == bad["coefficients"] and clean["entropy"] == bad["entropy"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--scaling", "0.3"], "no λ"),
        (["--search"], "no λ to search"),
        (["--method-arg", "granularity=block"], "granularity"),
    ],
)
def test_cli_usage_errors(
    vector_dirs: list[Path], tiny_task_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    extra: list[str], message: str,
) -> None:  # fmt: skip
    assert _cli(vector_dirs, tiny_task_data_dir, tmp_path / "x", *extra) == 2
    assert message in capsys.readouterr().err


def test_adapt_split_only_with_adamerging_and_data_is_required(
    vector_dirs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repos = ",".join(map(str, vector_dirs))
    code = main(["--repos", repos, "--method", "ties", "--adapt-split", "test", "--output", str(tmp_path / "t")])
    assert code == 2 and "--adapt-split is only used" in capsys.readouterr().err
    code = main(["--repos", repos, "--method", "adamerging", "--output", str(tmp_path / "a")])
    assert code == 2 and "--method adamerging needs task data" in capsys.readouterr().err


def _authors_ties_split(flat: torch.Tensor) -> torch.Tensor:
    """EnnengYang/AdaMerging ties_merging_utils.py, resolve_sign + disjoint_merge_split's selection, transcribed."""
    sign = torch.sign(flat.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())  # resolve_zero_signs(..., "majority")
    return flat * torch.where(sign.unsqueeze(0) > 0, flat > 0, flat < 0)


@pytest.mark.parametrize(
    "first, second",
    [
        ([1.0, 2.0, 3.0], [-1.0, 1.0, 1.0]),  # column 0 sums to 0, the majority sign is +: τ_1's +1 is kept
        ([1.0, -2.0, -3.0], [-1.0, 1.0, -1.0]),  # majority −: τ_2's −1 is kept
        ([1.0, 2.0, -1.0], [-1.0, 1.0, -3.0]),  # the majority is 0 too: the negative entries are kept
    ],
)
def test_ties_variant_gives_a_zero_sum_column_the_vector_wide_majority_sign_as_the_authors(first, second) -> None:
    vectors = [{"w": torch.tensor(first)}, {"w": torch.tensor(second)}]
    stacked = stack_vectors(vectors, ties=True, density=1.0)
    expected = _authors_ties_split(torch.tensor([first, second]))
    torch.testing.assert_close(stacked["w"], expected)
    assert stacked["w"][:, 0].abs().sum() == 1.0  # one of the tied entries survives, never both, never none
