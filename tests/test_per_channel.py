"""Per-channel weight step sizes (``--per-channel-weights``): one α per output channel.

Hand-worked values for the initialisation, LSQ's gradients and the BR of each channel, the
batched statistics against the per-tensor code applied to each channel alone, checkpoints of
the other kind, the CLI and the exports.
"""

import json
import math

import pytest
import torch

from conftest import TINY, run_cli
from deploy.integer import IntegerLayer
from deploy.onnx_qdq import export_onnx, quantizer_steps, run_session, session, weight_codes
from deploy.ptq import quantize_post_training
from hooks import BinStatsCollector
from quant import LSQQuantizer, QConv2d, QLinear, quantize_model
from reference_bins import bin_statistics
from regularizers import BinRegularizer, bin_regularization, weight_bin_stats
from regularizers.bin_reg import loss_from_bin_stats

# Two output channels of three weights each (a Linear(3, 2) weight).
W = [[0.1, -0.2, 0.3], [1.2, -2.0, 0.5]]
ALPHA = [0.2, 1.0]


def _weight_quantizer(bits=2, alpha=ALPHA, dtype=torch.float32):
    q = LSQQuantizer(bits, signed=True, grad_count="numel", channels=2).to(dtype)
    q.load_state_dict({"alpha": torch.tensor(alpha), "initialized": torch.tensor(True),
                       "grid": torch.tensor([bits, 1])})
    return q


def test_initialisation_per_channel_by_hand():
    q = LSQQuantizer(2, signed=True, grad_count="numel", channels=2)
    q(torch.tensor(W))
    # LSQ: 2·mean|w_c|/sqrt(Qp), Qp = 1 at 2 bits signed: 2·0.2, 2·3.7/3
    torch.testing.assert_close(q.alpha.detach(), torch.tensor([0.4, 7.4 / 3]))
    binary = LSQQuantizer(1, signed=True, grad_count="numel", channels=2)
    binary(torch.tensor(W).view(2, 1, 1, 3))
    torch.testing.assert_close(binary.alpha.detach(), torch.tensor([0.2, 3.7 / 3]))  # mean|w_c|
    assert q.grad_scale(torch.zeros(2, 3)) == pytest.approx(1 / math.sqrt(3 * 1))  # N = weights per channel


def test_a_zero_channel_takes_the_tensor_wide_step_size():
    q = LSQQuantizer(2, signed=True, grad_count="numel", channels=2)
    q(torch.tensor([[0.0, 0.0], [0.5, -1.5]]))
    # channel 0 has no magnitude: the tensor's 2·mean|w| = 2·0.5 instead of 0
    torch.testing.assert_close(q.alpha.detach(), torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_ste_and_alpha_gradient_per_channel_by_hand(dtype):
    q = _weight_quantizer(dtype=dtype)
    w = torch.tensor(W, dtype=dtype, requires_grad=True)
    out = q(w)
    out.backward(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=dtype))
    # channel 0, α 0.2: w/α = 0.5, -1, 1.5 -> 0 (half to even), -1, 1 (clamped to Qp)
    # channel 1, α 1.0: w/α = 1.2, -2, 0.5 -> 1, -2, 0
    torch.testing.assert_close(out.detach(), torch.tensor([[0.0, -0.2, 0.2], [1.0, -2.0, 0.0]], dtype=dtype))
    assert w.grad.tolist() == [[1, 2, 0], [0, 0, 6]]  # STE inside -2 < w/α < 1
    # LSQ eq. 3 per channel, g = 1/sqrt(3·1): (0 - 0.5)·1 + (-1 + 1)·2 + 1·3 = 2.5; 1·4 - 2·5 + (0 - 0.5)·6 = -9
    torch.testing.assert_close(q.alpha.grad, torch.tensor([2.5, -9.0], dtype=dtype) / math.sqrt(3))


