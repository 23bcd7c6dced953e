"""Bin Regularization (Han et al. 2021, eq. 5) against values worked out by hand and a slow reference."""

import pytest
import torch

from regularizers import INFO_FIELDS, BinRegularizer, bin_regularization


def _info(info_vector):
    return dict(zip(INFO_FIELDS, info_vector.tolist()))


def test_signed_2bit_by_hand_both_gradient_modes():
    # α = 0.5, range [-2, 1]; v/α = [-2.6, -1.8, 0.2, 0.4, 1.2, 4.0] -> bins [-2, -2, 0, 0, 1, 1]
    # bin -2 (target -1.0): {-1.3, -0.9}: mean -1.1 -> 0.01, var 0.04
    # bin -1: empty (skipped)
    # bin  0 (target 0.0):  {0.1, 0.2}:  mean 0.15 -> 0.0225, var 0.0025
    # bin  1 (target 0.5):  {0.6, 2.0}:  mean 1.3 -> 0.64,   var 0.49
    # loss = 0.05 + 0.025 + 1.13 = 1.205
    reg = BinRegularizer(2, signed=True)
    for backprop in (False, True):
        v = torch.tensor([-1.3, -0.9, 0.1, 0.2, 0.6, 2.0], requires_grad=True)
        alpha = torch.nn.Parameter(torch.tensor(0.5))
        loss, info = reg.compute_total_loss({"w": v}, {"w": alpha}, backprop_to_alpha=backprop)
        assert loss.item() == pytest.approx(1.205, rel=1e-5)
        loss.backward()
        # d/dv_i = 2 (v_i - t_i) / n_bin
        assert torch.allclose(v.grad, torch.tensor([-0.3, 0.1, 0.1, 0.2, 0.1, 1.5]), atol=1e-6)
        if backprop:
            # d/dα Σ (m_k - kα)² = Σ -2k (m_k - kα) = -0.4 + 0 - 1.6
            assert alpha.grad.item() == pytest.approx(-2.0, rel=1e-5)
        else:
            assert alpha.grad is None or alpha.grad.item() == 0.0
        per = _info(info["per_tensor"]["w"])
        assert per["mean_term"] == pytest.approx(0.6725, rel=1e-5)
        assert per["var_term"] == pytest.approx(0.5325, rel=1e-5)
        assert per["nonempty_bins"] == 3
        assert per["mean_dist_alpha"] == pytest.approx(2.3 / 6 / 0.5, rel=1e-5)


def test_unsigned_2bit_by_hand_with_one_element_and_empty_bins():
    # α = 0.25, range [0, 3]; v/α = [-1.2, 0.2, 1.2, 1.4, 3.6, 0.4] -> bins [0, 0, 1, 1, 3, 0]
    # bin 0 (target 0):    {-0.3, 0.05, 0.1}: mean -0.05 -> 0.0025, var 0.095/3
    # bin 1 (target 0.25): {0.3, 0.35}: mean 0.325 -> 0.005625, var 0.000625
    # bin 2: empty; bin 3 (target 0.75): {0.9}: 0.0225, var 0 (one element)
    v = torch.tensor([-0.3, 0.05, 0.3, 0.35, 0.9, 0.1], requires_grad=True)
    alpha = torch.tensor(0.25, requires_grad=True)
    loss, info = bin_regularization(v, alpha, 0, 3, backprop_to_alpha=True)
    assert loss.item() == pytest.approx(0.0025 + 0.095 / 3 + 0.005625 + 0.000625 + 0.0225, rel=1e-5)
    loss.backward()
    expected_v = [2 * -0.3 / 3, 2 * 0.05 / 3, 2 * 0.05 / 2, 2 * 0.1 / 2, 2 * 0.15, 2 * 0.1 / 3]
    assert torch.allclose(v.grad, torch.tensor(expected_v), atol=1e-6)
    assert alpha.grad.item() == pytest.approx(-2 * 1 * 0.075 - 2 * 3 * 0.15, rel=1e-5)
    assert _info(info)["nonempty_bins"] == 3


