"""Quantized layers, model conversion and activation hooks."""

import gc
import weakref

import pytest
import torch
from torch import nn

from capture import CapturingHookManager
from hooks import ActivationHookManager, BinStatsCollector
from models import build_model
from quant import QConv2d, QLinear, quantize_model, quantized_layers


def _tiny_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))


def test_quantize_model_keeps_weights_and_sets_widths():
    net = _tiny_net()
    w_before = net[2].weight.detach().clone()
    quantize_model(net, weight_bits=2, act_bits=3, first_last_bits=8)
    layers = quantized_layers(net)
    assert list(layers) == ["0", "2", "6"]
    assert isinstance(net[0], QConv2d) and isinstance(net[6], QLinear)
    assert torch.equal(net[2].weight, w_before)
    first, middle, last = layers["0"], layers["2"], layers["6"]
    assert (first.weight_quant.num_bits, first.act_quant.num_bits, first.act_quant.signed) == (8, 8, True)
    assert (middle.weight_quant.num_bits, middle.act_quant.num_bits, middle.act_quant.signed) == (2, 3, False)
    assert middle.weight_quant.signed
    assert (last.act_quant.num_bits, last.act_quant.signed, last.is_first_or_last) == (8, False, True)
    assert not middle.is_first_or_last
    names = {n for n, _ in net.named_parameters() if n.endswith("alpha")}
    assert "2.weight_quant.alpha" in names and "2.act_quant.alpha" in names


def test_first_last_32_stay_float_and_all_32_is_unchanged():
    net = quantize_model(_tiny_net(), 2, 2, first_last_bits=32)
    assert type(net[0]) is nn.Conv2d and type(net[6]) is nn.Linear and isinstance(net[2], QConv2d)
    plain = _tiny_net()
    assert quantize_model(plain, 32, 32, 32) is plain and not quantized_layers(plain)


def test_quantized_conv_matches_float_conv_of_quantized_tensors():
    torch.manual_seed(0)
    layer = QConv2d(2, 3, 3, padding=1, bias=False, weight_bits=2, act_bits=2)
    x = torch.rand(2, 2, 5, 5)
    out = layer(x)  # initialises both step sizes
    wq, aq = layer.weight_quant, layer.act_quant
    w_hat = torch.clamp(torch.round(layer.weight / wq.alpha), -2, 1) * wq.alpha
    x_hat = torch.clamp(torch.round(x / aq.alpha), 0, 3) * aq.alpha
    assert torch.allclose(out, nn.functional.conv2d(x_hat, w_hat, padding=1), atol=1e-6)


@pytest.mark.parametrize("arch", ["resnet20", "resnet18"])
def test_resnets_quantize_and_run(arch):
    model = quantize_model(build_model(arch), 2, 2)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    layers = quantized_layers(model)
    assert sum(m.is_first_or_last for m in layers.values()) == 2
    assert all(not m.act_quant.signed for m in layers.values() if not m.is_first_or_last)


def test_unknown_arch():
    with pytest.raises(ValueError, match="resnet20"):
        build_model("vgg")


def test_hooks_capture_in_training_only_and_keys_match_alpha_names():
    model = quantize_model(_tiny_net(), 2, 2)
    x = torch.randn(2, 3, 8, 8)
    with CapturingHookManager(model) as hooks:
        model.train()
        model(x)
        acts = hooks.get_pre_quant_activations()
        assert set(acts) == {"0", "2", "6"}
        assert acts["2"].shape == (2, 4, 8, 8) and acts["2"].requires_grad
        assert acts["6"].shape == (2, 4)
        alpha_layers = {n.rsplit(".act_quant.alpha", 1)[0] for n, _ in model.named_parameters()
                        if n.endswith("act_quant.alpha")}
        assert set(acts) == alpha_layers
        # the capture is the quantizer's input itself: the ReLU output
        assert torch.all(acts["2"] >= 0)
        hooks.clear()
        model.eval()
        model(x)
        assert hooks.get_pre_quant_activations() == {}
        model.train()
        with torch.no_grad():
            model(x)
        assert hooks.get_pre_quant_activations() == {}
        hooks.enabled = False
        model(x)
        assert hooks.get_pre_quant_activations() == {}
    model(x)  # hooks removed by the context manager
    assert hooks.get_pre_quant_activations() == {}


def test_bin_statistics_come_with_the_captures_and_only_while_enabled():
    model = quantize_model(_tiny_net(), 2, 2).train()
    x = torch.randn(2, 3, 8, 8)
    quantizer = quantized_layers(model)["2"].act_quant
    with CapturingHookManager(model, ["2"], bin_stats_grad_to_alpha=True) as hooks:
        assert quantizer.bin_stats_grad_to_alpha
        model(x)
        stats = hooks.get_bin_stats()["2"]
        v = hooks.get_pre_quant_activations()["2"]
        # counted independently from the captured input and the quantizer's step size
        k = torch.clamp(torch.round(v.detach() / quantizer.alpha.detach()), 0, 3)
        assert stats.stats.shape == (3, 4) and stats.numel == v.numel() and stats.quant_min == 0
        assert stats.stats[0].tolist() == [float((k == j).sum()) for j in range(4)]
        assert stats.stats.requires_grad
        hooks.enabled = False
        model(x)
        assert hooks.get_bin_stats() == {} and quantizer.bin_stats_sink is None
        hooks.enabled = True
        with torch.no_grad():
            model(x)
        assert hooks.get_bin_stats() == {}
    assert quantizer.bin_stats_sink is None  # removed: the quantizer computes no statistics


def test_clear_releases_and_a_new_forward_drops_old_captures():
    model = quantize_model(_tiny_net(), 2, 2).train()
    hooks = CapturingHookManager(model, ["2"])
    model(torch.randn(2, 3, 8, 8)).sum()  # graph dropped at once: only the hook holds the capture
    ref = weakref.ref(hooks.get_pre_quant_activations()["2"])
    hooks.clear()
    gc.collect()
    assert ref() is None
    model(torch.randn(2, 3, 8, 8))
    ref = weakref.ref(hooks.get_pre_quant_activations()["2"])
    model(torch.randn(2, 3, 8, 8))  # the next forward replaces the capture
    gc.collect()
    assert ref() is None
    with pytest.raises(KeyError, match="nope"):
        ActivationHookManager(model, ["nope"])
    hooks.remove()


def test_a_second_manager_on_the_same_quantizers_is_refused_until_the_first_is_removed():
    model = quantize_model(_tiny_net(), 2, 2).train()
    x = torch.randn(2, 3, 8, 8)
    first = ActivationHookManager(model, ["2"])
    with pytest.raises(RuntimeError, match="bin statistics of 2 are already collected"):
        ActivationHookManager(model)
    with pytest.raises(RuntimeError, match="already collected"):
        BinStatsCollector({"2": quantized_layers(model)["2"].act_quant}, grad_to_alpha=False)
    model(x)
    assert set(first.get_bin_stats()) == {"2"}  # the first still gets its statistics (A-BR not 0)
    assert first.get_bin_stats()["2"].stats[0].sum().item() == x.shape[0] * 4 * 8 * 8  # every value counted
    other = ActivationHookManager(model, ["6"])  # other quantizers: fine
    first.remove()
    second = ActivationHookManager(model, ["0", "2"])
    model(x)
    assert set(second.get_bin_stats()) == {"0", "2"} and set(other.get_bin_stats()) == {"6"}
    assert first.get_bin_stats() == {}
    second.remove()
    other.remove()
