"""Merge methods against plain in-memory references (flatten everything) and hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch

from saft_hf.merging import METHODS, MergeError, merge, parse_method_args

SHAPES = {"a.weight": (7, 5), "a.bias": (7,), "b.weight": (3, 4, 2), "c": (1,)}


def random_vectors(n: int = 3, seed: int = 0, shapes=SHAPES) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(s, generator=g) * (i + 1) for k, s in shapes.items()} for i in range(n)]


def flatten(vectors):
    return torch.stack([torch.cat([v[k].reshape(-1).float() for k in v]) for v in vectors])


def unflatten(flat: torch.Tensor, shapes=SHAPES) -> dict[str, torch.Tensor]:
    """Split a flat tensor into ``shapes`` (name → shape, or a vector whose tensor shapes to use)."""
    out, start = {}, 0
    for k, s in shapes.items():
        s = tuple(s.shape) if isinstance(s, torch.Tensor) else s
        size = math.prod(s)
        out[k] = flat[start : start + size].reshape(s)
        start += size
    return out


# ------------------------------------------------------------------- in-memory references (tests only)
def ties_reference(vectors, density, scaling):
    """TIES as its authors' code runs it, on the flattened (n, d) float32 vectors.

    Trim: keep |τ| ≥ the (d − ⌊d·density⌋)-th smallest |τ| of each row. Elect: sign of the column sum;
    a zero sign becomes sign(Σ of all elected signs), and stays 0 when that is 0, in which case the
    selection rule below keeps the negative entries. Disjoint mean over the selected non-zeros.
    """
    m = flatten(vectors)
    d = m.shape[1]
    if density < 1:
        thr = m.abs().kthvalue(d - int(d * density), dim=1, keepdim=True).values
        m = m * (m.abs() >= thr)
    elected = torch.sign(m.sum(dim=0))
    elected[elected == 0] = torch.sign(elected.sum())
    selected = m * torch.where(elected > 0, m > 0, m < 0)
    return unflatten(scaling * selected.sum(0) / (selected != 0).sum(0).clamp(min=1), vectors[0])


def pcb_reference(vectors, ratio, scaling, shapes=SHAPES):
    """Direct transcription of the PCB formulas (authors' code form) on flattened (n, d) vectors."""
    m = flatten(vectors)
    n, d = m.shape

    def order_stat(x, idx):  # 0-based index into each sorted row
        return x.sort(dim=1).values[:, idx : idx + 1]

    def norm(x):
        lo, hi = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
        return (x - lo) / (hi - lo)

    mag = m.abs()
    mag = mag.clamp(order_stat(mag, int(d * 1e-4)), order_stat(mag, int(d * (1 - 1e-4) - 1)))
    clipped = torch.sign(m) * mag
    intra = torch.exp(n * norm(mag) ** 2)
    inter = torch.tanh(m * m.sum(0))
    score = intra * inter
    beta = norm(score.clamp(min=order_stat(score, int(d * (1 - ratio)))))
    return unflatten(scaling * (clipped * beta).sum(0) / beta.sum(0).clamp(min=1e-12), shapes)


def pcb_vit_reference(vectors, ratio, scaling, shapes=SHAPES):
    """My transcription of the authors' ViT variant (``PCB`` in vision_source_code/pcb_ES.py)."""
    m = flatten(vectors)
    n, d = m.shape

    def order_stat(x, idx):
        return x.sort(dim=1).values[:, idx : idx + 1]

    def norm(x):
        lo, hi = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
        return (x - lo) / (hi - lo)

    mag = m.abs()
    mag = mag.clamp(order_stat(mag, int(d * 0.01)), order_stat(mag, int(d * (1 - 0.01) - 1)))
    clipped = torch.sign(m) * mag
    hat = torch.sign(m) * norm(mag)  # the min-max normalised task vectors
    intra = torch.exp(n * norm(mag) ** 2)
    inter = torch.stack([torch.tanh(hat[i] * hat).sum(0) for i in range(n)])  # Σ_j tanh(τ̂_i ⊙ τ̂_j)
    score = intra * inter
    beta = norm(score.clamp(min=order_stat(score, int(d * (1 - ratio)))))
    return unflatten(scaling * (clipped * beta).sum(0) / beta.sum(0).clamp(min=1e-12), shapes)


def assert_close_dicts(got, expected, **tol):
    assert set(got) == set(expected)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k].to(got[k].dtype), **tol)