# BR per channel, 2 bits signed, α = (0.2, 1.0); every non-empty bin holds one weight:
#   channel 0: targets 0, -0.2, 0.2 -> d = 0.1, 0, 0.1: loss 0.01 + 0 + 0.01 = 0.02
#   channel 1: targets 1, -2, 0     -> d = 0.2, 0, 0.5: loss 0.04 + 0 + 0.25 = 0.29
#   layer = 0.31; ∂/∂w = 2d/n; ∂/∂α_c = Σ_bins -2k·Σd/n: channel 0: -2·1·0.1; channel 1: -2·1·0.2 (level 0: nothing)
BR_LOSS, BR_GRAD_W, BR_GRAD_ALPHA = 0.31, [[0.2, 0.0, 0.2], [0.4, 0.0, 1.0]], [-0.2, -0.4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bin_regularization_per_channel_by_hand_in_the_quantizer(dtype):
    q = _weight_quantizer(dtype=dtype)
    got = []
    q.bin_stats_sink, q.bin_stats_grad_to_alpha = got.append, True
    w = torch.tensor(W, dtype=dtype, requires_grad=True)
    q.train()(w)
    (stats,) = got
    assert stats.stats.shape == (2, 3, 4)  # (channels, count/Σd/Σd², bins)
    total, info = BinRegularizer(2, signed=True).total_from_stats({"layer": stats})
    total.backward()
    assert total.item() == pytest.approx(BR_LOSS, rel=1e-6)
    torch.testing.assert_close(w.grad, torch.tensor(BR_GRAD_W, dtype=dtype))
    torch.testing.assert_close(q.alpha.grad, torch.tensor(BR_GRAD_ALPHA, dtype=dtype))
    per = info["per_tensor"]["layer"]
    assert per[2].item() == 3 + 3  # non-empty bins, summed over channels
    # mean distance to the level in steps, averaged over channels: (0.2/3)/0.2 and (0.7/3)/1.0
    assert per[3].item() == pytest.approx(((0.2 / 3) / 0.2 + (0.7 / 3) / 1.0) / 2, rel=1e-6)


def test_bin_regularizer_per_channel_equals_each_channel_alone():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64).requires_grad_()
    alpha = torch.tensor([0.3, 0.5, 0.2, 0.7], dtype=torch.float64, requires_grad=True)
    reg = BinRegularizer(2, signed=True)
    total, _ = reg.compute_total_loss({"w": w}, {"w": alpha}, backprop_to_alpha=True)
    grads = torch.autograd.grad(total, [w, alpha])
    alone = sum(reg.loss(w[c], alpha[c], True)[0] for c in range(4))  # the per-tensor code, one channel at a time
    ref = torch.autograd.grad(alone, [w, alpha])
    assert total.item() == pytest.approx(alone.item(), rel=1e-12)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r)


def test_weight_bin_metrics_per_channel_by_hand():
    stats, bins = weight_bin_stats(torch.tensor(W), torch.tensor(ALPHA), -2, 1, None)
    assert bins.tolist() == [[2, 1, 3], [3, 0, 2]]  # level - Qn
    assert stats["dist_alpha"] == pytest.approx((0.5 + 0 + 0.5 + 0.2 + 0 + 0.5) / 6, rel=1e-6)
    assert stats["occupancy"] == pytest.approx([1 / 6, 1 / 6, 2 / 6, 2 / 6])


def test_layers_and_conversion_give_one_step_size_per_output_channel():
    conv = QConv2d(3, 5, 3, weight_bits=2, act_bits=2, per_channel_weights=True)
    linear = QLinear(4, 7, weight_bits=2, act_bits=2, per_channel_weights=True)
    assert conv.weight_quant.alpha.shape == (5,) and linear.weight_quant.alpha.shape == (7,)
    assert conv.act_quant.alpha.shape == ()  # activations stay per tensor
    model = quantize_model(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 6, 1)),
                           2, 2, 8, per_channel_weights=True)
    assert [m.weight_quant.alpha.shape for m in model if isinstance(m, QConv2d)] == [(4,), (6,)]


def test_step_size_count_counts_each_channels_step_size():
    """--evaluate's "N step sizes (α)" of a per-channel ResNet-20: by hand, one weight α per output channel of
    the stem (16), 6 convs each of widths 16, 32, 64 and the classifier (10), plus 20 activation α."""
    from deploy.restore import step_size_count
    from models import build_model
    model = quantize_model(build_model("resnet20"), 2, 2, 8, per_channel_weights=True)
    assert step_size_count(model) == 16 + 6 * (16 + 32 + 64) + 10 + 20
    assert step_size_count(quantize_model(build_model("resnet20"), 2, 2, 8)) == 40  # per tensor: 2 per layer


def test_a_state_of_the_other_kind_is_refused_naming_both():
    per_tensor = QConv2d(3, 4, 1, weight_bits=2, act_bits=2)
    per_channel = QConv2d(3, 4, 1, weight_bits=2, act_bits=2, per_channel_weights=True)
    with pytest.raises(RuntimeError, match=r"weight_quant: the state has one step size per tensor, "
                                           r"this quantizer one per output channel \(4\)"):
        per_channel.load_state_dict(per_tensor.state_dict())
    with pytest.raises(RuntimeError, match=r"the state has one step size per output channel \(4\), "
                                           r"this quantizer one per tensor"):
        per_tensor.load_state_dict(per_channel.state_dict())


def test_statistics_need_positive_finite_step_sizes_in_every_channel():
    with pytest.raises(ValueError, match="step size α must be a finite number > 0, got 0"):
        bin_statistics([torch.ones(2, 3)], [torch.tensor([0.5, 0.0])], -2, 1, False)


def test_loss_from_per_channel_statistics_is_the_sum_over_channels():
    stats = torch.zeros(2, 3, 2)
    stats[0, :, 0] = torch.tensor([2.0, 0.1, 0.5])  # channel 0, bin 0: n 2, Σd² 0.5 -> 0.25
    stats[1, :, 1] = torch.tensor([4.0, 0.0, 1.0])  # channel 1, bin 1: n 4, Σd² 1.0 -> 0.25
    loss, _ = loss_from_bin_stats(stats, torch.zeros(2), 6, torch.ones(2))
    assert loss.tolist() == [0.25, 0.25]


