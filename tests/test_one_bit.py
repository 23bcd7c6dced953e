"""1-bit quantization: binary weights {-α, +α} and unsigned activations {0, α} (quant/grid.py).

Hand-worked values for both grids (forward, STE, LSQ's α gradient, initialisation, BR loss and
its gradients), a plain autograd reference on random data, the fused CPU kernels against the
PyTorch path, the CLI and the exports.
"""

import math

import numpy as np
import pytest
import torch

import quant.lsq
from conftest import TINY, run_cli
from deploy.integer import load_integer_model, save_integer_model
from deploy.onnx_qdq import ExportError, export_onnx, quantizer_steps, run_session, session, weight_codes
from deploy.ptq import mse_step_size, set_step_size
from quant import LSQQuantizer, QConv2d, integer_range
from quant.grid import round_to_grid
from quant.grid import describe_grid
from quant.lsq import lsq_fake_quantize
from regularizers import BinRegularizer, weight_bin_stats
from regularizers.bin_reg import loss_from_bin_stats
from test_bin_stats import _quantizer, _quantizer_step
from test_export import _assert_logits_agree, _network

# Binary grid, α = 0.5: x/α = [-2, -0.6, 0, 0.4, 1, 1.8] -> levels [-1, -1, +1, +1, +1, +1] (0 goes to +α)
BINARY_X = [-1.0, -0.3, 0.0, 0.2, 0.5, 0.9]
# 1-bit unsigned, α = 0.5: x/α = [0, 0.4, 0.5, 0.6, 1, 1.6] -> round half to even, clamp [0, 1]: 0 0 0 1 1 1
UNSIGNED_X = [0.0, 0.2, 0.25, 0.3, 0.5, 0.8]

DTYPES = [torch.float32, torch.float64]  # float32 on the CPU: the fused kernels; float64: PyTorch ops


def test_one_bit_grids():
    assert integer_range(1, signed=True) == (-1, 1)
    assert integer_range(1, signed=False) == (0, 1)
    assert describe_grid(1, True) == "1-bit binary {-1, +1}"
    assert describe_grid(1, False) == "1-bit unsigned [0, 1]"
    c = torch.tensor([-5.0, -1.0, -0.2, -0.0, 0.0, 0.3, 1.0, 7.0, float("nan"), float("-inf")])
    levels = round_to_grid(c, -1, 1)
    assert levels[:8].tolist() == [-1, -1, -1, 1, 1, 1, 1, 1] and math.isnan(levels[8]) and levels[9] == -1
    assert round_to_grid(torch.tensor([-0.6, 0.4, 0.5, 0.6, 3.0]), 0, 1).tolist() == [0, 0, 0, 1, 1]