# ----------------------------------------------------------------------------------- against refs
def test_task_arithmetic_is_scaled_sum():
    vs = random_vectors()
    got = merge(vs, "task_arithmetic", scaling=0.4)
    assert_close_dicts(got, {k: 0.4 * sum(v[k] for v in vs) for k in SHAPES})


def test_weight_average_is_mean_task_vector():
    vs = random_vectors(4)
    assert_close_dicts(merge(vs, "weight_average"), {k: sum(v[k] for v in vs) / 4 for k in SHAPES})


@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 0.9])
def test_ties_matches_whole_vector_reference(density):
    vs = random_vectors(4, seed=1)
    assert_close_dicts(merge(vs, "ties", density=density, scaling=0.7), ties_reference(vs, density, 0.7))


def test_ties_trims_globally_not_per_tensor():
    # vector 0: tensor "c" holds the only large value, so a global top-k keeps nothing else from it
    vs = random_vectors(2, seed=2)
    vs[0] = {k: v * 1e-3 for k, v in vs[0].items()}
    vs[0]["c"] = torch.tensor([100.0])
    density = 1 / sum(math.prod(s) for s in SHAPES.values())
    merged = merge(vs, "ties", density=density, scaling=1.0)
    expected = ties_reference(vs, density, 1.0)
    assert_close_dicts(merged, expected)
    assert merged["c"].item() == pytest.approx(100.0)


@pytest.mark.parametrize("ratio", [0.05, 0.3, 1.0])
def test_pcb_matches_formula_transcription(ratio):
    vs = random_vectors(3, seed=3)
    assert_close_dicts(merge(vs, "pcb", ratio=ratio, scaling=0.9), pcb_reference(vs, ratio, 0.9), atol=1e-5, rtol=1e-4)


def test_pcb_clips_outliers_like_the_transcription_on_heavy_tails():
    # d = 35000 so the 0.01% / 99.99% order statistics clip several entries per task
    shapes = {"w": (20000,), "v": (50, 300)}
    g = torch.Generator().manual_seed(10)
    vs = [{k: torch.randn(s, generator=g) ** 3 for k, s in shapes.items()} for _ in range(3)]
    merged = merge(vs, "pcb", ratio=0.1, scaling=1.0)
    assert_close_dicts(merged, pcb_reference(vs, 0.1, 1.0, shapes), atol=1e-5, rtol=1e-4)
    largest = max(v["w"].abs().max().item() for v in vs)
    assert merged["w"].abs().max().item() < largest  # the outliers were clipped


@pytest.mark.parametrize("ratio", [0.05, 0.3])
def test_pcb_vit_variant_matches_the_authors_vit_code(ratio):
    vs = random_vectors(4, seed=13)
    got = merge(vs, "pcb", variant="vit", ratio=ratio, scaling=1.2)
    assert_close_dicts(got, pcb_vit_reference(vs, ratio, 1.2), atol=1e-5, rtol=1e-4)


def test_pcb_vit_variant_clips_one_percent_and_differs_from_the_general_one():
    # d = 35000: the 1% clip moves 350 entries per end and per task, the 0.01% one only 3
    shapes = {"w": (20000,), "v": (50, 300)}
    g = torch.Generator().manual_seed(14)
    vs = [{k: torch.randn(s, generator=g) ** 3 for k, s in shapes.items()} for _ in range(3)]
    vit = merge(vs, "pcb", variant="vit", ratio=0.1, scaling=1.0)
    assert_close_dicts(vit, pcb_vit_reference(vs, 0.1, 1.0, shapes), atol=1e-5, rtol=1e-4)
    general = merge(vs, "pcb", ratio=0.1, scaling=1.0)
    assert vit["w"].abs().max() < general["w"].abs().max()  # clipped harder
    assert not torch.allclose(vit["v"], general["v"], atol=1e-3)
    with pytest.raises(MergeError, match=r"'variant' must be one of \['general', 'vit'\]"):
        merge(vs, "pcb", variant="ViT-B/32")


