"""The fused LSQ fake quantizer against the plain autograd formulation (values and gradients).

The plain formulation is the one the fused ``_LSQFakeQuantize`` replaces:
``round_ste(clamp(x / a, Qmin, Qmax)) * a`` with ``a = scale_grad(alpha, g)``, every step a
differentiable torch op. Forward values must agree bit for bit; the gradient to ``x`` is
the STE mask times the incoming gradient (the plain form multiplies and divides by ``a`` on
the way, so it may differ by an ulp); the gradient to ``alpha`` is the same sum in another
order, equal up to rounding.
"""

import math

import pytest
import torch

from quant import LSQQuantizer, integer_range
from quant.lsq import lsq_fake_quantize


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Return ``x`` in the forward pass; multiply its gradient by ``scale`` (LSQ eq. 4's g)."""
    scaled = x * scale
    return (x - scaled).detach() + scaled


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest in the forward pass, identity gradient (straight-through estimator)."""
    return (x.round() - x).detach() + x


def plain_lsq(x, alpha, quant_min, quant_max, grad_scale):
    """LSQ eq. 1-4 with plain autograd ops (the reference)."""
    a = scale_grad(alpha, grad_scale).to(x.dtype)
    return round_ste(torch.clamp(x / a, quant_min, quant_max)) * a


def _both(x, alpha, qmin, qmax, g, grad_out):
    results = []
    for fn in (lsq_fake_quantize, plain_lsq):
        xi = x.detach().clone().requires_grad_()
        ai = alpha.detach().clone().requires_grad_()
        out = fn(xi, ai, qmin, qmax, g)
        out.backward(grad_out)
        results.append((out.detach(), xi.grad, ai.grad))
    return results


@pytest.mark.parametrize("bits,signed", [(2, True), (2, False), (3, True), (4, False), (8, True), (8, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_plain_autograd_on_random_inputs(bits, signed, dtype):
    qmin, qmax = integer_range(bits, signed)
    gen = torch.Generator().manual_seed(bits * 7 + signed)
    x = torch.randn(8, 4, 6, 6, generator=gen, dtype=dtype) * 1.5
    if not signed:
        x = x.relu()  # exact zeros sit on the lower edge of the range (clipped: no x-gradient)
    alpha = torch.tensor(0.37, dtype=torch.float32)
    g = 1.0 / math.sqrt(x[0].numel() * qmax)
    grad_out = torch.randn(x.shape, generator=gen, dtype=dtype)
    (f_out, f_gx, f_ga), (p_out, p_gx, p_ga) = _both(x, alpha, qmin, qmax, g, grad_out)
    assert torch.equal(f_out, p_out)
    assert f_out.dtype == x.dtype and f_gx.dtype == x.dtype and f_ga.dtype == alpha.dtype
    torch.testing.assert_close(f_gx, p_gx, rtol=1e-6, atol=0)
    torch.testing.assert_close(f_ga, p_ga, rtol=2e-4, atol=1e-7)


def test_range_edges_and_non_finite_values_match():
    # x/α lands exactly on Qmin and Qmax (clipped: the STE passes only the open interval),
    # just inside, just outside, far outside, zero and ±inf.
    alpha = torch.tensor(0.5)
    x = torch.tensor([-1.0, 0.5, -0.9999999, 0.4999999, -1.0000001, 0.5000001, -40.0, 40.0, 0.0,
                      float("inf"), float("-inf")])
    grad_out = torch.linspace(-1, 1, x.numel())
    (f_out, f_gx, f_ga), (p_out, p_gx, p_ga) = _both(x, alpha, -2, 1, 0.3, grad_out)
    assert torch.equal(f_out, p_out)
    assert torch.equal(f_gx, p_gx)
    assert f_gx[:4].tolist() == [0.0, 0.0, grad_out[2].item(), grad_out[3].item()]
    torch.testing.assert_close(f_ga, p_ga, equal_nan=True)  # ±inf make the α-gradient NaN in both
    (f_out, f_gx, f_ga), (p_out, p_gx, p_ga) = _both(x[:-2], alpha, -2, 1, 0.3, grad_out[:-2])
    torch.testing.assert_close(f_ga, p_ga)
    # A NaN input gives a NaN output in both; only its own x-gradient differs (documented).
    nan = torch.tensor([float("nan"), 0.2])
    (f_out, f_gx, _), (p_out, p_gx, _) = _both(nan, alpha, -2, 1, 0.3, torch.ones(2))
    assert torch.equal(f_out.isnan(), p_out.isnan()) and f_gx[1] == p_gx[1]


def test_channels_last_layout_is_kept_and_gradients_match():
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 5, 6, 6, generator=gen).relu()).to(memory_format=torch.channels_last)
    grad_out = torch.randn(x.shape, generator=gen).to(memory_format=torch.channels_last)
    alpha = torch.tensor(0.25)
    (f_out, f_gx, f_ga), (p_out, p_gx, p_ga) = _both(x, alpha, 0, 3, 0.05, grad_out)
    assert f_out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(f_out, p_out)
    torch.testing.assert_close(f_gx, p_gx, rtol=1e-6, atol=0)
    torch.testing.assert_close(f_ga, p_ga, rtol=2e-4, atol=1e-7)


def test_bfloat16_input_gives_bfloat16_output_and_float32_alpha_gradient():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 4, 4, generator=gen).relu().to(torch.bfloat16)
    grad_out = torch.randn(x.shape, generator=gen).to(torch.bfloat16)
    alpha = torch.tensor(0.3)
    (f_out, f_gx, f_ga), (p_out, p_gx, p_ga) = _both(x, alpha, 0, 3, 0.1, grad_out)
    assert f_out.dtype == torch.bfloat16 and f_ga.dtype == torch.float32
    assert torch.equal(f_out, p_out)
    torch.testing.assert_close(f_gx, p_gx)
    torch.testing.assert_close(f_ga, p_ga, rtol=2e-2, atol=1e-3)


def test_quantizer_uses_the_fused_path_and_alpha_only_or_x_only_gradients_work():
    q = LSQQuantizer(2, signed=False, grad_count="per_sample")
    x = torch.rand(3, 4) * 2
    q(x)  # initialise
    out = q(x.requires_grad_())
    assert out.grad_fn is not None and "LSQFakeQuantize" in type(out.grad_fn).__name__
    q.alpha.requires_grad_(False)
    q(x).sum().backward()  # no gradient to α wanted
    assert x.grad is not None and q.alpha.grad is None
    q.alpha.requires_grad_(True)
    frozen = x.detach()
    q(frozen).sum().backward()  # no gradient to x wanted (the image input of the first layer)
    assert q.alpha.grad is not None


def test_signed_zeros_and_ties_are_those_of_torch_round():
    # x/α in (-0.5, 0] rounds to -0.0 in torch; exact ties k + 0.5 round to even
    alpha = torch.tensor(0.25)
    x = torch.tensor([-0.1, -0.0, 0.0, 0.1, 0.125, -0.125, 0.375, -0.375, 0.625, -0.625] * 4)
    out = lsq_fake_quantize(x, alpha, -2, 1, 0.5)
    ref = torch.clamp(x / alpha, -2, 1).round() * alpha
    assert torch.equal(out, ref)
    assert torch.equal(torch.signbit(out), torch.signbit(ref))


def test_a_gradient_for_absent_statistics_is_ignored():
    # torch.compile can hand the backward pass a (3, 0) gradient for statistics never asked for
    from quant.lsq import _LSQFakeQuantize
    x = torch.rand(4, 5, requires_grad=True)
    alpha = torch.tensor(0.3, requires_grad=True)
    out, stats, _ = _LSQFakeQuantize.apply(x, alpha, 0, 3, 0.1, None)
    assert stats.shape == (3, 0)
    (out.sum() + stats.sum()).backward()
    ref_x = x.detach().clone().requires_grad_()
    ref_a = alpha.detach().clone().requires_grad_()
    plain_lsq(ref_x, ref_a, 0, 3, 0.1).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)
    torch.testing.assert_close(alpha.grad, ref_a.grad)