def test_values_far_outside_land_in_edge_bins():
    # α = 1, signed 2-bit: -100 -> bin -2 (target -2), 100 -> bin 1 (target 1)
    loss, info = bin_regularization(torch.tensor([-100.0, 100.0]), torch.tensor(1.0), -2, 1, False)
    assert loss.item() == pytest.approx(98.0**2 + 99.0**2)
    assert _info(info)["nonempty_bins"] == 2


def test_values_on_their_levels_cost_nothing():
    v = torch.tensor([-0.4, -0.2, 0.0, 0.2, 0.2])
    loss, info = bin_regularization(v, torch.tensor(0.2), -2, 1, False)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    assert _info(info)["mean_dist_alpha"] == pytest.approx(0.0, abs=1e-6)


def _reference(v, alpha, qmin, qmax):
    """Slow obvious eq. 5: loop over bins, mean and biased variance of each non-empty one."""
    k = torch.clamp(torch.round(v.detach() / alpha.detach()), qmin, qmax)
    total = v.new_zeros(())
    for level in range(qmin, qmax + 1):
        members = v[k == level]
        if members.numel():
            total = total + (members.mean() - level * alpha) ** 2 + members.var(unbiased=False)
    return total


@pytest.mark.parametrize("signed,bits", [(True, 2), (False, 2), (True, 3), (False, 4)])
def test_matches_slow_reference_value_and_gradients(signed, bits):
    from quant import integer_range
    qmin, qmax = integer_range(bits, signed)
    gen = torch.Generator().manual_seed(bits + 10 * signed)
    v = (torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64) * 0.7).requires_grad_()
    alpha = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    loss, _ = bin_regularization(v, alpha, qmin, qmax, backprop_to_alpha=True)
    g_v, g_a = torch.autograd.grad(loss, (v, alpha))
    ref = _reference(v, alpha, qmin, qmax)
    r_v, r_a = torch.autograd.grad(ref, (v, alpha))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
    assert torch.allclose(g_v, r_v, rtol=1e-9, atol=1e-12)
    assert g_a.item() == pytest.approx(r_a.item(), rel=1e-9)


def test_gradcheck():
    v = torch.tensor([-0.9, -0.35, 0.1, 0.12, 0.55, 2.0], dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: bin_regularization(a, b, -2, 1, True)[0], (v, alpha))


def test_low_precision_input_is_computed_in_float32():
    v = torch.tensor([0.1, 0.2, 0.6, 2.0], dtype=torch.bfloat16, requires_grad=True)
    loss, _ = bin_regularization(v, torch.tensor(0.5), -2, 1, False)
    assert loss.dtype == torch.float32
    loss.backward()
    assert v.grad.dtype == torch.bfloat16


def test_total_sums_tensors_and_mismatched_keys_are_an_error():
    reg = BinRegularizer(2, signed=True)
    a = torch.tensor([-100.0, 100.0])
    total, info = reg.compute_total_loss({"x": a, "y": a}, {"x": torch.tensor(1.0), "y": torch.tensor(1.0)}, False)
    assert total.item() == pytest.approx(2 * (98.0**2 + 99.0**2))
    assert set(info["per_tensor"]) == {"x", "y"}
    assert _info(info["total"])["nonempty_bins"] == 4
    with pytest.raises(KeyError, match="'z'"):
        reg.compute_total_loss({"x": a}, {"z": torch.tensor(1.0)}, False)


@pytest.mark.parametrize("alpha", [0.0, -0.5, float("nan"), float("inf"), float("-inf")])
def test_a_step_size_that_is_not_finite_and_positive_is_refused(alpha):
    v = torch.tensor([0.1, 0.6])
    with pytest.raises(ValueError, match="step size α must be a finite number > 0"):
        bin_regularization(v, torch.tensor(alpha), -2, 1, False)
    reg = BinRegularizer(2, signed=True)
    with pytest.raises(ValueError, match=r"finite number > 0, got .* \(tensor 1 of 2\)"):
        reg.compute_total_loss({"x": v, "y": v}, {"x": torch.tensor(0.5), "y": torch.tensor(alpha)}, False)
