"""TSV-M, Iso-C and Iso-CTS against references written from the papers' formulas, plus the spec's cases.

The references use the authors' zero-padded layout (full-width U/Σ/V blocks, SVD in the matrix's own
orientation), not the library's helpers; components at or below σ_max · max(m, n) · ε are zeroed,
the one rule the library adds to the authors' code (null-space vectors are an arbitrary basis).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping

import pytest
import torch

from saft_hf.merging import METHODS, MergeError, merge

SVD_METHODS = ("tsv_m", "iso_c", "iso_cts")
SHAPES = {
    "blocks.0.attn.weight": (12, 12),
    "blocks.0.fc1.weight": (20, 9),
    "blocks.0.fc2.weight": (9, 20),
    "blocks.0.fc1.bias": (20,),
    "conv.weight": (4, 3, 2, 2),
    "text_projection.weight": (6, 5),
}
EPS = torch.finfo(torch.float32).eps


def random_vectors(n: int, seed: int = 0, shapes=SHAPES) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(s, generator=g) * (1 + 0.5 * i) for k, s in shapes.items()} for i in range(n)]


def low_rank(shape, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)


# ------------------------------------------------------------------ references from the formulas
def svd_keep(matrix):
    """Full-orientation thin SVD with the null components' σ and vectors zeroed."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    null = s <= s[0] * max(matrix.shape) * EPS
    return u * ~null, s * ~null, vh * ~null[:, None]


def procrustes(x):
    """Nearest matrix with orthonormal columns (on the non-zero columns; zero columns stay zero)."""
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return (u @ vh) * (x.abs().sum(0) > 0)


def tsv_reference(mats):
    """Gargiulo et al. 2025: blocks of each task's top r/T components, Procrustes on U and V, U⊥ΣV⊥ᵀ."""
    t, r = len(mats), min(mats[0].shape)
    k = int(r * (1 / t))
    U = torch.zeros(mats[0].shape[0], r, dtype=torch.float64)
    S = torch.zeros(r, dtype=torch.float64)
    V = torch.zeros(r, mats[0].shape[1], dtype=torch.float64)
    for i, m in enumerate(mats):
        u, s, vh = svd_keep(m)
        U[:, i * k : (i + 1) * k], S[i * k : (i + 1) * k], V[i * k : (i + 1) * k] = u[:, :k], s[:k], vh[:k]
    return procrustes(U) @ torch.diag(S) @ procrustes(V.T).T


def iso_c_reference(mats):
    """Marczak et al. 2025, Iso-C: Σ_i Δ_i = UΣVᵀ → mean(Σ) · U Vᵀ."""
    total = sum(m.double() for m in mats)
    u, s, vh = svd_keep(total)
    return torch.linalg.svdvals(total).mean() * u @ vh


def iso_cts_reference(mats, share):
    """Marczak et al. 2025, Iso-CTS: common top-c of the sum + per-task top-s of the projected residual."""
    t, r = len(mats), min(mats[0].shape)
    c = int(r * share)
    c = r - round((r - c) / t) * t
    s_dim = (r - c) // t
    uc, sc, vhc = svd_keep(sum(m.double() for m in mats))
    uc, sc, vhc = uc[:, :c], sc[:c], vhc[:c]
    U, S, V = [], [], []
    for m in mats:
        u, s, vh = svd_keep(m.double() - uc @ uc.T @ m.double())
        U.append(u[:, :s_dim]), S.append(s[:s_dim]), V.append(vh[:s_dim])
    U, S, V = torch.cat(U + [uc], 1), torch.cat(S + [sc]), torch.cat(V + [vhc], 0)
    return S.mean() * procrustes(U) @ procrustes(V.T).T


def reference(method, vectors, scaling=1.0, share=0.8):
    out = {}
    for name, shape in SHAPES.items():
        mats = [v[name].float() for v in vectors]
        if len(shape) == 2 and "text_projection" not in name:
            fn = {"tsv_m": tsv_reference, "iso_c": iso_c_reference}.get(method)
            out[name] = fn(mats) if fn else iso_cts_reference(mats, share)
        else:
            out[name] = sum(m.double() for m in mats) / len(mats)
        out[name] = (scaling * out[name]).float()
    return out


