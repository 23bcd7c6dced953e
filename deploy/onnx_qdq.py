"""ONNX export of a fake-quantized network in the QDQ format, and running it with onnxruntime.

Every enabled ``LSQQuantizer`` becomes ``QuantizeLinear`` -> ``DequantizeLinear`` with scale =
the step size α and zero point 0, in the ONNX integer type of its grid: opset 25's int2/uint2
(saturating at [-2, 1] / [0, 3], LSQ's 2-bit grids), int4/uint4 and int8/uint8. QuantizeLinear
computes ``saturate(round(x / scale))`` with round half to even, which is exactly
``clamp(round(x/α), Qn, Qp)`` of the fake quantizer (``torch.round`` also rounds half to even;
clamping before or after rounding to integer bounds gives the same level). Other grids (3, 5, 6,
7 bits, and 1-bit unsigned activations ``[0, 1]``) use int8/uint8 with an explicit ``Clip`` to
``[Qn·α, Qp·α]`` first. Binary weights (``--num-bits-weight 1``, ``quant.grid``) are int8 codes ±1
with scale α; a binary activation quantizer (1 bit, signed) is refused (``ExportError``). Weights are stored
as integer initializers (their codes) followed by ``DequantizeLinear`` (per-axis, ``axis`` the output
channel, with ``--per-channel-weights``). A fused ReLU
(``input_relu``) is a ``Relu`` in front of the ``QuantizeLinear``. BatchNorm stays a float
``BatchNormalization``.

The network is traced with ``torch.fx`` (quantized layers and quantizers as leaves) and its
nodes translated one by one; an operation without a translation raises ``ExportError``.
"""

from __future__ import annotations

import json
import operator

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import fx, nn

from quant import LSQQuantizer, QuantizedLayer, step_size_quantizers
from quant.grid import per_channel_view, round_to_grid
from run.data import input_preprocessing

#: ONNX opset of the export (int2/uint2 arrived in opset 25).
OPSET = 25

#: ONNX integer types for quantized tensors, narrowest first: (type, min, max).
INTEGER_TYPES = ((TensorProto.INT2, -2, 1), (TensorProto.UINT2, 0, 3), (TensorProto.INT4, -8, 7),
                 (TensorProto.UINT4, 0, 15), (TensorProto.INT8, -128, 127), (TensorProto.UINT8, 0, 255))


class ExportError(ValueError):
    """The model holds something the exporter cannot translate; the message names it."""


def grid_type(quant_min: int, quant_max: int) -> tuple[int, bool]:
    """``(ONNX element type, clip needed)`` for the integer grid ``[quant_min, quant_max]``: the type
    whose saturation range is the grid (2, 4, 8 bits), else int8/uint8 with an explicit Clip
    (onnxruntime 1.32 fails to create a session where a Clip feeds a QuantizeLinear of a 4-bit
    type: its Clip/Q fusion does not know them)."""
    signed = quant_min < 0
    for onnx_type, lo, hi in INTEGER_TYPES:
        if (lo, hi) == (quant_min, quant_max):
            return onnx_type, False
    for onnx_type, lo, hi in INTEGER_TYPES[-2:]:  # 3, 5, 6, 7 bits: int8/uint8 and an explicit Clip
        if (lo < 0) == signed and lo <= quant_min and quant_max <= hi:
            return onnx_type, True
    raise ExportError(f"no ONNX integer type holds the grid [{quant_min}, {quant_max}]")


def step_used(quantizer: LSQQuantizer, shape: torch.Size) -> torch.Tensor:
    """The float32 step the fake quantizer multiplies by for an input of ``shape``, shape ``()`` (``(C,)``
    for one step size per output channel).

    ``LSQQuantizer.effective_step``, which can differ from α in the last bit: the export's levels are
    the fake quantizer's bit for bit.
    """
    return quantizer.effective_step(torch.empty(shape, device="meta")).float()