def test_pcb_drops_all_but_top_ratio_per_task():
    vs = random_vectors(2, seed=4, shapes={"w": (1000,)})
    merged = merge(vs, "pcb", ratio=0.05, scaling=1.0)["w"]
    # each task keeps ~5% (β > 0 strictly above its threshold), so at most ~10% of entries survive
    assert 0 < int((merged != 0).sum()) <= 100


# ------------------------------------------------------------------------------------- hand cases
def test_ties_sign_conflict_keeps_only_the_elected_side():
    v1 = {"w": torch.tensor([1.0, -2.0, 3.0])}
    v2 = {"w": torch.tensor([-3.0, 1.0, 3.0])}
    merged = merge([v1, v2], "ties", density=1.0, scaling=1.0)["w"]
    # sums -2, -1, 6 → signs -, -, + → disjoint means -3, -2, 3
    assert merged.tolist() == [-3.0, -2.0, 3.0]


def test_ties_keeps_all_entries_tied_at_the_threshold():
    v1 = {"w": torch.tensor([1.0, -1.0, 1.0, 1.0, 0.5])}
    v2 = {"w": torch.zeros(5)}
    # d=5, density 0.2 keeps 1 by count, but four entries tie at |τ| = 1 and are all kept
    merged = merge([v1, v2], "ties", density=0.2, scaling=1.0)["w"]
    assert merged.tolist() == [1.0, -1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("method", sorted(m for m in METHODS if not METHODS[m].needs_data))
def test_all_zero_vectors_merge_to_zero(method):
    vs = [{k: torch.zeros(s) for k, s in SHAPES.items()} for _ in range(3)]
    merged = merge(vs, method)
    for k, s in SHAPES.items():
        assert merged[k].shape == s and torch.count_nonzero(merged[k]) == 0


def test_ties_density_one_is_scaled_disjoint_mean():
    vs = random_vectors(3, seed=5)
    m = flatten(vs)
    sign = torch.where(m.sum(0) >= 0, 1.0, -1.0)  # no exact ties in these float32 values
    agree = torch.sign(m) == sign
    expected = unflatten(0.5 * (m * agree).sum(0) / agree.sum(0).clamp(min=1))
    assert_close_dicts(merge(vs, "ties", density=1.0, scaling=0.5), expected)


@pytest.mark.parametrize("bias", [-0.05, 0.05])
def test_ties_sign_ties_follow_the_authors_majority_rule_in_bf16(bias):
    # bf16 values cancel exactly in ~0.1% of the columns; a bias sets the vector-wide majority sign
    shapes = {"attn.weight": (256, 512), "mlp.weight": (512, 256), "bias": (512,)}
    g = torch.Generator().manual_seed(12)
    vs = [{k: (torch.randn(s, generator=g) + bias).to(torch.bfloat16) for k, s in shapes.items()} for _ in range(8)]
    expected = ties_reference(vs, 0.5, 1.0)
    got = merge(vs, "ties", density=0.5, scaling=1.0, dtype=torch.float32)
    assert_close_dicts(got, expected, atol=0, rtol=0)
    assert_close_dicts(merge(vs, "ties", density=0.5, scaling=1.0), expected, atol=0, rtol=0)  # bf16 output
    # the case is exercised: many columns tie, and the rule picks the side named by the majority
    m = flatten(vs)
    m = m * (m.abs() >= m.abs().kthvalue(m.shape[1] - int(m.shape[1] * 0.5), dim=1, keepdim=True).values)
    tied = (m.sum(0) == 0) & (m != 0).any(0)
    assert int(tied.sum()) > 100
    side = flatten([got])[0][tied]
    assert bool((side < 0).all()) if bias < 0 else bool((side > 0).all())


def test_ties_balanced_majority_keeps_the_negative_side_as_the_authors_code_does():
    v1, v2 = {"w": torch.tensor([2.0, -2.0, 0.5])}, {"w": torch.tensor([-2.0, 2.0, -0.5])}
    # every column sums to 0 and the elected signs sum to 0: the authors' rule keeps the negatives
    assert merge([v1, v2], "ties", density=1.0, scaling=1.0)["w"].tolist() == [-2.0, -2.0, -0.5]
    v3 = {"w": torch.tensor([2.0, -2.0, 0.5, 1.0])}
    v4 = {"w": torch.tensor([-2.0, 2.0, -0.5, 1.0])}
    # one positive elected sign makes the majority +1: the tied columns keep their positive entries
    assert merge([v3, v4], "ties", density=1.0, scaling=2.0)["w"].tolist() == [4.0, 4.0, 1.0, 2.0]


@pytest.mark.parametrize("method", [m for m in sorted(METHODS) if METHODS[m].scalable])
def test_scaling_multiplies_the_merged_vector(method):
    vs = random_vectors(3, seed=6)
    low, high = merge(vs, method, scaling=0.25), merge(vs, method, scaling=0.75)
    assert_close_dicts(high, {k: 3 * v for k, v in low.items()})
    assert any(torch.count_nonzero(v) for v in low.values())


def test_low_precision_inputs_keep_their_dtype():
    vs = [{k: v.to(torch.bfloat16) for k, v in d.items()} for d in random_vectors(3, seed=7)]
    merged = merge(vs, "ties", density=0.5, scaling=1.0)
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    expected = ties_reference([{k: v.float() for k, v in d.items()} for d in vs], 0.5, 1.0)
    assert_close_dicts(merged, expected, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("method", sorted(m for m in METHODS if not METHODS[m].needs_data))
def test_requested_float32_output_is_the_exact_float32_merge_of_fp16_inputs(method):
    args = {"pcb": {"ratio": 0.5}}.get(method, {})  # PCB's default keeps too few entries to overlap
    halves = [{k: v.half() for k, v in d.items()} for d in random_vectors(3, seed=11)]
    got = merge(halves, method, dtype=torch.float32, **args)
    expected = merge([{k: v.float() for k, v in d.items()} for d in halves], method, **args)
    assert_close_dicts(got, expected, atol=0, rtol=0)
    # the float32 results are not all representable in fp16: rounding there would have shown
    assert any(not torch.equal(t, t.half().float()) for t in got.values())


def test_fp16_sums_beyond_the_fp16_range_are_finite_in_requested_float32():
    vs = [{"w": torch.full((4,), 30000.0, dtype=torch.float16)} for _ in range(3)]
    merged = merge(vs, "task_arithmetic", scaling=1.0, dtype=torch.float32)["w"]
    assert merged.dtype == torch.float32 and merged.tolist() == [90000.0] * 4


def test_output_dtype_can_be_requested():
    vs = [{k: v.to(torch.float16) for k, v in d.items()} for d in random_vectors(2)]
    merged = merge(vs, "task_arithmetic", scaling=1.0, dtype=torch.float32)
    assert all(t.dtype == torch.float32 for t in merged.values())
    torch.testing.assert_close(merged["c"], vs[0]["c"].float() + vs[1]["c"].float())
    with pytest.raises(MergeError, match="floating torch.dtype"):
        merge(vs, "task_arithmetic", dtype=torch.int8)


# ------------------------------------------------------------------------------------------- DARE
def test_dare_is_reproducible_with_its_seed_and_varies_without():
    vs = random_vectors(3, seed=8)
    a = merge(vs, "dare", density=0.5, seed=1)
    b = merge(vs, "dare", density=0.5, seed=1)
    c = merge(vs, "dare", density=0.5, seed=2)
    assert_close_dicts(a, b, atol=0, rtol=0)
    assert not torch.equal(a["a.weight"], c["a.weight"])


def test_dare_mask_is_independent_of_tensor_order():
    vs = random_vectors(2, seed=9)
    reordered = [dict(reversed(list(v.items()))) for v in vs]
    assert_close_dicts(merge(vs, "dare", seed=3), merge(reordered, "dare", seed=3), atol=0, rtol=0)


def test_dare_drops_at_the_expected_rate_and_rescales_kept_entries():
    ones = {"w": torch.ones(20000)}
    zeros = {"w": torch.zeros(20000)}
    merged = merge([ones, zeros], "dare", density=0.3, scaling=1.0, seed=0)["w"]
    kept = merged != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.02
    torch.testing.assert_close(merged[kept], torch.full((int(kept.sum()),), 1 / 0.3))


def test_dare_with_ties_base_elects_signs_on_dropped_vectors():
    v1, v2 = {"w": torch.full((4000,), 1.0)}, {"w": torch.full((4000,), -3.0)}
    merged = merge([v1, v2], "dare", density=0.5, dare_base="ties", scaling=1.0, seed=0)["w"]
    # where v2 survives its value (−6) wins the sign vote; where only v1 survives, +2 stays
    assert set(torch.unique(merged).tolist()) <= {-6.0, 0.0, 2.0}
    assert (merged == -6.0).float().mean().item() == pytest.approx(0.5, abs=0.05)


# ------------------------------------------------------------------------------------- validation
def test_fewer_than_two_vectors_is_rejected():
    with pytest.raises(MergeError, match="at least 2 task vectors, got 1"):
        merge(random_vectors(1), "ties")


def test_differing_keys_name_the_first_offending_parameter():
    vs = random_vectors(2)
    del vs[1]["b.weight"]
    with pytest.raises(MergeError, match=r"'b.weight'.*missing from task vector 1"):
        merge(vs, "task_arithmetic")
    vs = random_vectors(2)
    vs[1]["extra"] = torch.zeros(1)
    with pytest.raises(MergeError, match=r"'extra' is in task vector 1"):
        merge(vs, "task_arithmetic")


def test_differing_shapes_name_the_parameter_and_shapes():
    vs = random_vectors(2)
    vs[1]["a.bias"] = torch.zeros(8)
    with pytest.raises(MergeError, match=r"'a.bias' has shape \(7,\) in task vector 0 but \(8,\)"):
        merge(vs, "ties")


def test_unknown_method_lists_available_ones():
    with pytest.raises(MergeError, match="unknown merge method 'slerp'; available methods: .*dare, .*pcb, task_arithmetic, ties"):
        merge(random_vectors(2), "slerp")


def test_unknown_parameter_lists_valid_ones():
    with pytest.raises(MergeError, match="no parameter 'k'; valid parameters: density, scaling"):
        merge(random_vectors(2), "ties", k=20)
    with pytest.raises(MergeError, match="no parameter 'scaling'; valid parameters: none"):
        merge(random_vectors(2), "weight_average", scaling=1.0)


@pytest.mark.parametrize(
    "args, pattern",
    [
        ({"scaling": 0.0}, "finite number > 0"),
        ({"scaling": -1.0}, "finite number > 0"),
        ({"scaling": float("nan")}, "finite number > 0"),
        ({"scaling": float("inf")}, "finite number > 0"),
        ({"density": 0.0}, r"\(0, 1\]"),
        ({"density": 1.5}, r"\(0, 1\]"),
        ({"density": "0.2"}, "must be float"),
        ({"density": True}, "must be float"),
    ],
)
def test_bad_parameter_values_are_rejected(args, pattern):
    with pytest.raises(MergeError, match=pattern):
        merge(random_vectors(2), "ties", **args)


def test_bad_choice_and_integer_parameters_are_rejected():
    with pytest.raises(MergeError, match="one of"):
        merge(random_vectors(2), "dare", dare_base="slerp")
    with pytest.raises(MergeError, match="must be int"):
        merge(random_vectors(2), "dare", seed=1.5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_name_the_tensor_and_vector(bad):
    vs = random_vectors(3)
    vs[2]["b.weight"][1, 2, 0] = bad
    for method in (m for m in METHODS if not METHODS[m].needs_data):  # adamerging: tests/test_adamerging.py
        with pytest.raises(MergeError, match=r"tensor 'b.weight' of task vector 2 contains NaN or inf"):
            merge(vs, method)


def test_cli_method_args_are_parsed_and_validated():
    assert parse_method_args("dare", ["density=0.25", "dare_base=ties", "seed=4"]) == {
        "density": 0.25,
        "dare_base": "ties",
        "seed": 4,
    }
    with pytest.raises(MergeError, match="expects float, got 'abc'"):
        parse_method_args("ties", ["density=abc"])
    with pytest.raises(MergeError, match="valid parameters: density, scaling"):
        parse_method_args("ties", ["topk=3"])
    with pytest.raises(MergeError, match="not key=value"):
        parse_method_args("ties", ["0.2"])


def test_every_method_documents_its_parameters():
    for name, spec in METHODS.items():
        text = spec.describe()
        assert text.startswith(f"{name}:") and spec.paper in text
        assert all(f"{p}=" in text and spec.params[p].help for p in spec.params)
