"""MobileNetV2 for CIFAR-10 (--arch mobilenetv2): architecture, quantizer layout, BR coverage, CLI and export.

Expected values are worked out from the architecture (Sandler et al. 2018, table 2, with the CIFAR
stride changes), or taken from torchvision's independent implementation.
"""

import json

import pytest
import torch
import torchvision
from torch import nn

from conftest import run_cli
from run.config import build_parser, resolve_defaults
from engine import Trainer
from models import build_model
from models.mobilenetv2 import MobileNetV2
from quant import quantize_model, quantized_layers
from regularizers.bin_reg import bin_regularization

#: (t, c, n, s) of table 2 with the second stage at stride 1: 1 + 2 + 3 + 4 + 3 + 3 + 1 = 17 blocks.
BLOCKS = 17
#: Blocks with an expansion conv: all but the first (t = 1).
EXPANDED = [f"blocks.{i}" for i in range(1, BLOCKS)]
#: Stride 1 and in == out channels: the 2nd block of the 24-stage, 2nd-3rd of the 32, 2nd-4th of the 64,
#: 2nd-3rd of the 96 and of the 160 stage.
RESIDUAL = {2, 4, 5, 7, 8, 9, 11, 12, 14, 15}
#: Each block's output (channels, height = width) for a 32x32 input: stride 1 until the 32-channel stage.
BLOCK_OUTPUTS = ([(16, 32)] + [(24, 32)] * 2 + [(32, 16)] * 3 + [(64, 8)] * 4 + [(96, 8)] * 3 + [(160, 4)] * 3
                 + [(320, 4)])


def test_parameter_count_is_imagenet_mobilenetv2_with_a_ten_class_head():
    # MobileNetV2 1.0 has 3,504,872 parameters with 1000 classes; its head is 1280·1000 + 1000.
    expected = 3_504_872 - (1280 * 1000 + 1000) + (1280 * 10 + 10)
    assert sum(p.numel() for p in build_model("mobilenetv2").parameters()) == expected == 2_236_682


def test_same_function_as_torchvision_mobilenet_v2_with_the_cifar_strides():
    torch.manual_seed(0)
    reference = torchvision.models.mobilenet_v2(num_classes=10)
    reference.features[0][0].stride = (1, 1)  # the stem
    reference.features[2].conv[1][0].stride = (1, 1)  # the depthwise conv of the 24-stage's first block
    ours = build_model("mobilenetv2")
    theirs, mine = reference.state_dict(), ours.state_dict()
    assert [v.shape for v in theirs.values()] == [v.shape for v in mine.values()]
    with torch.no_grad():  # random BN statistics, so that every BN does something
        for m in reference.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    ours.load_state_dict(dict(zip(mine, reference.state_dict().values())))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference.eval()(x)
        got = ours.eval()(x)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4), float((got - expected).abs().max())


def test_block_shapes_strides_and_residuals():
    model = build_model("mobilenetv2").eval()
    blocks = list(model.blocks)
    assert len(blocks) == BLOCKS
    assert {i for i, b in enumerate(blocks) if b.use_residual} == RESIDUAL
    assert blocks[0].expand_conv is None and all(b.expand_conv is not None for b in blocks[1:])
    assert all(isinstance(m, nn.ReLU6) for m in model.modules() if isinstance(m, nn.Hardtanh))
    shapes = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape))) for b in blocks]
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    for h in hooks:
        h.remove()
    assert shapes == [(2, c, s, s) for c, s in BLOCK_OUTPUTS]
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == BLOCKS and all(m.groups == m.in_channels == m.out_channels for m in depthwise)


def test_clip_value_replaces_relu6():
    model = build_model("mobilenetv2", clip_value=1.0)
    clips = [m for m in model.modules() if isinstance(m, nn.Hardtanh)]
    # stem, expansion (16 blocks), depthwise (17 blocks), last 1x1 conv
    assert len(clips) == 1 + 16 + 17 + 1
    assert all(type(m) is nn.Hardtanh and (m.min_val, m.max_val) == (0.0, 1.0) for m in clips)


