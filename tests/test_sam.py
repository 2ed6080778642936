"""The SAM/ASAM math in saft_hf.sam, on plain tensors."""

import math

import torch

from saft_hf import sam


def _params():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, 4, generator=g), torch.randn(4, generator=g)]


def test_sam_epsilon_is_rho_times_normalised_gradient_over_all_params():
    params = _params()
    grads = [torch.full((3, 4), 1.0), torch.full((4,), 2.0)]
    original = [p.clone() for p in params]
    backup, norm = sam.first_step(params, [g.clone() for g in grads], rho=0.1)
    expected_norm = math.sqrt(12 * 1.0 + 4 * 4.0)
    assert math.isclose(norm.item(), expected_norm, rel_tol=1e-6)
    for p, o, g in zip(params, original, grads):
        torch.testing.assert_close(p - o, 0.1 * g / expected_norm)
    assert all(torch.equal(b, o) for b, o in zip(backup, original))


def test_asam_scales_weights_by_abs_w_plus_eta_and_leaves_biases_unscaled():
    params = _params()
    grads = [torch.randn(3, 4), torch.randn(4)]
    original = [p.clone() for p in params]
    mask = sam.adaptive_mask(["fc.weight", "fc.bias"])
    assert mask == [True, False]
    sam.first_step(params, [g.clone() for g in grads], rho=0.5, adaptive=mask, eta=0.01)
    t = original[0].abs() + 0.01
    norm = torch.sqrt(((t * grads[0]) ** 2).sum() + (grads[1] ** 2).sum())
    torch.testing.assert_close(params[0] - original[0], 0.5 * t * t * grads[0] / norm)
    torch.testing.assert_close(params[1] - original[1], 0.5 * grads[1] / norm)


def test_adaptive_scope_all_scales_every_parameter():
    assert sam.adaptive_mask(["a.weight", "a.bias", "ln.bias"], scope="all") == [True, True, True]


def test_restore_is_bitwise_even_in_bfloat16():
    params = [torch.randn(1000, dtype=torch.bfloat16)]
    original = params[0].clone()
    backup, _ = sam.first_step(params, [torch.randn(1000, dtype=torch.bfloat16)], rho=0.05)
    assert not torch.equal(params[0], original)
    sam.second_step(params, backup)
    assert torch.equal(params[0], original)


def test_zero_or_nonfinite_gradient_norm_skips_the_perturbation():
    for bad in (torch.zeros(4), torch.tensor([1.0, float("inf"), 0.0, 0.0]), torch.full((4,), float("nan"))):
        params = [torch.randn(4)]
        original = params[0].clone()
        backup, norm = sam.first_step(params, [bad], rho=0.05)
        assert backup is None
        assert torch.equal(params[0], original)
        assert not (torch.isfinite(norm) and norm > 0)


def test_parameters_without_gradient_are_not_moved():
    params = _params()
    original = [p.clone() for p in params]
    sam.first_step(params, [torch.ones(3, 4), None], rho=0.05)
    assert torch.equal(params[1], original[1])
    assert not torch.equal(params[0], original[0])


def test_given_backup_buffers_are_filled_and_reused_not_reallocated():
    params = _params()
    original = [p.clone() for p in params]
    buffers = [torch.full_like(p, 7.0) for p in params]
    backup, _ = sam.first_step(params, [torch.ones(3, 4), torch.ones(4)], rho=0.05, backup=buffers)
    assert all(b is buf for b, buf in zip(backup, buffers))
    assert all(torch.equal(b, o) for b, o in zip(buffers, original))
    sam.second_step(params, backup)
    assert all(torch.equal(p, o) for p, o in zip(params, original))


def test_asam_in_bfloat16_matches_the_fp32_formula_to_bf16_precision():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(64, 32, generator=g).to(torch.bfloat16)
    grad = torch.randn(64, 32, generator=g).to(torch.bfloat16)
    original = weight.clone()
    sam.first_step([weight], [grad.clone()], rho=5.0, adaptive=[True], eta=0.01)
    t = original.float().abs() + 0.01
    eps = 5.0 * t * t * grad.float() / torch.linalg.vector_norm(t * grad.float())
    assert weight.dtype == torch.bfloat16
    torch.testing.assert_close(weight.float(), (original.float() + eps).to(torch.bfloat16).float(), rtol=2**-7, atol=1e-2)
    assert not torch.equal(weight, original)


def test_select_takes_include_matches_then_drops_exclude_matches():
    names = ["fc1.weight", "fc1.bias", "norm.weight", "norm.bias"]
    assert sam.select(names) == [True] * 4
    assert sam.select(names, include=["norm"]) == [False, False, True, True]
    assert sam.select(names, include=["norm"], exclude=["bias"]) == [False, False, True, False]
    assert sam.select(names, exclude=["bias"]) == [True, False, True, False]


def test_looksam_direction_is_the_unit_part_of_g_s_orthogonal_to_g():
    g = [torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([0.0, 0.0])]
    g_s = [torch.tensor([[2.0, 3.0], [0.0, 0.0]]), torch.tensor([4.0, 0.0])]
    norm = sam.looksam_direction(g_s, g)  # g is overwritten with g_v / ||g_v||
    assert math.isclose(norm.item(), 5.0, rel_tol=1e-6)  # g_v = (0, 3, 0, 0 | 4, 0)
    torch.testing.assert_close(g[0], torch.tensor([[0.0, 0.6], [0.0, 0.0]]))
    torch.testing.assert_close(g[1], torch.tensor([0.8, 0.0]))


def test_looksam_direction_is_undefined_for_a_zero_gradient_or_g_s_parallel_to_it():
    assert sam.looksam_direction([torch.ones(3)], [torch.zeros(3)]) is None
    assert sam.looksam_direction([2 * torch.ones(3)], [torch.ones(3)]) is None


def test_looksam_reuse_adds_alpha_times_grad_norm_along_the_stored_direction():
    grads = [torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0]), None]
    direction = [torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.0]), torch.ones(2)]
    norm = sam.looksam_reuse(grads, direction, alpha=0.5)
    assert math.isclose(norm.item(), 5.0, rel_tol=1e-6)
    torch.testing.assert_close(grads[0], torch.tensor([3.0, 2.5]))
    torch.testing.assert_close(grads[1], torch.tensor([0.0, 4.0]))


def test_looksam_reuse_leaves_a_non_finite_gradient_alone():
    grads = [torch.tensor([float("inf"), 1.0])]
    sam.looksam_reuse(grads, [torch.tensor([0.0, 1.0])], alpha=0.7)
    assert grads[0][1].item() == 1.0