@pytest.mark.parametrize("dtype", DTYPES)
def test_binary_forward_ste_and_alpha_gradient_by_hand(dtype):
    x = torch.tensor(BINARY_X, dtype=dtype, requires_grad=True)
    alpha = torch.tensor(0.5, requires_grad=True)
    g = 1 / math.sqrt(6 * 1)  # LSQ's g = 1/sqrt(N·Qp), Qp = 1
    out = lsq_fake_quantize(x, alpha, -1, 1, g)
    out.backward(torch.arange(1.0, 7.0, dtype=dtype))
    assert out.tolist() == [-0.5, -0.5, 0.5, 0.5, 0.5, 0.5]
    # STE inside the open clip range -1 < x/α < 1 only
    assert x.grad.tolist() == [0, 2, 3, 4, 0, 0]
    # LSQ eq. 3 on the grid: level - x/α inside, ±1 outside:
    # -1·1 + (-1 + 0.6)·2 + (1 - 0)·3 + (1 - 0.4)·4 + 1·5 + 1·6 = 14.6
    assert alpha.grad.item() == pytest.approx(14.6 * g, rel=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unsigned_one_bit_forward_ste_and_alpha_gradient_by_hand(dtype):
    x = torch.tensor(UNSIGNED_X, dtype=dtype, requires_grad=True)
    alpha = torch.tensor(0.5, requires_grad=True)
    g = 1 / math.sqrt(6)
    out = lsq_fake_quantize(x, alpha, 0, 1, g)
    out.backward(torch.arange(1.0, 7.0, dtype=dtype))
    assert out.tolist() == [0, 0, 0, 0.5, 0.5, 0.5]
    assert x.grad.tolist() == [0, 2, 3, 4, 0, 0]  # 0 < x/α < 1
    # 0·1 + (0 - 0.4)·2 + (0 - 0.5)·3 + (1 - 0.6)·4 + 1·5 + 1·6 = 10.3
    assert alpha.grad.item() == pytest.approx(10.3 * g, rel=1e-6)


def test_initialisation_and_gradient_scale_of_both_grids():
    w = LSQQuantizer(1, signed=True, grad_count="numel")
    w(torch.tensor(BINARY_X))
    assert w.binary and w.alpha.item() == pytest.approx(2.9 / 6)  # mean|x|, the L2-optimal binary scale
    assert w.grad_scale(torch.zeros(4, 3, 3, 3)) == pytest.approx(1 / math.sqrt(108))
    a = LSQQuantizer(1, signed=False, grad_count="per_sample")
    a(torch.tensor([[0.0, 0.2, 0.4], [0.6, 0.8, 1.0]]))
    assert not a.binary and a.alpha.item() == pytest.approx(2 * 0.5 / 1)  # LSQ: 2·mean|x|/sqrt(Qp)
    assert a.grad_scale(torch.zeros(2, 3)) == pytest.approx(1 / math.sqrt(3))


def _plain_reference(x, alpha, quant_min, quant_max, g):
    """Plain autograd: the grid's level with a straight-through gradient, clamp, gradient scale g."""
    scaled = alpha * g
    a = ((alpha - scaled).detach() + scaled).to(x.dtype)
    c = torch.clamp(x / a, quant_min, quant_max)
    return ((round_to_grid(c.detach(), quant_min, quant_max) - c).detach() + c) * a


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_plain_autograd_on_random_inputs(signed, dtype):
    qmin, qmax = integer_range(1, signed)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 7, 7, generator=gen, dtype=dtype)
    x = x if signed else x.relu()
    grad_out = torch.randn(x.shape, generator=gen, dtype=dtype)
    results = []
    for fn in (lsq_fake_quantize, _plain_reference):
        xi, ai = x.clone().requires_grad_(), torch.tensor(0.61, requires_grad=True)
        out = fn(xi, ai, qmin, qmax, 0.05)
        out.backward(grad_out)
        results.append((out.detach(), xi.grad, ai.grad))
    (f_out, f_gx, f_ga), (p_out, p_gx, p_ga) = results
    assert torch.equal(f_out, p_out)
    torch.testing.assert_close(f_gx, p_gx)
    torch.testing.assert_close(f_ga, p_ga, rtol=1e-5, atol=1e-6)


# BR on the binary grid, α = 0.5, levels ±0.5:
#   bin -1: {-1.0, -0.3}, d = {-0.5, 0.2}: n 2, Σd -0.3, Σd² 0.29
#   bin +1: {0, 0.2, 0.5, 0.9}, d = {-0.5, -0.3, 0, 0.4}: n 4, Σd -0.4, Σd² 0.5
#   loss = 0.29/2 + 0.5/4 = 0.27; ∂/∂x = 2d/n; ∂/∂α = Σ_k (2 Σd)(-k)/n_k = -0.3 + 0.2 = -0.1
BINARY_BR = (0.27, [-0.5, 0.2, -0.25, -0.15, 0.0, 0.2], -0.1)
# BR on the 1-bit unsigned grid, α = 0.5, levels 0 and 0.5:
#   bin 0: {0, 0.2, 0.25}, d = {0, 0.2, 0.25}: n 3, Σd² 0.1025;
#   bin 1: {0.3, 0.5, 0.8}, d = {-0.2, 0, 0.3}: Σd 0.1, Σd² 0.13
#   loss = (0.1025 + 0.13)/3 = 0.0775; ∂/∂α = 0 (level 0) + 2·0.1·(-1)/3
UNSIGNED_BR = (0.0775, [0.0, 0.4 / 3, 0.5 / 3, -0.4 / 3, 0.0, 0.6 / 3], -0.2 / 3)