def quantizer_steps(model: nn.Module, example: torch.Tensor) -> dict[LSQQuantizer, torch.Tensor]:
    """``step_used`` of every enabled quantizer of ``model``, from the shapes one forward pass of
    ``example`` (a batch of inputs) gives them.

    Raises:
        ExportError: a quantizer never initialised (no step size yet), or one the pass never reached.
    """
    quantizers = step_size_quantizers(model)
    for name, q in quantizers.items():
        if not bool(q.initialized):
            raise ExportError(f"quantizer {name} was never initialised: the model has no step size there")
    shapes, handles = {}, []

    def record(quantizer, args):
        shapes.setdefault(quantizer, args[0].shape)

    for q in quantizers.values():
        handles.append(q.register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in handles:
            h.remove()
    missing = [name for name, q in quantizers.items() if q not in shapes]
    if missing:
        raise ExportError(f"quantizers never used in the forward pass: {', '.join(missing)}")
    return {q: step_used(q, shapes[q]) for q in quantizers.values()}


def weight_codes(layer: QuantizedLayer, step: torch.Tensor) -> torch.Tensor:
    """The integer levels of a layer's weight, ``clamp(round(w/step), Qn, Qp)`` as int32 (the fake
    quantizer's levels: ``codes·step`` is its output bit for bit; binary weights: -1 and +1,
    ``quant.grid.round_to_grid``)."""
    q = layer.weight_quant
    weight = layer.weight.detach().float()
    return round_to_grid(weight / per_channel_view(step, weight), q.quant_min, q.quant_max).to(torch.int32)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QuantizedLayer, LSQQuantizer)) or super().is_leaf_module(m, qualname)