def test_quantizers_bits_and_signs():
    model = quantize_model(build_model("mobilenetv2"), weight_bits=2, act_bits=3, first_last_bits=8)
    layers = quantized_layers(model)
    # stem + 2 convs in block 0 + 3 in each of 16 blocks + last 1x1 conv + linear
    assert len(layers) == 1 + 2 + 3 * 16 + 1 + 1 == 53
    assert not any(isinstance(m, nn.Conv2d) and not hasattr(m, "weight_quant") for m in model.modules())
    edges = {n for n, m in layers.items() if m.is_first_or_last}
    assert edges == {"conv1", "linear"}
    for name in edges:
        assert (layers[name].weight_quant.num_bits, layers[name].act_quant.num_bits) == (8, 8)
    inner = {n: m for n, m in layers.items() if n not in edges}
    assert all((m.weight_quant.num_bits, m.weight_quant.signed, m.act_quant.num_bits) == (2, True, 3)
               for m in inner.values())
    # signed inputs: the image, each expansion conv (its input is the previous block's linear
    # bottleneck output), the last 1x1 conv (the last block's); all others follow a ReLU6
    signed = {n for n, m in layers.items() if m.act_quant.signed}
    assert signed == {"conv1", "conv2"} | {f"{b}.expand_conv" for b in EXPANDED}
    assert layers["blocks.0.dw_conv"].act_quant.signed is False  # the stem's ReLU6 output
    assert (layers["blocks.0.dw_conv"].act_quant.quant_min, layers["blocks.0.dw_conv"].act_quant.quant_max) == (0, 7)
    assert (layers["blocks.1.expand_conv"].act_quant.quant_min,
            layers["blocks.1.expand_conv"].act_quant.quant_max) == (-4, 3)
    assert sum(m.groups > 1 for m in inner.values()) == BLOCKS  # every depthwise conv is quantized
    assert not any(m.act_quant.input_relu for m in layers.values())  # ReLU6 is never fused


def test_a_block_after_the_stem_with_expansion_has_an_unsigned_expansion_input():
    model = quantize_model(MobileNetV2(settings=((2, 8, 2, 1),), stem_width=8, last_width=16), 2, 2)
    signed = {n for n, m in quantized_layers(model).items() if m.act_quant.signed}
    assert signed == {"conv1", "blocks.1.expand_conv", "conv2"}


def _trainer(*flags):
    cfg = build_parser().parse_args(["--arch", "mobilenetv2", "--device", "cpu", *flags])
    resolve_defaults(cfg)
    torch.manual_seed(0)
    model = quantize_model(build_model("mobilenetv2"), 2, 2)
    return Trainer(cfg, model, None, None, torch.device("cpu")), model


def test_weight_and_activation_br_cover_every_low_bit_layer():
    trainer, model = _trainer("--lambda-br-act", "1")
    low_bit = {n for n, m in quantized_layers(model).items() if not m.is_first_or_last}
    assert len(low_bit) == 51
    signed = model.blocks[1].expand_conv
    captured = []
    signed.act_quant.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    model.train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    _, _, _, br_w, br_a, w_info, a_info = trainer.forward_losses(x, y, use_br=True)
    assert set(w_info["per_tensor"]) == set(a_info["per_tensor"]) == low_bit
    assert br_w > 0 and br_a > 0
    # A-BR of a signed input is on its own grid [-2, 1] (the eager BR formulation as the reference)
    alpha = signed.act_quant.alpha.detach()
    info = a_info["per_tensor"]["blocks.1.expand_conv"]
    on_signed_grid = bin_regularization(captured[0], alpha, -2, 1, False)[0]
    on_unsigned_grid = bin_regularization(captured[0], alpha, 0, 3, False)[0]
    assert float(info[0] + info[1]) == pytest.approx(float(on_signed_grid), rel=1e-4)
    assert float(on_signed_grid) != pytest.approx(float(on_unsigned_grid), rel=1e-2)
    assert (captured[0] < 0).any()  # the linear bottleneck output is negative in places