def assert_close_dicts(actual, expected, atol=1e-4, rtol=1e-4):
    assert actual.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(actual[k].float(), expected[k], atol=atol, rtol=rtol, msg=k)


# ----------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("method", SVD_METHODS)
@pytest.mark.parametrize("n", [2, 3, 5])
def test_matches_the_formula_reference(method, n):
    vectors = random_vectors(n, seed=n)
    assert_close_dicts(merge(vectors, method, scaling=0.7), reference(method, vectors, scaling=0.7))


@pytest.mark.parametrize("share", [0.5, 0.8, 0.95])
def test_iso_cts_common_share_matches_the_reference(share):
    vectors = random_vectors(3, seed=11)
    assert_close_dicts(merge(vectors, "iso_cts", common_share=share), reference("iso_cts", vectors, share=share))


@pytest.mark.parametrize("method", SVD_METHODS)
def test_rank_deficient_and_all_zero_task_matrices_match_the_reference(method):
    vectors = random_vectors(4, seed=3)
    for name in ("blocks.0.attn.weight", "blocks.0.fc1.weight", "blocks.0.fc2.weight"):
        shape = SHAPES[name]
        vectors[0][name] = low_rank(shape, 1, seed=1)
        vectors[1][name] = low_rank(shape, 2, seed=2)
        vectors[2][name] = torch.zeros(shape)
    assert_close_dicts(merge(vectors, method), reference(method, vectors))


def test_tsv_m_of_low_rank_tasks_in_orthogonal_subspaces_is_their_sum():
    # Each task has rank 2 < k = 4 and its own row and column space: TSV-M has nothing to decorrelate,
    # so it must return Δ_1 + Δ_2 + Δ_3 — only if the null-space vectors of each SVD are not kept.
    q_left = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(0)))[0]
    q_right = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(1)))[0]
    tasks = [q_left[:, 2 * i : 2 * i + 2] @ torch.diag(torch.tensor([3.0 + i, 1.0])) @ q_right[:, 2 * i : 2 * i + 2].T
             for i in range(3)]
    merged = merge([{"w": t} for t in tasks], "tsv_m")["w"]
    torch.testing.assert_close(merged, sum(tasks), atol=1e-5, rtol=1e-5)


def test_iso_c_flattens_the_spectrum_on_the_sum_range_only():
    a, b = low_rank((12, 9), 2, seed=4), low_rank((12, 9), 1, seed=5)
    merged = merge([{"w": a}, {"w": b}], "iso_c")["w"]
    sigma = torch.linalg.svdvals(a + b)
    values = torch.linalg.svdvals(merged)
    torch.testing.assert_close(values[:3], sigma.sum().expand(3) / 9, rtol=1e-5, atol=1e-6)
    assert values[3:].max() < 1e-5 * values[0]
    # the merged columns lie in the column space of a + b
    basis = torch.linalg.svd(a + b)[0][:, :3]
    torch.testing.assert_close(basis @ basis.T @ merged, merged, atol=1e-5, rtol=1e-5)