class _GraphBuilder:
    def __init__(self, steps: dict):
        self.steps, self.nodes, self.inits, self.count = steps, [], [], 0
        #: DequantizeLinear output -> (the tensor its QuantizeLinear took, scale, zero point, hint)
        self.dequantized: dict[str, tuple[str, str, str, str]] = {}

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, hint: str, value, onnx_type=None) -> str:
        name = self.name(hint)
        if onnx_type is None:
            self.inits.append(onnx.numpy_helper.from_array(np.asarray(value), name))
        elif onnx_type in (TensorProto.INT8, TensorProto.UINT8):  # raw bytes, one per value
            dtype = np.int8 if onnx_type == TensorProto.INT8 else np.uint8
            self.inits.append(onnx.numpy_helper.from_array(np.asarray(value).astype(dtype), name))
        else:  # 2- and 4-bit types: onnx packs them (two or four values to a byte)
            array = np.asarray(value)
            self.inits.append(helper.make_tensor(name, onnx_type, list(array.shape), array.reshape(-1).tolist()))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def float_tensor(self, hint: str, t: torch.Tensor) -> str:
        return self.const(hint, t.detach().float().cpu().numpy())

    def quantize(self, q: LSQQuantizer, x: str, hint: str) -> str:
        """Q -> DQ of an activation (with the fused ReLU and, for grids narrower than their type, a Clip)."""
        if not q.enabled:
            return x
        if q.binary:  # QuantizeLinear rounds to the nearest integer: it has no sign-like rounding
            raise ExportError(f"{hint}: a binary (1-bit signed, {{-α, +α}}) activation quantizer has no ONNX QDQ "
                              f"form; only weights may be binary (--num-bits-weight 1)")
        if q.input_relu:
            x = self.op("Relu", [x], f"{hint}_relu")
        step = self.steps[q]
        onnx_type, clip = grid_type(q.quant_min, q.quant_max)
        scale = self.float_tensor(f"{hint}_scale", step)
        zero = self.const(f"{hint}_zero_point", np.zeros((), np.int32), onnx_type)
        if clip:
            x = self.op("Clip", [x, self.float_tensor(f"{hint}_lo", q.quant_min * step),
                                 self.float_tensor(f"{hint}_hi", q.quant_max * step)], f"{hint}_clip")
        codes = self.op("QuantizeLinear", [x, scale, zero], f"{hint}_q")
        out = self.op("DequantizeLinear", [codes, scale, zero], f"{hint}_dq")
        self.dequantized[out] = (x, scale, zero, hint)
        return out

    def slice_input(self, x: str) -> tuple[str, callable]:
        """Where a Slice of ``x`` goes: onto a dequantized tensor's own QuantizeLinear input, then
        quantized again with the same scale (returned as the function that does it), since
        onnxruntime 1.32 moves a Slice that follows a DequantizeLinear onto the integer codes and
        then rejects its 2-bit types (``--act-quant-at relu-output``: ResNet's option-A shortcut
        subsamples a quantized block output). Slicing commutes with the elementwise quantization,
        so the values are the same; any other ``x`` is sliced as it is."""
        if x not in self.dequantized:
            return x, lambda y: y
        source, scale, zero, hint = self.dequantized[x]

        def requantize(y: str) -> str:
            codes = self.op("QuantizeLinear", [y, scale, zero], f"{hint}_slice_q")
            return self.op("DequantizeLinear", [codes, scale, zero], f"{hint}_slice_dq")
        return source, requantize

    def weight(self, layer: nn.Module, hint: str, transpose: bool = False) -> str:
        """The layer's weight (``transpose``: as ``(in, out)``): DQ of its integer codes, or float."""
        q = getattr(layer, "weight_quant", None)
        if q is None or not q.enabled:
            w = layer.weight.detach()
            return self.float_tensor(f"{hint}_weight", w.t() if transpose else w)
        step = self.steps[q]
        onnx_type, _ = grid_type(q.quant_min, q.quant_max)
        codes = weight_codes(layer, step)
        codes = self.const(f"{hint}_weight_codes", (codes.t() if transpose else codes).numpy(), onnx_type)
        scale = self.float_tensor(f"{hint}_weight_scale", step)
        zero = self.const(f"{hint}_weight_zero_point", np.zeros(tuple(step.shape), np.int32), onnx_type)
        # per channel: a scale per output channel, on axis 0 of a conv weight (1 of a transposed linear one)
        axis = {"axis": 1 if transpose else 0} if step.dim() > 0 else {}
        return self.op("DequantizeLinear", [codes, scale, zero], f"{hint}_weight_dq", **axis)

    def module(self, m: nn.Module, x: str, hint: str) -> str:
        if isinstance(m, LSQQuantizer):
            return self.quantize(m, x, hint)
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise ExportError(f"{hint}: only zero padding given as numbers is exported")
            x = self.quantize(m.act_quant, x, f"{hint}_input") if isinstance(m, QuantizedLayer) else x
            inputs = [x, self.weight(m, hint)] + ([self.float_tensor(f"{hint}_bias", m.bias)]
                                                  if m.bias is not None else [])
            ph, pw = m.padding
            return self.op("Conv", inputs, hint, kernel_shape=list(m.kernel_size), strides=list(m.stride),
                           pads=[ph, pw, ph, pw], dilations=list(m.dilation), group=m.groups)
        if isinstance(m, nn.Linear):
            x = self.quantize(m.act_quant, x, f"{hint}_input") if isinstance(m, QuantizedLayer) else x
            # MatMul (+ Add), not Gemm: onnxruntime 1.32 fuses a bias-less Gemm between 2-bit Q/DQ
            # pairs into a QGemm that rejects int2/uint2 (an invalid graph at session creation).
            out = self.op("MatMul", [x, self.weight(m, hint, transpose=True)], hint)
            return out if m.bias is None else self.op("Add", [out, self.float_tensor(f"{hint}_bias", m.bias)],
                                                      f"{hint}_bias_add")
        if isinstance(m, nn.BatchNorm2d):
            ones = torch.ones_like(m.running_mean)
            scale = m.weight if m.affine else ones
            bias = m.bias if m.affine else torch.zeros_like(ones)
            return self.op("BatchNormalization", [x, self.float_tensor(f"{hint}_scale", scale),
                                                  self.float_tensor(f"{hint}_bias", bias),
                                                  self.float_tensor(f"{hint}_mean", m.running_mean),
                                                  self.float_tensor(f"{hint}_var", m.running_var)],
                           hint, epsilon=float(m.eps))
        if isinstance(m, nn.ReLU):
            return self.op("Relu", [x], hint)
        if isinstance(m, nn.Hardtanh):
            # Max then Min, not Clip: onnxruntime 1.32 fails to create a session where a Clip feeds a
            # QuantizeLinear of a 2/4-bit type (its Clip/Q fusion does not know them).
            low = self.op("Max", [x, self.const(f"{hint}_min", np.float32(m.min_val))], f"{hint}_max")
            return self.op("Min", [low, self.const(f"{hint}_max", np.float32(m.max_val))], hint)
        if isinstance(m, nn.Identity):
            return x
        if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)):
            return self.op("GlobalAveragePool", [x], hint)
        raise ExportError(f"{hint}: no ONNX translation for {type(m).__name__}")

    def function(self, node: fx.Node, args: list, rank: int) -> str:
        target = node.target
        if target in (operator.add, torch.add):
            return self.op("Add", args[:2])
        if target in (F.relu, torch.relu):
            return self.op("Relu", args[:1])
        if target is torch.flatten and tuple(args[1:]) in ((1,), (1, -1)) and not node.kwargs:
            return self.op("Flatten", args[:1], axis=1)
        if target is F.pad and node.kwargs.get("mode", "constant") == "constant" and len(args) == 2:
            pad = list(args[1])
            begins, ends = [0] * rank, [0] * rank
            for i in range(len(pad) // 2):  # torch: (last dim begin, last dim end, second-to-last ...)
                begins[rank - 1 - i], ends[rank - 1 - i] = pad[2 * i], pad[2 * i + 1]
            value = float(node.kwargs.get("value", 0.0) or 0.0)
            return self.op("Pad", [args[0], self.const("pads", np.array(begins + ends, np.int64)),
                                   self.const("pad_value", np.float32(value))], mode="constant")
        if target is operator.getitem and isinstance(args[1], tuple) and all(isinstance(s, slice) for s in args[1]):
            axes, starts, ends, steps = [], [], [], []
            for axis, s in enumerate(args[1]):
                if s != slice(None):
                    axes.append(axis)
                    starts.append(0 if s.start is None else s.start)
                    ends.append(np.iinfo(np.int64).max if s.stop is None else s.stop)
                    steps.append(1 if s.step is None else s.step)
            if not axes:
                return args[0]
            source, requantize = self.slice_input(args[0])
            return requantize(self.op("Slice", [source] + [self.const(n, np.array(v, np.int64)) for n, v in
                                                           (("starts", starts), ("ends", ends), ("axes", axes),
                                                            ("steps", steps))]))
        raise ExportError(f"no ONNX translation for {node.format_node()}")


def export_onnx(model: nn.Module, example: torch.Tensor, steps: dict | None = None) -> onnx.ModelProto:
    """The ONNX (opset 25, QDQ) translation of a (fake-quantized) CIFAR network.

    Args:
        model: a network of ``models`` after ``quant.quantize_model`` (or float), weights loaded.
        example: an input batch ``(N, 3, H, W)``, to fix the input's image shape and the step
            sizes' gradient scales; the batch dimension stays symbolic (``N``).
        steps: ``quantizer_steps(model, example)`` when the caller has them already.

    Returns:
        the model, checked with ``onnx.checker`` (input ``input``, normalised as
        ``run.data.input_preprocessing()`` says, which the input's doc_string and the model's
        metadata ``preprocessing`` (JSON) record; output ``logits``).

    Raises:
        ExportError: an operation or quantizer the exporter cannot translate.
    """
    model = model.eval()
    steps = quantizer_steps(model, example) if steps is None else steps
    preprocessing = input_preprocessing()
    with torch.no_grad():
        out_shape = model(example[:1]).shape  # only the logits' shape after N is used
    graph = _Tracer().trace(model)
    modules = dict(model.named_modules())
    builder = _GraphBuilder(steps)
    names: dict[fx.Node, str] = {}
    rank = example.dim()
    inputs = []
    for node in graph.nodes:
        args = [names.get(a, a) if isinstance(a, fx.Node) else a for a in node.args]
        if node.op == "placeholder":
            names[node] = "input"
            inputs.append(helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *example.shape[1:]],
                                                        doc_string=f"normalised images: {preprocessing['formula']}, "
                                                                   f"mean {preprocessing['mean']}, "
                                                                   f"std {preprocessing['std']}"))
        elif node.op == "call_module":
            names[node] = builder.module(modules[node.target], args[0], node.target.replace(".", "_"))
        elif node.op == "call_function":
            names[node] = builder.function(node, args, rank)
        elif node.op == "output":
            builder.op("Identity", [args[0]])
        else:
            raise ExportError(f"no ONNX translation for {node.format_node()}")
    builder.nodes[-1].output[0] = "logits"
    graph_proto = helper.make_graph(builder.nodes, "cifar10_qat_br", inputs,
                                    [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", *out_shape[1:]])],
                                    builder.inits)
    onnx_model = helper.make_model(graph_proto, opset_imports=[helper.make_opsetid("", OPSET)],
                                   producer_name="cifar10-qat-br")
    onnx_model.ir_version = helper.find_min_ir_version_for(onnx_model.opset_import)
    helper.set_model_props(onnx_model, {"preprocessing": json.dumps(preprocessing)})
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model


def session(onnx_model: onnx.ModelProto):
    """An onnxruntime ``InferenceSession`` (CPU) of ``onnx_model``."""
    import onnxruntime as ort
    return ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])


def run_session(sess, x: torch.Tensor) -> torch.Tensor:
    """Logits ``(N, classes)`` of an onnxruntime session for inputs ``x`` ``(N, 3, H, W)``."""
    return torch.from_numpy(sess.run(["logits"], {"input": x.detach().float().cpu().numpy()})[0])