@pytest.mark.parametrize("signed,values,expected", [(True, BINARY_X, BINARY_BR), (False, UNSIGNED_X, UNSIGNED_BR)])
def test_bin_regularization_by_hand(signed, values, expected):
    loss_ref, grad_x_ref, grad_alpha_ref = expected
    v = torch.tensor(values, requires_grad=True)
    alpha = torch.tensor(0.5, requires_grad=True)
    loss, info = BinRegularizer(1, signed).compute_total_loss({"w": v}, {"w": alpha}, backprop_to_alpha=True)
    loss.backward()
    assert loss.item() == pytest.approx(loss_ref, rel=1e-6)
    torch.testing.assert_close(v.grad, torch.tensor(grad_x_ref))
    assert alpha.grad.item() == pytest.approx(grad_alpha_ref, rel=1e-5)
    assert info["total"][2].item() == 2  # both bins occupied


def test_bin_metrics_of_binary_weights_by_hand():
    # |d| = 0.5, 0.2, 0.5, 0.3, 0, 0.4 (levels ±0.5): mean 1.9/6, in steps of α = 0.5
    stats, bins = weight_bin_stats(torch.tensor(BINARY_X), torch.tensor(0.5), -1, 1, None)
    assert bins.tolist() == [0, 0, 1, 1, 1, 1]
    assert stats["dist_alpha"] == pytest.approx(1.9 / 6 / 0.5, rel=1e-6)
    assert stats["occupancy"] == pytest.approx([2 / 6, 4 / 6])
    flipped, _ = weight_bin_stats(-torch.tensor(BINARY_X), torch.tensor(0.5), -1, 1, bins)
    # -x: bins [1, 1, 1, 0, 0, 0] (-0.0 goes to +α, like 0.0): every bin flips except the zero's
    assert flipped["flips"] == pytest.approx(5 / 6)


