"""A ReLU fused into the following LSQ quantizer (``LSQQuantizer.input_relu``) computes what
``nn.ReLU`` followed by an unfused quantizer computes: values, gradients to the input and
to α, BR's bin statistics and their gradients, α's initialisation and what the hooks see.

References: ``torch.relu`` then the unfused quantizer, on the same path (bit for bit), and
``torch.relu`` then plain autograd LSQ with the per-bin BR loop in float64 (tolerances).
"""

import pytest
import torch
from torch import nn

import quant.lsq
from quant.lsq import _LSQFakeQuantize
from capture import CapturingHookManager
from hooks import BinStatsCollector
from models import build_model
from analysis.plots import capture_activations
from quant import LSQQuantizer, integer_range, quantize_model, quantized_layers
from regularizers import BinRegularizer
from regularizers.bin_reg import loss_from_bin_stats
from test_bin_reg import _reference
from test_lsq_fused import plain_lsq


def _signed_input(shape=(3, 5, 7, 9), seed=0, scale=1.0):
    """Values of both signs (about half negative), as a BN output before the ReLU."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * scale


def _step(x, bits, input_relu, alpha=0.3, grad_to_alpha=True):
    """Quantize x (with a fused ReLU, or nn.ReLU first), A-BR from the quantizer's statistics
    plus a weighted sum of the output; returns out, stats, BR, grad to x, grad to α."""
    q = LSQQuantizer(bits, signed=False, grad_count="per_sample").train()
    with torch.no_grad():
        q.alpha.fill_(alpha)
    q.initialized.fill_(True)
    q._is_initialized = True
    q.input_relu = input_relu
    q.bin_stats_grad_to_alpha = grad_to_alpha
    got = []
    q.bin_stats_sink = got.append
    xi = x.detach().clone().requires_grad_()
    out = q(xi if input_relu else torch.relu(xi))
    (stats,) = got
    br, _ = loss_from_bin_stats(stats.stats, stats.abs_sum, stats.numel, stats.alpha)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (br + (out * weights).sum()).backward()
    return out.detach(), stats.stats.detach(), br.detach(), xi.grad, q.alpha.grad


def _assert_identical(a, b):
    for u, v in zip(a, b):
        assert torch.equal(u, v) or (u.isnan() == v.isnan()).all() and torch.equal(u[~u.isnan()], v[~v.isnan()])
        assert torch.equal(torch.signbit(u), torch.signbit(v))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])  # 4 to 256 bins: vector and scalar kernels
@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_relu_is_relu_then_quantizer_to_the_bit(bits, kernels, channels_last, monkeypatch):
    if not kernels:
        monkeypatch.setattr(quant.lsq, "kernels_apply", lambda _x: False)
    x = _signed_input(seed=bits) * 1.3
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    fused, unfused = _step(x, bits, True), _step(x, bits, False)
    _assert_identical(fused, unfused)
    assert (fused[3][x <= 0] == 0).all()  # the ReLU's gradient: nothing flows to negative inputs
    assert fused[0].is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize("bits", [2, 5])
@pytest.mark.parametrize("kernels", [True, False])
def test_any_gradient_of_the_statistics_passes_through_the_relu(bits, kernels, monkeypatch):
    # BR's loss has no gradient for Σd (row 1); another loss of the statistics would.
    if not kernels:
        monkeypatch.setattr(quant.lsq, "kernels_apply", lambda _x: False)
    qmin, qmax = integer_range(bits, False)
    x = _signed_input(seed=20 + bits)
    weights = torch.randn(3, qmax + 1, generator=torch.Generator().manual_seed(bits))
    results = []
    for fused in (True, False):
        xi = x.clone().requires_grad_()
        alpha = torch.tensor(0.3, requires_grad=True)
        out, stats, _ = _LSQFakeQuantize.apply(xi if fused else torch.relu(xi), alpha, qmin, qmax, 0.1,
                                               "to_alpha", fused)
        ((stats * weights).sum() + out.sum()).backward()
        results.append((out.detach(), stats.detach(), xi.grad, alpha.grad))
    _assert_identical(*results)
    assert (results[0][2][x <= 0] == 0).all()


@pytest.mark.parametrize("bits", [2, 5])
@pytest.mark.parametrize("grad_to_alpha", [False, True])
def test_fused_relu_matches_the_float64_reference(bits, grad_to_alpha):
    x = _signed_input(shape=(4, 3, 6, 6), seed=10 + bits)
    out, _, br, g_x, g_a = _step(x, bits, True, grad_to_alpha=grad_to_alpha)
    qmin, qmax = integer_range(bits, False)
    xi = x.double().clone().requires_grad_()
    a = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    v = torch.relu(xi)
    r_out = plain_lsq(v, a, qmin, qmax, 1.0 / (x[0].numel() * qmax) ** 0.5)
    r_br = _reference(v, a if grad_to_alpha else a.detach(), qmin, qmax)
    weights = torch.linspace(-1, 1, r_out.numel(), dtype=r_out.dtype).view_as(r_out)
    (r_br + (r_out * weights).sum()).backward()
    torch.testing.assert_close(out.double(), r_out.detach(), rtol=1e-6, atol=1e-7)
    assert br.item() == pytest.approx(r_br.item(), rel=1e-5)
    torch.testing.assert_close(g_x.double(), xi.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_a.double(), a.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kernels", [True, False])
def test_signed_zeros_infinities_nan_and_ties_as_torch_relu(kernels, monkeypatch):
    if not kernels:
        monkeypatch.setattr(quant.lsq, "kernels_apply", lambda _x: False)
    # -0 stays -0 through torch.relu, -inf becomes 0, NaN stays NaN; 0.15 / 0.3 = 0.5 is a tie.
    # 37 values: the vector loop and its scalar tail.
    special = [-0.0, 0.0, float("-inf"), -1e-30, 1e-30, 0.15, 0.45, -0.15, 0.9, 5.0]
    x = torch.tensor((special * 4)[:37])
    fused, unfused = _step(x, 2, True), _step(x, 2, False)
    _assert_identical(fused, unfused)
    with_nan = x.clone()
    with_nan[3] = float("nan")
    fused, unfused = _step(with_nan, 2, True), _step(with_nan, 2, False)
    _assert_identical(fused[:1] + fused[3:4], unfused[:1] + unfused[3:4])  # output and x-gradient
    assert fused[2].isnan() and unfused[2].isnan()  # a NaN activation makes BR NaN in both


def test_initial_step_size_comes_from_the_relu_output():
    x = _signed_input(seed=4)
    fused, plain = LSQQuantizer(2, signed=False), LSQQuantizer(2, signed=False)
    fused.input_relu = True
    fused(x), plain(torch.relu(x))
    assert fused.alpha.item() == plain.alpha.item() == pytest.approx(2 * x.relu().mean().item() / 3 ** 0.5)
    assert "input_relu=True" in repr(fused) and "input_relu" not in repr(plain)


def test_quantize_model_fuses_exactly_the_relus_that_feed_only_a_quantized_layer():
    model = quantize_model(build_model("resnet20"), 2, 2)
    fused = [name for name, m in model.named_modules()
             if isinstance(m, LSQQuantizer) and m.input_relu]
    assert fused == [f"layers.{s}.{b}.conv2.act_quant" for s in range(3) for b in range(3)]
    blocks = [b for stage in model.layers for b in stage]
    assert all(isinstance(b.act1, nn.Identity) and isinstance(b.act2, nn.ReLU) for b in blocks)
    assert isinstance(model.act1, nn.ReLU)  # the stem's ReLU also feeds the first shortcut
    assert not any(m.input_relu for m in quantize_model(build_model("resnet20"), 2, 2, fuse_relu=False).modules()
                   if isinstance(m, LSQQuantizer))
    clipped = quantize_model(build_model("resnet20", clip_value=2.0), 2, 2)  # Hardtanh: not a ReLU
    assert all(isinstance(b.act1, nn.Hardtanh) for stage in clipped.layers for b in stage)
    float_acts = quantize_model(build_model("resnet20"), 2, 32)  # no activation quantizer to fuse into
    assert all(isinstance(b.act1, nn.ReLU) for stage in float_acts.layers for b in stage)


def _train_step(model, images, labels):
    """Forward and backward with W-BR and A-BR from the quantizers' statistics, as the trainer does."""
    layers = {n: m for n, m in quantized_layers(model).items() if not m.is_first_or_last}
    weights = BinStatsCollector({n: m.weight_quant for n, m in layers.items()}, grad_to_alpha=True)
    hooks = CapturingHookManager(model, layers, bin_stats_grad_to_alpha=True)
    logits = model(images)
    br_w, _ = BinRegularizer(2, signed=True).total_from_stats(weights.get())
    br_a, _ = BinRegularizer(2, signed=False).total_from_stats(hooks.get_bin_stats())
    loss = nn.functional.cross_entropy(logits, labels) + br_w + 0.1 * br_a
    captures = {n: t.detach() for n, t in hooks.get_pre_quant_activations().items()}
    loss.backward()
    hooks.remove()
    weights.remove()
    return loss.detach(), captures, {n: p.grad for n, p in model.named_parameters()}


