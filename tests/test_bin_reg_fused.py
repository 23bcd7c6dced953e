"""The vectorised BR loss: its paths (deferred gradient on activations, per-bin sum methods,
memory layouts) against the slow per-bin reference of tests/test_bin_reg.py."""

import pytest
import torch

from quant import LSQQuantizer
from regularizers import bin_regularization
from regularizers.bin_reg import _bin_sum, _BinRegularization
from test_bin_reg import _reference


def _activation(shape=(4, 3, 6, 6), seed=0, channels_last=False, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=dtype) * 0.8).relu()
    return x.to(memory_format=torch.channels_last) if channels_last else x


def _quantizer(alpha=0.3):
    q = LSQQuantizer(2, signed=False, grad_count="per_sample").double().train()
    with torch.no_grad():
        q.alpha.fill_(alpha)
    q.initialized.fill_(True)
    q._is_initialized = True
    return q


def _step(base, deferred_allowed, backprop, channels_last=False):
    """BR of a quantizer's input plus a loss through the quantizer, as in A-BR training."""
    q = _quantizer()
    v = base * 1.0
    out = q(v)
    if deferred_allowed:
        loss, info = bin_regularization(v, q.alpha, 0, 3, backprop_to_alpha=backprop)
    else:  # the direct path, as for any tensor that is not a quantizer input
        loss, info = _BinRegularization.apply(v, q.alpha, 0, 3, backprop)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (loss + (out * weights).sum()).backward()
    return loss, info, v, q.alpha.grad


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("backprop", [False, True])
def test_deferred_gradient_on_a_quantizer_input_matches_the_direct_path(channels_last, backprop):
    base = _activation(channels_last=channels_last).requires_grad_()
    loss, info, v, alpha_grad = _step(base, True, backprop)
    assert v._backward_hooks  # the deferred path was taken
    ref_base = base.detach().clone().requires_grad_()
    ref_loss, ref_info, _, ref_alpha_grad = _step(ref_base, False, backprop)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    torch.testing.assert_close(info, ref_info)
    torch.testing.assert_close(base.grad, ref_base.grad, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(alpha_grad, ref_alpha_grad)


def test_direct_path_on_a_non_leaf_matches_the_reference_and_survives_retain_graph():
    base = _activation(seed=1).requires_grad_()
    alpha = torch.tensor(0.25, dtype=torch.float64)
    v = base * 2.0  # not a quantizer input: gradient returned directly
    loss, _ = bin_regularization(v, alpha, 0, 3, backprop_to_alpha=False)
    (g1,) = torch.autograd.grad(loss, base, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, base)
    ref_base = base.detach().clone().requires_grad_()
    (r,) = torch.autograd.grad(_reference(ref_base * 2.0, alpha, 0, 3), ref_base)
    torch.testing.assert_close(g1, r, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g2, r, rtol=1e-9, atol=1e-12)


def test_deferred_gradient_twice_with_retain_graph_and_not_without_the_br_loss():
    base = _activation(seed=2).requires_grad_()
    q = _quantizer()
    v = base * 1.0
    out = q(v)
    loss, _ = bin_regularization(v, q.alpha, 0, 3, backprop_to_alpha=False)
    total = loss + out.sum()
    (g1,) = torch.autograd.grad(total, base, retain_graph=True)
    (g2,) = torch.autograd.grad(total, base, retain_graph=True)
    (g_out,) = torch.autograd.grad(out.sum(), base)  # the BR loss is not in this one
    ref = _reference(base.detach().clone().requires_grad_(), q.alpha.detach(), 0, 3)
    torch.testing.assert_close(g1, g2)
    assert not torch.allclose(g1, g_out)
    plain = base.detach().clone().requires_grad_()
    (g_plain,) = torch.autograd.grad(q(plain * 1.0).sum(), plain)
    torch.testing.assert_close(g_out, g_plain)
    assert ref.item() == pytest.approx(loss.item(), rel=1e-10)


def test_low_precision_activation_is_regularised_in_float32():
    base = _activation(seed=3, dtype=torch.float32).to(torch.bfloat16).requires_grad_()
    v = base * 1.0
    loss, _ = bin_regularization(v, torch.tensor(0.3), 0, 3, backprop_to_alpha=False)
    loss.backward()
    ref_base = base.detach().float().requires_grad_()
    ref = _reference(ref_base * 1.0, torch.tensor(0.3), 0, 3)
    ref.backward()
    assert loss.dtype == torch.float32 and base.grad.dtype == torch.bfloat16
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(base.grad.float(), ref_base.grad, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("method", ["bincount", "one_hot", "index_add"])
@pytest.mark.parametrize("num_bins", [4, 256])
def test_per_bin_sum_methods_agree(method, num_bins):
    gen = torch.Generator().manual_seed(num_bins)
    index = torch.randint(0, num_bins, (1000,), generator=gen)
    values = torch.randn(1000, generator=gen, dtype=torch.float64)
    index = index.to(torch.uint8) if method == "bincount" else index
    expected_counts = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, index.long(), torch.ones(1000, dtype=torch.float64))
    expected_sums = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, index.long(), values)
    counts = _bin_sum(index, num_bins, dtype=torch.float64, method=method)
    sums = _bin_sum(index, num_bins, values, method=method)
    assert counts.shape == (num_bins,) and counts.dtype == torch.float64
    torch.testing.assert_close(counts, expected_counts)
    torch.testing.assert_close(sums, expected_sums)


def test_non_finite_values_give_a_nan_loss_not_an_error():
    for bad in (float("nan"), float("inf")):
        base = torch.tensor([0.1, 0.5, bad, 1.2], requires_grad=True)
        v = base * 1.0
        loss, info = bin_regularization(v, torch.tensor(0.3), 0, 3, backprop_to_alpha=True)
        loss.backward()
        assert not torch.isfinite(loss) or not torch.isfinite(info).all()
    loss, _ = bin_regularization(torch.tensor([0.1, 0.5]), torch.tensor(float("nan")), -2, 1, False)
    assert loss.isnan()