@pytest.mark.parametrize("signed,values,expected", [(True, BINARY_X, BINARY_BR), (False, UNSIGNED_X, UNSIGNED_BR)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantizer_bin_statistics_by_hand(signed, values, expected, dtype):
    """The statistics the quantizer computes in its own pass (kernels for float32, PyTorch for float64)."""
    loss_ref, grad_x_ref, grad_alpha_ref = expected
    q = _quantizer(1, signed, 0.5, dtype, grad_to_alpha=True)
    got = []
    q.bin_stats_sink = got.append
    x = torch.tensor(values, dtype=dtype).view(1, 6).requires_grad_()
    q(x)
    loss, _ = loss_from_bin_stats(got[0].stats, got[0].abs_sum, got[0].numel, got[0].alpha)
    loss.backward()  # only BR: the quantizer's output is not used
    assert loss.item() == pytest.approx(loss_ref, rel=1e-6)
    torch.testing.assert_close(x.grad.view(-1), torch.tensor(grad_x_ref, dtype=dtype))
    assert q.alpha.grad.item() == pytest.approx(grad_alpha_ref, rel=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("signed", [True, False])
def test_fused_kernels_match_the_pytorch_path(signed, channels_last, monkeypatch):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(3, 5, 7, 9, generator=gen)
    x = (x if signed else x.relu()) * 1.7
    x[0, 0, 0, :3] = torch.tensor([0.0, -0.0, 0.3])  # zeros (binary: +α) and a value on the level
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    fused = _quantizer_step(x, 1, signed, True)
    monkeypatch.setattr(quant.lsq, "kernels_apply", lambda _x: False)
    eager = _quantizer_step(x, 1, signed, True)
    assert torch.equal(fused[0], eager[0])
    assert fused[1].item() == pytest.approx(eager[1].item(), rel=1e-5)
    torch.testing.assert_close(fused[2], eager[2])
    torch.testing.assert_close(fused[3], eager[3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused[4], eager[4], rtol=1e-4, atol=1e-6)


def test_cli_banner_and_a_tiny_w1a1_run(shared_folder, tmp_path, capsys):
    rc, out, _ = run_cli(["--num-bits", "1", "--dry-run", "--data-dir", shared_folder, "--no-download",
                          "--output-dir", tmp_path / "dry"], capsys)
    assert rc == 0
    assert "Bits: W1A1 (weights 1-bit binary {-α, +α}, activations 1-bit {0, α}); first/last layers 8-bit" in out
    rc, out, err = run_cli(TINY + ["--num-bits", "1", "--train-subset", "20", "--data-dir", shared_folder,
                                   "--output-dir", tmp_path / "run"], capsys)
    assert rc == 0, err
    assert (tmp_path / "run" / "last.pt").exists()


def _binary_conv(act_bits=1):
    torch.manual_seed(0)
    conv = QConv2d(4, 3, 3, 1, 1, bias=True, weight_bits=1, act_bits=act_bits).eval()
    x = torch.rand(2, 4, 5, 5)
    with torch.no_grad():
        conv(x)  # initialises both step sizes
    return conv, x


def test_binary_weights_export_as_plus_minus_one_codes(tmp_path):
    conv, x = _binary_conv()
    model = torch.nn.Sequential(conv).eval()
    steps = quantizer_steps(model, x)
    codes = weight_codes(conv, steps[conv.weight_quant])
    assert torch.equal(codes, torch.where(conv.weight < 0, -1, 1).to(torch.int32))
    with torch.no_grad():
        expected = model(x)
    got = run_session(session(export_onnx(model, x)), x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_w1a1_network_in_onnxruntime_and_the_integer_reference(tmp_path):
    model = _network(1, 1)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x)
    _assert_logits_agree(run_session(session(export_onnx(model, x)), x), expected)
    steps = quantizer_steps(model, x)
    config = {"arch": "resnet20", "weight_bits": 1, "act_bits": 1, "first_last_bits": 8, "clip_value": None}
    save_integer_model(model, steps, config, tmp_path / "m.npz")
    reference = load_integer_model(tmp_path / "m.npz")
    with torch.no_grad():
        _assert_logits_agree(reference(x), expected)
    stored = dict(reference.named_modules())["layers.1.0.conv2"]
    assert set(stored.codes.unique().tolist()) == {-1, 1}  # binary codes, two bits each in the file


def test_a_binary_activation_quantizer_is_refused_by_the_onnx_export():
    conv = QConv2d(4, 3, 3, 1, 1, bias=False, weight_bits=2, act_bits=1, act_signed=True).eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        conv(x)
    with pytest.raises(ExportError, match="binary .* activation quantizer has no ONNX QDQ form"):
        export_onnx(torch.nn.Sequential(conv), x)


def test_ptq_step_size_of_binary_weights_is_the_mean_magnitude():
    # the level of every value is its sign whatever α is, so the MSE is minimal at α = mean|x|
    x = torch.tensor(BINARY_X)
    assert mse_step_size(x, -1, 1) == pytest.approx(2.9 / 6, rel=1e-4)
    q = LSQQuantizer(1, signed=True)
    set_step_size(q, 0.25)
    assert np.allclose(q(x).detach().numpy(), [-0.25, -0.25, 0.25, 0.25, 0.25, 0.25])