def test_fused_network_trains_as_the_unfused_one():
    torch.manual_seed(0)
    images, labels = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    results = []
    for fuse in (True, False):
        torch.manual_seed(1)
        model = quantize_model(build_model("resnet20"), 2, 2, fuse_relu=fuse).train()
        results.append(_train_step(model, images, labels) + (capture_activations(model, ["layers.0.1.conv2"],
                                                                                 images),))
    (loss_f, caps_f, grads_f, hist_f), (loss_u, caps_u, grads_u, hist_u) = results
    assert torch.equal(loss_f, loss_u)
    assert caps_f.keys() == caps_u.keys() and all(torch.equal(caps_f[n], caps_u[n]) for n in caps_u)
    assert (caps_f["layers.0.1.conv2"] >= 0).all()
    assert grads_f.keys() == grads_u.keys()
    assert all(torch.equal(grads_f[n], grads_u[n]) for n in grads_u), "gradients differ"
    assert (hist_f["layers.0.1.conv2"] == hist_u["layers.0.1.conv2"]).all()


@pytest.mark.parametrize("fused", [True, False])
def test_double_backward_matches_the_pytorch_path(fused, monkeypatch):
    # A gradient penalty: the kernels' gradient has no history, so create_graph takes the PyTorch ops.
    def penalty_gradient():
        torch.manual_seed(0)
        x0, w = torch.randn(2, 8), torch.randn(2, 8, requires_grad=True)
        q = LSQQuantizer(3, signed=False, grad_count="per_sample").train()
        q.input_relu = fused
        q.initialize_from(torch.ones(1))
        x = x0.clone().requires_grad_()
        out = q(x if fused else torch.relu(x))
        g_x, = torch.autograd.grad((out * w).sum(), x, create_graph=True)
        g_w, = torch.autograd.grad((g_x ** 2).sum(), w)
        c = torch.relu(x0) / q.alpha.detach()
        return g_w, 2 * w.detach() * ((c > 0) & (c < 7))  # d/dw of Σ (w·STE mask)²
    kernel_path, expected = penalty_gradient()
    monkeypatch.setattr(quant.lsq, "kernels_apply", lambda _x: False)
    eager_path, _ = penalty_gradient()
    assert torch.equal(kernel_path, eager_path)
    torch.testing.assert_close(kernel_path, expected)