def test_iso_cts_with_all_of_the_rank_common_is_iso_c():
    vectors = random_vectors(3, seed=8)
    assert_close_dicts(merge(vectors, "iso_cts", common_share=1.0), merge(vectors, "iso_c"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", SVD_METHODS)
def test_all_zero_task_vectors_merge_to_zero(method):
    vectors = [{k: torch.zeros(s) for k, s in SHAPES.items()} for _ in range(3)]
    assert all(torch.count_nonzero(t) == 0 for t in merge(vectors, method).values())


@pytest.mark.parametrize("method", SVD_METHODS)
def test_non_matrix_parameters_and_text_projection_are_the_scaled_mean(method):
    vectors = random_vectors(3, seed=9)
    merged = merge(vectors, method, scaling=1.5)
    for name in ("blocks.0.fc1.bias", "conv.weight", "text_projection.weight"):
        torch.testing.assert_close(merged[name], 1.5 * sum(v[name] for v in vectors) / 3)


@pytest.mark.parametrize("method", SVD_METHODS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_computed_in_float32_and_returned_in_their_dtype(method, dtype):
    vectors = [{k: v.to(dtype) for k, v in d.items()} for d in random_vectors(3, seed=10)]
    merged = merge(vectors, method)
    assert all(t.dtype == dtype for t in merged.values())
    expected = reference(method, [{k: v.float() for k, v in d.items()} for d in vectors])
    # the only error allowed is the final rounding to the input dtype
    assert_close_dicts(merged, {k: v.to(dtype).float() for k, v in expected.items()}, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("method", SVD_METHODS)
def test_a_task_vector_missing_a_tensor_is_named(method):
    vectors = random_vectors(3, seed=12)
    del vectors[2]["blocks.0.fc2.weight"]
    with pytest.raises(MergeError, match=r"'blocks.0.fc2.weight' is in task vector 0 but missing from task vector 2"):
        merge(vectors, method)


class OneLayerAtATime(Mapping[str, torch.Tensor]):
    """A lazy task vector that fails a read while a tensor of another parameter is still alive."""

    def __init__(self, tensors: dict[str, torch.Tensor], live: dict[str, list[weakref.ref]]) -> None:
        self.tensors, self.live = tensors, live
        self.shapes = {name: tuple(t.shape) for name, t in tensors.items()}  # as TaskVector has
        self.dtypes = {name: t.dtype for name, t in tensors.items()}  # headers, so merge() needs no extra read

    def __getitem__(self, name: str) -> torch.Tensor:
        alive = [other for other, refs in self.live.items() if other != name and any(r() is not None for r in refs)]
        assert not alive, f"reading {name!r} while tensors of {alive} are alive"
        tensor = self.tensors[name].clone()
        self.live.setdefault(name, []).append(weakref.ref(tensor))
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


@pytest.mark.parametrize("method", SVD_METHODS)
def test_only_one_parameter_of_the_task_vectors_is_alive_at_a_time(method):
    live: dict[str, list[weakref.ref]] = {}
    vectors = [OneLayerAtATime(v, live) for v in random_vectors(3, seed=13)]
    merged = merge(vectors, method)
    assert merged.keys() == SHAPES.keys() and all(len(refs) == 3 for refs in live.values())


def test_declared_defaults_and_search_grids():
    assert METHODS["tsv_m"].resolve({}) == {"qkv": "separate", "scaling": 1.0}
    assert METHODS["iso_cts"].resolve({}) == {"common_share": 0.8, "qkv": "separate", "scaling": 1.0}
    for method in SVD_METHODS:
        grid = METHODS[method].grid
        assert grid[0] == 0.1 and grid[-1] == 3.0 and len(grid) == 30  # authors' linspace(0, 3, 31)[1:]
    with pytest.raises(MergeError, match="common_share"):
        merge(random_vectors(2), "iso_cts", common_share=0.0)


# ------------------------------------------------------------------------------ saft-merge end to end
@pytest.fixture(scope="module")
def cli_vector_dirs(tiny_clip_dir, tmp_path_factory):
    from tests.fixtures_clip import TINY_TASKS
    from tests.test_cli_merge import _make_vector

    root = tmp_path_factory.mktemp("svd-vectors")
    return [_make_vector(tiny_clip_dir, task, seed, root / task) for seed, task in enumerate(TINY_TASKS, start=1)]


@pytest.mark.parametrize("method", SVD_METHODS)
def test_saft_merge_writes_base_plus_the_method_merge(method, tiny_clip_dir, cli_vector_dirs, tmp_path):
    import json

    from safetensors.torch import load_file

    from saft_hf.cli.merge import main
    from saft_hf.clip import load_vision_tower
    from saft_hf.task_vectors import TaskVector

    out = tmp_path / method
    args = ["--method-arg", "common_share=0.5"] if method == "iso_cts" else []
    code = main(["--repos", ",".join(map(str, cli_vector_dirs)), "--method", method, *args, "--scaling", "0.6",
                 "--output", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    merged = load_file(str(out / "model.safetensors"))
    base = {n: p.detach() for n, p in load_vision_tower(tiny_clip_dir).named_parameters()}
    extra = {"common_share": 0.5} if method == "iso_cts" else {}
    tau = merge([TaskVector.from_pretrained(d) for d in cli_vector_dirs], method, scaling=0.6, **extra)
    for name, theta in base.items():
        torch.testing.assert_close(merged[name], theta + tau[name], atol=1e-6, rtol=1e-6, msg=name)
    assert any(t.dim() == 2 and torch.count_nonzero(t) for t in tau.values())  # not a vacuous merge
    config = json.loads((out / "merge_config.json").read_text())
    assert config["method"] == method and config["method_args"] == {**extra, "qkv": "separate", "scaling": 0.6}


def test_saft_merge_search_uses_the_method_grid(cli_vector_dirs, tiny_task_data_dir, tmp_path):
    import json

    from saft_hf.cli.merge import main

    out = tmp_path / "iso-search"
    code = main(["--repos", ",".join(map(str, cli_vector_dirs)), "--method", "iso_c", "--search",
                 "--data-dir", str(tiny_task_data_dir), "--max-eval-samples", "4", "--batch-size", "4",
                 "--output", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    search = json.loads((out / "results.json").read_text())["search"]
    assert [row["scaling"] for row in search["table"]] == list(METHODS["iso_c"].grid)
    assert search["best_scaling"] == max(search["table"], key=lambda row: row["score"])["scaling"]


# ------------------------------------------------------------------- attention q/k/v: separate or stacked
ATTENTION = {
    "layers.0.self_attn.q_proj.weight": (8, 8),
    "layers.0.self_attn.k_proj.weight": (8, 8),
    "layers.0.self_attn.v_proj.weight": (8, 8),
    "layers.0.self_attn.q_proj.bias": (8,),
    "layers.0.self_attn.out_proj.weight": (8, 8),
    "layers.0.mlp.fc1.weight": (10, 8),
}
FORMULAS = {"tsv_m": tsv_reference, "iso_c": iso_c_reference, "iso_cts": lambda m: iso_cts_reference(m, 0.8)}


@pytest.mark.parametrize("method", SVD_METHODS)
def test_stacked_qkv_decomposes_open_clips_in_proj_matrix_and_splits_it_back(method):
    vectors = random_vectors(3, seed=21, shapes=ATTENTION)
    merged = merge(vectors, method, qkv="stacked", scaling=0.7)
    names = [f"layers.0.self_attn.{x}_proj.weight" for x in "qkv"]
    in_proj = FORMULAS[method]([torch.cat([v[n] for n in names], dim=0) for v in vectors])  # 24 x 8, as open_clip
    for name, block in zip(names, (0.7 * in_proj).float().split(8, dim=0)):
        torch.testing.assert_close(merged[name], block, atol=1e-4, rtol=1e-4, msg=name)
    for name in ("layers.0.self_attn.out_proj.weight", "layers.0.mlp.fc1.weight"):  # other matrices: as before
        torch.testing.assert_close(merged[name], (0.7 * FORMULAS[method]([v[name] for v in vectors])).float(),
                                   atol=1e-4, rtol=1e-4)  # fmt: skip
    assert list(merged) == list(ATTENTION)


@pytest.mark.parametrize("method", SVD_METHODS)
def test_separate_qkv_is_the_default_and_differs_from_stacked(method):
    vectors = random_vectors(3, seed=22, shapes=ATTENTION)
    default, stacked = merge(vectors, method), merge(vectors, method, qkv="stacked")
    assert_close_dicts(default, {k: v.float() for k, v in merge(vectors, method, qkv="separate").items()})
    q = "layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(default[q], FORMULAS[method]([v[q] for v in vectors]).float(), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(default[q], stacked[q], atol=1e-3)


def test_an_unknown_qkv_mode_names_the_choices():
    with pytest.raises(MergeError, match="separate"):
        merge(random_vectors(2, shapes=ATTENTION), "tsv_m", qkv="fused")
