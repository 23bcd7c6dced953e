"""BR's bin statistics on their two paths, against the slow per-bin reference of
tests/test_bin_reg.py: inside the LSQ quantizer (A-BR; the fused CPU kernels for float32
on the CPU, PyTorch ops otherwise) and batched over several tensors (W-BR)."""

import shutil

import pytest
import torch

import quant.lsq
from quant import LSQQuantizer, integer_range
from quant.bins import bin_sum
from quant.kernels import cpu_kernels
from reference_bins import bin_statistics
from regularizers import BinRegularizer, bin_regularization
from regularizers.bin_reg import eager_stats, loss_from_bin_stats
from test_bin_reg import _reference
from test_lsq_fused import plain_lsq


def _activation(shape=(4, 3, 6, 6), seed=0, channels_last=False, dtype=torch.float32, signed=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.8
    x = (x if signed else x.relu()).to(dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def _quantizer(bits, signed, alpha, dtype, grad_to_alpha):
    q = LSQQuantizer(bits, signed=signed, grad_count="per_sample").to(dtype).train()
    with torch.no_grad():
        q.alpha.fill_(alpha)
    q.initialized.fill_(True)
    q._is_initialized = True
    q.bin_stats_grad_to_alpha = grad_to_alpha
    return q


def _quantizer_step(x, bits, signed, grad_to_alpha, alpha=0.3):
    """A-BR through the quantizer's own statistics, plus a loss through its output (as in training)."""
    q = _quantizer(bits, signed, alpha, x.dtype, grad_to_alpha)
    got = []
    q.bin_stats_sink = got.append
    xi = x.detach().clone().requires_grad_()
    out = q(xi)
    (stats,) = got
    br, info = loss_from_bin_stats(stats.stats, stats.abs_sum, stats.numel, stats.alpha)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (br + (out * weights).sum()).backward()
    return out.detach(), br.detach(), info, xi.grad, q.alpha.grad


def _reference_step(x, bits, signed, grad_to_alpha, alpha=0.3):
    """The same from plain autograd LSQ and the per-bin loop (float64)."""
    qmin, qmax = integer_range(bits, signed)
    xi = x.detach().double().clone().requires_grad_()
    a = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
    grad_scale = 1.0 / (x[0].numel() * qmax) ** 0.5
    out = plain_lsq(xi, a, qmin, qmax, grad_scale)
    br = _reference(xi, a if grad_to_alpha else a.detach(), qmin, qmax)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (br + (out * weights).sum()).backward()
    return out.detach(), br.detach(), xi.grad, a.grad


CASES = [(2, False), (3, True), (4, False), (5, False), (8, True)]  # 4 to 256 bins: vector and scalar kernels


@pytest.mark.parametrize("bits,signed", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("grad_to_alpha", [False, True])
def test_quantizer_statistics_match_the_per_bin_reference(bits, signed, dtype, grad_to_alpha):
    x = _activation(seed=bits, dtype=dtype, signed=signed)
    out, br, info, g_x, g_a = _quantizer_step(x, bits, signed, grad_to_alpha)
    r_out, r_br, r_x, r_a = _reference_step(x, bits, signed, grad_to_alpha)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.double(), r_out, **tol)  # bit-identity to LSQ: tests/test_lsq_fused.py
    assert br.item() == pytest.approx(r_br.item(), rel=tol["rtol"])
    torch.testing.assert_close(g_x.double(), r_x, **tol)
    torch.testing.assert_close(g_a.double(), r_a, rtol=1e-4 if dtype == torch.float32 else 1e-8, atol=1e-6)
    qmin, qmax = integer_range(bits, signed)
    k = torch.clamp(torch.round(x.double() / 0.3), qmin, qmax)
    assert info[2].item() == len(k.unique())  # non-empty bins, counted independently
    assert info[3].item() == pytest.approx(((x.double() - k * 0.3).abs().mean() / 0.3).item(), rel=1e-5)


def test_detached_statistics_send_nothing_to_alpha_but_everything_to_the_input():
    x = _activation(seed=7)
    _, _, _, g_x_det, g_a_det = _quantizer_step(x, 2, False, grad_to_alpha=False)
    _, _, _, g_x_to, g_a_to = _quantizer_step(x, 2, False, grad_to_alpha=True)
    torch.testing.assert_close(g_x_det, g_x_to)  # the input's gradient does not depend on the mode
    q = _quantizer(2, False, 0.3, torch.float32, False)
    xi = x.clone().requires_grad_()
    (q(xi) * torch.linspace(-1, 1, x.numel()).view_as(x)).sum().backward()
    torch.testing.assert_close(g_a_det, q.alpha.grad)  # detached: α gets LSQ's gradient only
    assert not torch.allclose(g_a_to, q.alpha.grad)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bits,signed", CASES)
def test_fused_kernels_match_the_pytorch_path(bits, signed, channels_last, monkeypatch):
    x = _activation(shape=(3, 5, 7, 9), seed=bits, channels_last=channels_last, signed=signed) * 1.7
    fused = _quantizer_step(x, bits, signed, True)
    monkeypatch.setattr(quant.lsq, "kernels_apply", lambda _x: False)
    eager = _quantizer_step(x, bits, signed, True)
    assert torch.equal(fused[0], eager[0])
    assert fused[0].is_contiguous(memory_format=torch.channels_last) == channels_last
    assert fused[1].item() == pytest.approx(eager[1].item(), rel=1e-5)
    torch.testing.assert_close(fused[2], eager[2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused[3], eager[3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused[4], eager[4], rtol=1e-4, atol=1e-6)


def test_kernels_are_built_where_a_compiler_exists():
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler: the PyTorch path is used")
    assert cpu_kernels() is not None


def test_kernel_sums_do_not_depend_on_the_thread_count():
    x = _activation(shape=(64, 16, 16, 16), seed=3)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(_quantizer_step(x, 2, False, True))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_statistics_of_several_tensors_at_once_match_each_alone():
    gen = torch.Generator().manual_seed(5)
    values = [(torch.randn(shape, generator=gen, dtype=torch.float64) * 0.3).requires_grad_()
              for shape in [(8, 3, 3, 3), (5,), (4, 6)]]
    alphas = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (0.1, 0.25, 0.05)]
    reg = BinRegularizer(2, signed=True)
    total, info = reg.compute_total_loss(dict(zip("abc", values)), dict(zip("abc", alphas)), backprop_to_alpha=True)
    grads = torch.autograd.grad(total, values + alphas)
    ref = sum(_reference(v, a, -2, 1) for v, a in zip(values, alphas))
    ref_grads = torch.autograd.grad(ref, values + alphas)
    assert total.item() == pytest.approx(ref.item(), rel=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)
    for name, v, a in zip("abc", values, alphas):
        alone, alone_info = bin_regularization(v, a, -2, 1, backprop_to_alpha=True)
        torch.testing.assert_close(info["per_tensor"][name], alone_info)


def test_batched_statistics_need_matching_lists():
    with pytest.raises(ValueError, match="as many step sizes as tensors"):
        bin_statistics([torch.zeros(3)], [], -2, 1, False)


def test_low_precision_activation_is_regularised_in_float32():
    x = _activation(seed=3).to(torch.bfloat16)
    q = _quantizer(2, False, 0.3, torch.float32, False)
    got = []
    q.bin_stats_sink = got.append
    xi = x.clone().requires_grad_()
    q(xi)
    br, _ = loss_from_bin_stats(got[0].stats, got[0].abs_sum, got[0].numel, got[0].alpha)
    br.backward()
    ref_x = x.float().requires_grad_()
    # The grid is the one the bfloat16 output lies on: α rounded to bfloat16 (0.30078125).
    ref = _reference(ref_x, torch.tensor(0.3).bfloat16().float(), 0, 3)
    ref.backward()
    assert br.dtype == torch.float32 and xi.grad.dtype == torch.bfloat16
    assert br.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(xi.grad.float(), ref_x.grad, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("method", ["bincount", "masked", "index_add"])
@pytest.mark.parametrize("num_bins", [4, 256])
def test_per_bin_sum_methods_agree(method, num_bins):
    gen = torch.Generator().manual_seed(num_bins)
    index = torch.randint(0, num_bins, (1000,), generator=gen)
    values = torch.randn(1000, generator=gen, dtype=torch.float64)
    index = index.to(torch.uint8) if method == "bincount" else index
    expected_counts = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, index.long(),
                                                                           torch.ones(1000, dtype=torch.float64))
    expected_sums = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, index.long(), values)
    counts = bin_sum(index, num_bins, dtype=torch.float64, method=method)
    sums = bin_sum(index, num_bins, values, method=method)
    assert counts.shape == (num_bins,) and counts.dtype == torch.float64
    torch.testing.assert_close(counts, expected_counts)
    torch.testing.assert_close(sums, expected_sums)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_finite_values_give_a_nan_loss_not_an_error(dtype):
    for bad in (float("nan"), float("inf")):
        x = torch.tensor([0.1, 0.5, bad, 1.2], dtype=dtype)
        loss, info = bin_regularization(x.clone().requires_grad_(), torch.tensor(0.3, dtype=dtype), 0, 3, True)
        loss.backward()
        assert not torch.isfinite(loss) or not torch.isfinite(info).all()
        q = _quantizer(2, False, 0.3, dtype, True)
        got = []
        q.bin_stats_sink = got.append
        q(x.clone().requires_grad_())
        br, _ = loss_from_bin_stats(got[0].stats, got[0].abs_sum, got[0].numel, got[0].alpha)
        assert not torch.isfinite(br)
    with pytest.raises(ValueError, match="step size α must be a finite number > 0, got nan"):
        bin_regularization(torch.tensor([0.1, 0.5]), torch.tensor(float("nan")), -2, 1, False)


def test_batched_statistics_keep_each_tensor_layout():
    gen = torch.Generator().manual_seed(9)
    base = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    layouts = [base.to(memory_format=torch.channels_last), base.transpose(2, 3), base]  # NHWC, strided, plain
    values = [t.detach().clone(memory_format=torch.preserve_format).requires_grad_() for t in layouts]
    alpha = torch.tensor(0.4, dtype=torch.float64)
    stats, _ = bin_statistics(values, [alpha] * 3, -2, 1, False)
    grads = torch.autograd.grad(stats[:, 2].sum(), values)
    for v, g in zip(values, grads):
        (ref,) = torch.autograd.grad(_sum_of_squares(v, alpha), v)
        torch.testing.assert_close(g, ref)


def _sum_of_squares(v, alpha):
    """Σ (v - kα)² over all values (the sum of stats row 2 over bins), plain ops."""
    k = torch.clamp(torch.round(v.detach() / alpha), -2, 1)
    return ((v - k * alpha) ** 2).sum()


@pytest.mark.parametrize("qmin,qmax", [(-2, 1), (0, 3), (-1, 1)])
def test_statistics_node_matches_autograd_of_the_plain_statistics(qmin, qmax):
    """quant.bins' statistics and hand-written gradients (the quantizer's PyTorch path) against
    autograd of the plain eager statistics of regularizers.bin_reg."""
    gen = torch.Generator().manual_seed(qmax)
    v = (torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64) * 0.7).requires_grad_()
    alpha = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    stats, abs_sums = bin_statistics([v], [alpha], qmin, qmax, True)
    plain = eager_stats(v, alpha, qmin, qmax, True)
    torch.testing.assert_close(stats[0], plain.stats[0])
    torch.testing.assert_close(abs_sums[0], plain.abs_sum[0])
    weights = torch.randn(stats[0].shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((stats[0] * weights).sum(), (v, alpha))
    ref = torch.autograd.grad((plain.stats[0] * weights).sum(), (v, alpha))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r)