#: A small configuration (14 quantized layers, 12 of them low-bit) with every kind of block: t = 1 with a
#: residual, t = 2 with and without one, stride 2.
SMALL = dict(settings=((1, 8, 1, 1), (2, 8, 2, 1), (2, 16, 1, 2)), stem_width=8, last_width=16)


@pytest.fixture
def small_mobilenetv2(monkeypatch):
    """``--arch mobilenetv2`` builds ``SMALL`` in the training script and in the export (the full network
    takes a minute there on two shared cores; its layout is tested above)."""
    import cifar10_qat_br
    import deploy.restore
    import export
    import models
    real = models.build_model

    def build(arch, num_classes=10, clip_value=None):
        if arch == "mobilenetv2":
            return MobileNetV2(**SMALL, num_classes=num_classes, clip_value=clip_value)
        return real(arch, num_classes, clip_value)

    for module in (cifar10_qat_br, deploy.restore, export):
        monkeypatch.setattr(module, "build_model", build)


def test_one_step_cli_run_and_export(small_mobilenetv2, shared_folder, tmp_path, capsys):
    out = tmp_path / "run"
    rc, stdout, err = run_cli(["--arch", "mobilenetv2", "--data-dir", shared_folder, "--output-dir", out,
                               "--epochs", "1", "--warmup-epochs", "0", "--train-subset", "16", "--batch-size", "16",
                               "--workers", "0", "--no-download", "--lambda-br-act", "1"], capsys)
    assert rc == 0, err
    assert "Model: mobilenetv2" in stdout and "ReLU6" in stdout and "Quantized layers: 14" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["flags"]["arch"] == "mobilenetv2"
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert row["stage"] == 2 and row["br_w"] > 0 and row["br_a"] > 0
    import export
    rc = export.main([str(out / "last.pt"), "--out", str(tmp_path / "exp"), "--workers", "0"])
    _, err = capsys.readouterr()
    report = json.loads((tmp_path / "exp" / "export.json").read_text())
    assert rc == 0, err
    assert report["checks_passed"] and report["model"].startswith("mobilenetv2 W2A2")
    assert report["onnx_top1"] == report["pytorch_top1"]


@pytest.mark.parametrize("bits", [2, 4])
def test_onnx_export_of_a_small_mobilenetv2_runs_like_the_fake_quant_model(bits):
    from onnx import TensorProto

    from deploy.onnx_qdq import export_onnx, run_session, session
    torch.manual_seed(0)
    model = quantize_model(MobileNetV2(**SMALL), bits, bits)
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 32, 32))  # initialises every α and moves the BN statistics
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    onnx_model = export_onnx(model, x)
    nodes = onnx_model.graph.node
    ops = [n.op_type for n in nodes]
    # 14 quantized layers: stem, block 0 (t = 1: dw, project), blocks 1-3 (expand, dw, project), conv2, linear
    assert ops.count("QuantizeLinear") == 14 and ops.count("DequantizeLinear") == 28
    assert ops.count("Add") == 3 + 1  # blocks 0-2 (stride 1, 8 -> 8 channels); the linear's bias
    assert sorted(n.attribute[[a.name for a in n.attribute].index("group")].i for n in nodes
                  if n.op_type == "Conv") == [1] * 9 + [8, 16, 16, 16]  # depthwise: 8 (block 0), then 2·8
    types = {t.name: t.data_type for t in onnx_model.graph.initializer}
    signed_type, unsigned_type = {2: (TensorProto.INT2, TensorProto.UINT2),
                                  4: (TensorProto.INT4, TensorProto.UINT4)}[bits]
    zero_types = [types[n.input[2]] for n in nodes if n.op_type == "QuantizeLinear"]
    # signed inputs: the 8-bit image, blocks 1-3's expansion convs and conv2; the 8-bit linear's is unsigned
    assert sorted(zero_types) == sorted([TensorProto.INT8, TensorProto.UINT8] + [signed_type] * 4
                                        + [unsigned_type] * 8)
    with torch.no_grad():
        expected = model(x)
    got = run_session(session(onnx_model), x)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), float((got - expected).abs().max())
