"""ONNX QDQ export (run with a real onnxruntime session) and the integer weights / reference,
on tiny models and random inputs, against values worked out by hand or by slow loops."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from deploy.integer import IntegerLayer, load_integer_model, pack_codes, save_integer_model, unpack_codes
from deploy.onnx_qdq import export_onnx, grid_type, quantizer_steps, run_session, session, weight_codes
from deploy.ptq import set_step_size
from deploy.restore import build_network
from quant import QConv2d, QLinear, quantized_layers


def _network(weight_bits, act_bits, clip_value=None, seed=0, first_last_bits=8):
    """A ResNet-20 with LSQ-initialised step sizes and non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = build_network({"arch": "resnet20", "weight_bits": weight_bits, "act_bits": act_bits,
                           "first_last_bits": first_last_bits, "clip_value": clip_value})
    with torch.no_grad():
        model.train()(torch.randn(16, 3, 32, 32))  # initialises every α (LSQ) and moves the BN statistics
    return model.eval()


@pytest.mark.parametrize("grid,expected", [
    ((-2, 1), (TensorProto.INT2, False)), ((0, 3), (TensorProto.UINT2, False)),
    ((-4, 3), (TensorProto.INT8, True)), ((0, 7), (TensorProto.UINT8, True)),
    ((-8, 7), (TensorProto.INT4, False)), ((0, 15), (TensorProto.UINT4, False)), ((0, 31), (TensorProto.UINT8, True)),
    ((-128, 127), (TensorProto.INT8, False)), ((0, 255), (TensorProto.UINT8, False)),
])
def test_grid_types(grid, expected):
    assert grid_type(*grid) == expected


def test_pack_codes_by_hand():
    # 2-bit two's complement fields, first code in the low bits: -2 -> 10, -1 -> 11, 0 -> 00, 1 -> 01
    assert pack_codes(np.array([-2, -1, 0, 1]), 2).tolist() == [0b01_00_11_10]
    assert pack_codes(np.array([1, -2, -1, 0, 1]), 2).tolist() == [0b00_11_10_01, 0b01]
    assert pack_codes(np.array([-8, 7, 3]), 4).tolist() == [0x78, 0x03]
    assert pack_codes(np.array([-4, 3]), 3).tolist() == [0x3C]  # 3-bit codes in 4-bit fields
    assert pack_codes(np.array([-128, 127, -1]), 8).tolist() == [0x80, 0x7F, 0xFF]
    rng = np.random.default_rng(0)
    for bits in range(2, 9):
        codes = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), size=101)
        assert (unpack_codes(pack_codes(codes, bits), bits, 101) == codes).all()


def test_onnx_quantize_linear_rounds_and_saturates_like_lsq_by_hand():
    layer = QLinear(8, 8, bias=False, weight_bits=2, act_bits=2, act_signed=True)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(8))
    set_step_size(layer.weight_quant, 1.0)  # weight codes: the identity
    set_step_size(layer.act_quant, 0.5)
    x = torch.tensor([[-3.0, -1.25, -0.75, -0.25, 0.25, 0.75, 1.25, 9.0]])
    # x/α = -6, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 18 -> half to even, grid [-2, 1]: -2 -2 -2 0 0 2->1 2->1 1
    expected = torch.tensor([[-1.0, -1.0, -1.0, 0.0, 0.0, 0.5, 0.5, 0.5]])
    model = torch.nn.Sequential(layer).eval()
    onnx_model = export_onnx(model, x)
    assert torch.equal(run_session(session(onnx_model), x), expected)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


@pytest.mark.parametrize("weight_bits,act_bits,first_last_bits,clip_value",
                         [(2, 2, 8, None), (3, 3, 8, None), (4, 4, 8, 1.0), (2, 2, 2, None)])
def test_onnx_export_runs_in_onnxruntime_like_the_fake_quant_model(weight_bits, act_bits, first_last_bits, clip_value):
    model = _network(weight_bits, act_bits, clip_value, first_last_bits=first_last_bits)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    onnx_model = export_onnx(model, x)
    nodes = onnx_model.graph.node
    ops = [n.op_type for n in nodes]
    assert ops.count("QuantizeLinear") == 20 and ops.count("DequantizeLinear") == 40
    assert onnx_model.opset_import[0].version == 25
    types = {t.name: t.data_type for t in onnx_model.graph.initializer}
    code_type = lambda layer: next(v for k, v in types.items() if k.startswith(f"{layer}_weight_codes"))  # noqa: E731
    inner = {2: TensorProto.INT2, 3: TensorProto.INT8, 4: TensorProto.INT4}[weight_bits]
    assert code_type("layers_0_0_conv1") == inner and code_type("layers_2_2_conv2") == inner
    assert code_type("conv1") == code_type("linear") == {8: TensorProto.INT8, 2: TensorProto.INT2}[first_last_bits]
    # 19 ReLUs as in the float network; the 9 fused into a quantizer (each block's first) come from it.
    # Hardtanh (--clip-value) is never fused: 19 Max/Min pairs instead.
    fused = sum(n.op_type == "Relu" and "_input_relu" in n.name for n in nodes)
    assert (ops.count("Relu"), fused) == ((0, 0) if clip_value else (19, 9))
    assert ops.count("Min") == ops.count("Max") == (19 if clip_value else 0)
    assert ops.count("Clip") == (18 if act_bits == 3 else 0)  # 3-bit grids: uint8 and an explicit Clip
    _assert_equal_but_for_rounding_ties(model, onnx_model, x)