def _trained_layers(per_channel: bool):
    torch.manual_seed(0)
    model = quantize_model(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 5, 3),
                                               torch.nn.ReLU(), torch.nn.Conv2d(5, 6, 1)),
                           2, 2, 8, per_channel_weights=per_channel)
    model.train()(torch.randn(2, 3, 8, 8))  # LSQ initialisation
    return model


def test_w_br_in_training_is_the_sum_of_each_channels_br():
    model = _trained_layers(per_channel=True)
    inner = model[2]  # the one low-bit layer (first and last stay at 8 bits)
    collector = BinStatsCollector({"inner": inner.weight_quant}, grad_to_alpha=True)
    model(torch.randn(2, 3, 8, 8))
    loss, _ = BinRegularizer(2, signed=True).total_from_stats(collector.get())
    grads = torch.autograd.grad(loss, [inner.weight, inner.weight_quant.alpha])
    collector.remove()
    # independent path: the per-tensor code on each channel with that channel's α, summed
    alone = sum(bin_regularization(inner.weight[c], inner.weight_quant.alpha[c], -2, 1, True)[0] for c in range(5))
    ref = torch.autograd.grad(alone, [inner.weight, inner.weight_quant.alpha])
    assert loss.item() == pytest.approx(alone.item(), rel=1e-5)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_onnx_and_integer_export_per_channel(layer):
    torch.manual_seed(1)
    if layer == "conv":
        q = QConv2d(4, 3, 3, 1, 1, bias=True, weight_bits=2, act_bits=2, per_channel_weights=True).eval()
        x = torch.rand(2, 4, 5, 5)
    else:
        q = QLinear(6, 3, bias=True, weight_bits=4, act_bits=2, per_channel_weights=True).eval()
        x = torch.rand(2, 6)
    with torch.no_grad():
        q.weight[0] *= 10  # channels of very different scales
        expected = q(x)  # initialises both quantizers
    model = torch.nn.Sequential(q).eval()
    torch.testing.assert_close(run_session(session(export_onnx(model, x)), x), expected, rtol=1e-5, atol=1e-5)
    steps = quantizer_steps(model, x)
    codes = weight_codes(q, steps[q.weight_quant])
    integer = IntegerLayer(q, codes, steps[q.weight_quant], steps[q.act_quant], (0, 3), False)
    with torch.no_grad():
        torch.testing.assert_close(integer(x), expected, rtol=1e-5, atol=1e-5)
    # codes times each channel's step are the fake quantizer's weights
    w_hat = codes.float() * steps[q.weight_quant].view(-1, *[1] * (codes.dim() - 1))
    assert torch.equal(w_hat, q.weight_quant(q.weight).detach())


def test_ptq_gives_each_channel_its_own_mse_step_size():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 3, 3),
                                torch.nn.ReLU(), torch.nn.Conv2d(3, 2, 1))
    with torch.no_grad():
        model[2].weight[1] *= 5
    weights = model[2].weight.detach().clone()
    quantize_post_training(model, 1, 2, 8, [torch.randn(2, 3, 8, 8)], seed=0, per_channel_weights=True)
    # binary weights: every value's level is its sign whatever α is, so the MSE-optimal α is mean|w_c|
    torch.testing.assert_close(model[2].weight_quant.alpha.detach(), weights.abs().mean((1, 2, 3)), rtol=1e-4, atol=0)


def test_cli_per_channel_run_evaluate_and_export(shared_folder, tmp_path, capsys):
    rc, out, _ = run_cli(["--per-channel-weights", "--dry-run", "--data-dir", shared_folder, "--no-download"],
                         capsys)
    assert rc == 0 and "Weight step sizes: one α per output channel (--per-channel-weights)" in out
    assert "_pcw_s42" in out  # the default run folder says so
    run = tmp_path / "run"
    rc, out, err = run_cli(TINY + ["--per-channel-weights", "--train-subset", "20", "--data-dir", shared_folder,
                                   "--output-dir", run], capsys)
    assert rc == 0, err
    if "Kernels: fused CPU kernels" in out:  # where the kernels are built: the banner says what does not use them
        assert "; weights per channel: PyTorch ops" in out
    with open(run / "config.json") as f:
        config = json.load(f)
    assert config["flags"]["per_channel_weights"] and config["derived"]["weight_step_sizes"] == "per output channel"
    state = torch.load(run / "last.pt", weights_only=True)["model"]
    assert state["layers.0.0.conv1.weight_quant.alpha"].shape == (16,)
    with open(run / "metrics.jsonl") as f:
        last = [json.loads(line) for line in f][-1]
    alpha = last["alpha"]["layers.0.0.conv1"]
    assert alpha["weight_min"] <= alpha["weight"] <= alpha["weight_max"]
    rc, out, err = run_cli(["--evaluate", run / "last.pt", "--workers", "0"], capsys)
    assert rc == 0, err
    assert f"{last['test_acc']:.2f}%" in out  # rebuilt per channel from the checkpoint's own configuration
    import export
    assert export.main([str(run / "last.pt"), "--out", str(tmp_path / "export"), "--workers", "0"]) == 0