def _activation_codes(model, onnx_model, x):
    """Per activation quantizer of ``model``, in order: (x/α as the fake quantizer saw it, its codes, the
    codes of the exported QuantizeLinear in onnxruntime), each ``(N, ...)``; and both networks' logits."""
    seen = {}

    def keep(name, quantizer):
        def hook(_module, inputs, out):
            x_in = inputs[0].relu() if quantizer.input_relu else inputs[0]
            seen[name] = (x_in / quantizer.alpha, torch.round(out / quantizer.alpha))
        return hook

    layers = quantized_layers(model)
    handles = [layer.act_quant.register_forward_hook(keep(name, layer.act_quant)) for name, layer in layers.items()]
    with torch.no_grad():
        expected = model(x)
    for handle in handles:
        handle.remove()
    # The DequantizeLinear after each activation's QuantizeLinear, as extra graph outputs (float: code x α).
    graph = onnx.ModelProto()
    graph.CopyFrom(onnx_model)
    dequantized = {}
    for name in layers:
        q = next(n for n in graph.graph.node if n.op_type == "QuantizeLinear"
                 and n.name.startswith(name.replace(".", "_") + "_input_q"))
        dq = next(n for n in graph.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0])
        dequantized[name] = dq.output[0]
        graph.graph.output.append(onnx.helper.make_tensor_value_info(dq.output[0], TensorProto.FLOAT, None))
    outputs = session(graph).run(["logits", *dequantized.values()], {"input": x.numpy()})
    codes = {name: (*seen[name], torch.round(torch.from_numpy(out) / layers[name].act_quant.alpha))
             for name, out in zip(dequantized, outputs[1:])}
    return codes, torch.from_numpy(outputs[0]), expected


def _assert_equal_but_for_rounding_ties(model, onnx_model, x):
    """The exported network computes the fake-quant network's codes and logits, except where an activation
    sits on a rounding tie (x/α = k + 1/2 to float precision) and the two summation orders round it to
    neighbouring levels; that sample then differs from there on. Every other sample: same codes at every
    quantizer, same logits to float tolerance."""
    codes, got, expected = _activation_codes(model, onnx_model, x)
    flipped = torch.zeros(len(x), dtype=torch.bool)  # samples with a code already flipped upstream
    for name, (ratio, ours, theirs) in codes.items():
        differ = (ours != theirs) & ~flipped.view(-1, *[1] * (ours.dim() - 1))
        off_tie = (ratio[differ] - ratio[differ].floor() - 0.5).abs()
        assert not (off_tie > 1e-4).any(), f"{name}: codes differ away from a rounding tie: x/α {ratio[differ]}"
        flipped |= differ.flatten(1).any(1)
    assert not flipped.all(), "every sample met a tie: nothing left to compare"
    torch.testing.assert_close(got[~flipped], expected[~flipped], rtol=1e-5, atol=1e-5)


def _assert_logits_agree(got, expected):
    """Logits of a whole network computed another way: equal to float tolerance, except where an
    activation a float rounding away from a rounding tie took the neighbouring level (summation
    order differs between the two); that happens to a few samples at most."""
    close = ((got - expected).abs() <= 1e-5 + 1e-5 * expected.abs()).all(1)
    assert int(close.sum()) >= 0.75 * len(close), (got - expected).abs().max(1).values
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.75


@pytest.mark.parametrize("bits,input_relu", [(2, True), (3, False), (4, True), (8, False)])
def test_one_quantized_conv_in_onnxruntime_equals_the_fake_quant_conv(bits, input_relu):
    torch.manual_seed(bits)
    conv = QConv2d(8, 4, 3, 1, 1, bias=False, weight_bits=bits, act_bits=bits).eval()
    conv.act_quant.input_relu = input_relu
    x = torch.randn(4, 8, 6, 6) if input_relu else torch.rand(4, 8, 6, 6)
    model = torch.nn.Sequential(conv)
    with torch.no_grad():
        expected = model(x)  # initialises both step sizes (LSQ)
    got = run_session(session(export_onnx(model, x)), x)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), float((got - expected).abs().max())


def _quantized_conv_and_input(bits=2, channels=4, seed=0):
    torch.manual_seed(seed)
    conv = QConv2d(channels, 3, 3, 2, 1, bias=True, weight_bits=bits, act_bits=bits).eval()
    x = torch.randn(2, channels, 7, 7).relu()
    with torch.no_grad():
        conv(x)  # LSQ initialisation of both step sizes
    return conv, x


def _integer_layer(layer, x):
    steps = quantizer_steps(layer, x)
    wq, aq = layer.weight_quant, layer.act_quant
    return IntegerLayer(layer, weight_codes(layer, steps[wq]), steps[wq], steps[aq], (aq.quant_min, aq.quant_max),
                        False), steps


def test_integer_accumulator_by_hand():
    conv = QConv2d(2, 1, 1, bias=False, weight_bits=2, act_bits=2).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([0.3, -0.6]).view(1, 2, 1, 1))
    set_step_size(conv.weight_quant, 0.3)  # weight codes 1, -2
    set_step_size(conv.act_quant, 0.5)
    x = torch.tensor([1.5, 0.5]).view(1, 2, 1, 1)  # activation codes 3, 1
    layer, _ = _integer_layer(conv, x)
    acts = torch.clamp(x / layer.act_step, 0, 3).round()
    assert layer.accumulate(acts).flatten().tolist() == [3 * 1 + 1 * (-2)]
    assert layer(x).item() == pytest.approx(1 * 0.3 * 0.5, rel=1e-6)


@pytest.mark.parametrize("bits,channels,exact_dtype", [(2, 4, torch.float32), (8, 64, torch.float64)])
def test_integer_accumulator_equals_the_fake_quant_product_exactly(bits, channels, exact_dtype):
    conv, x = _quantized_conv_and_input(bits, channels)
    set_step_size(conv.weight_quant, float(conv.weight.detach().abs().max()) / (2 ** (bits - 1) - 1))  # codes up to Qp
    layer, steps = _integer_layer(conv, x)
    assert layer.exact_dtype == exact_dtype  # 2 bits: 36·2·3 < 2**24; 8 bits: 576·127·255 >= 2**24
    sa, sw = steps[conv.act_quant], steps[conv.weight_quant]
    acts = torch.clamp(x / sa, 0, 2**bits - 1).round()
    acc = layer.accumulate(acts)
    assert acc.dtype == torch.int32 and int(acc.abs().max()) > 0
    # slow obvious reference: integer sums over the 3x3 windows, in Python ints
    a, w = acts.to(torch.int64), layer.codes.to(torch.int64)
    padded = torch.nn.functional.pad(a, (1, 1, 1, 1))
    for n in range(2):
        for o in range(3):
            for i in range(4):
                for j in range(4):
                    window = padded[n, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
                    assert int(acc[n, o, i, j]) == sum(int(v) for v in (window * w[o]).flatten())
    # the fake-quant product (float64 conv of the fake-quantized tensors) divided by the scales
    with torch.no_grad():
        x_hat, w_hat = conv.act_quant(x).double(), conv.weight_quant(conv.weight).double()
        product = torch.nn.functional.conv2d(x_hat, w_hat, None, 2, 1) / (sa.double() * sw.double())
        assert torch.equal(product.round().to(torch.int32), acc)
        assert float((product - acc).abs().max()) < 0.05  # float32 rounding of x̂, ŵ: far from changing an integer
        assert torch.allclose(layer(x), conv(x), atol=1e-5, rtol=1e-5)


def test_integer_file_round_trip_and_reference_forward(tmp_path):
    model = _network(2, 2)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    steps = quantizer_steps(model, x)
    config = {"arch": "resnet20", "weight_bits": 2, "act_bits": 2, "first_last_bits": 8, "clip_value": None}
    save_integer_model(model, steps, config, tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz", allow_pickle=False) as z:
        packed = z["layers.1.0.conv2.weight_codes"]
        assert packed.dtype == np.uint8 and packed.size == 32 * 32 * 9 // 4  # four 2-bit codes to a byte
        assert "float/layers.1.0.bn2.running_var" in z.files and "float/layers.1.0.conv2.weight" not in z.files
    reference = load_integer_model(tmp_path / "m.npz")
    assert len([m for m in reference.modules() if isinstance(m, IntegerLayer) and m.integer]) == 20
    with torch.no_grad():
        _assert_logits_agree(reference(x), model(x))
    for name, layer in quantized_layers(model).items():  # the stored codes are the fake quantizer's levels
        stored = dict(reference.named_modules())[name]
        assert torch.equal(stored.codes.float() * stored.weight_step, layer.weight_quant(layer.weight).detach())
