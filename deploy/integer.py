"""Integer weights (one ``.npz`` file) and a reference forward pass in integer arithmetic.

File layout (``numpy.savez``, read with ``allow_pickle=False``):

* ``meta``: JSON text: ``format``, the network (``deploy.restore.model_config``), the input it
  expects (``input``: ``run.data.input_preprocessing()``, the normalisation of the images) and per
  quantized layer its grids (``weight_bits``, ``weight_min``/``weight_max``, ``weight_shape``,
  ``act_bits``, ``act_min``/``act_max``, ``input_relu``; ``act_from``: the activation quantizer whose
  output is the layer's input, with ``--act-quant-at relu-output``), and per activation quantizer at
  an activation's output (``activations``, ``quant.QuantAct``; relu-output only) its grid
  (``act_bits``, ``act_min``/``act_max``, ``input_relu``).
* ``<layer>.weight_codes``: the weight's integer levels, packed (``pack_codes``: two's
  complement in 2-bit fields four to a byte (1-bit binary weights: codes -1 and +1, also in 2-bit
  fields), 4-bit fields (3-4 bit grids) two to a byte, bytes for 5-8 bits), row-major.
* ``<layer>.weight_step``, ``<layer>.act_step``, ``<activation>.act_step``: float32 step sizes
  (``onnx_qdq.step_used``).
* ``float/<name>``: every other tensor in float32: BatchNorm, biases, layers at 32 bits.

``IntegerReference`` computes each layer whose weight and input are both quantized as
``acc = Σ w_code·a_code`` (an exact integer, held in int32) and ``out = acc·(α_w·α_a) + bias``:
one float rescale per layer. The fake-quantized layer computes ``Σ (w_code·α_w)(a_code·α_a)`` in
float32; the two differ only by float rounding (the scales factor out of the sum exactly in real
arithmetic: LSQ eq. 1 with a per-tensor α, or one α per output channel, which factors out of
that channel's sums: the rescale is then per output channel, ``<layer>.weight_step`` of shape ``(C,)``).

With ``--act-quant-at relu-output`` every activation's output is put on its grid by an
``IntegerActivation`` (``codes·α``, the fake quantizer's values), so residual adds add grid values and
the next block receives them; a layer that takes such an output (``act_from``) reads its codes back
exactly (``round(codes·α/α)``) and accumulates them as above, rescaled by ``α_w·α`` of that activation.
"""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deploy.onnx_qdq import ExportError, weight_codes
from deploy.restore import build_network
from quant import QuantAct, QuantizedLayer, quantized_layers
from quant.convert import inputs_on_activation_grid
from quant.grid import per_channel_view, round_to_grid
from run.data import input_preprocessing

FORMAT = 1


def field_bits(num_bits: int) -> int:
    """Width of the field a ``num_bits`` code is packed in: 2, 4 or 8 (fields never straddle bytes)."""
    return 2 if num_bits <= 2 else 4 if num_bits <= 4 else 8


def pack_codes(codes: np.ndarray, num_bits: int) -> np.ndarray:
    """Pack signed integer codes (each in ``[-2**(b-1), 2**(b-1) - 1]``) into bytes.

    Each code goes into a ``field_bits(num_bits)``-bit field in two's complement; fields fill a
    byte from the least significant bit (code ``i`` of a byte at bits ``f·i .. f·i + f - 1``),
    the last byte padded with zeros. 2-bit codes: four to a byte.

    Returns:
        uint8 array of ``ceil(n·f / 8)`` bytes.
    """
    f = field_bits(num_bits)
    per_byte = 8 // f
    fields = (codes.reshape(-1).astype(np.int64) & ((1 << f) - 1)).astype(np.uint8)
    fields = np.concatenate([fields, np.zeros(-len(fields) % per_byte, np.uint8)]).reshape(-1, per_byte)
    out = np.zeros(len(fields), np.uint8)
    for i in range(per_byte):
        out |= fields[:, i] << (f * i)
    return out


def unpack_codes(packed: np.ndarray, num_bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack_codes``: the first ``count`` signed codes, as int32."""
    f = field_bits(num_bits)
    per_byte = 8 // f
    fields = np.stack([(packed >> (f * i)) & ((1 << f) - 1) for i in range(per_byte)], axis=1).reshape(-1)[:count]
    fields = fields.astype(np.int32)
    return np.where(fields >= 1 << (f - 1), fields - (1 << f), fields).astype(np.int32)


def save_integer_model(model: nn.Module, steps: dict, model_cfg: dict, path: str) -> None:
    """Write the integer file of ``model`` (see the module docstring) to ``path``.

    Args:
        model: the fake-quantized network (``deploy.restore.build_network`` layout).
        steps: ``onnx_qdq.quantizer_steps(model, example)``.
        model_cfg: its ``deploy.restore.model_config``.
    """
    arrays, layers, activations, skip = {}, {}, {}, set()
    for name, module in model.named_modules():
        if isinstance(module, QuantAct) and module.act_quant.enabled:
            q = module.act_quant
            arrays[f"{name}.act_step"] = steps[q].numpy().astype(np.float32)
            activations[name] = {"act_bits": q.num_bits, "act_min": q.quant_min, "act_max": q.quant_max,
                                 "input_relu": bool(q.input_relu)}
    sources = inputs_on_activation_grid(model) if activations else {}
    for name, layer in quantized_layers(model).items():
        wq, aq = layer.weight_quant, layer.act_quant
        entry = {"weight_bits": wq.num_bits, "act_bits": aq.num_bits, "input_relu": bool(aq.input_relu),
                 "weight_shape": list(layer.weight.shape)}
        if not aq.enabled and name in sources:
            entry["act_from"] = sources[name]
        if wq.enabled:
            arrays[f"{name}.weight_codes"] = pack_codes(weight_codes(layer, steps[wq]).numpy(), wq.num_bits)
            arrays[f"{name}.weight_step"] = steps[wq].numpy().astype(np.float32)
            entry.update(weight_min=wq.quant_min, weight_max=wq.quant_max)
            skip.add(f"{name}.weight")
        if aq.enabled:
            arrays[f"{name}.act_step"] = steps[aq].numpy().astype(np.float32)
            entry.update(act_min=aq.quant_min, act_max=aq.quant_max)
        layers[name] = entry
    for key, value in model.state_dict().items():
        if key in skip or "_quant." in key or key.endswith("num_batches_tracked"):
            continue
        arrays[f"float/{key}"] = value.detach().float().cpu().numpy()
    meta = {"format": FORMAT, "model": model_cfg, "input": input_preprocessing(), "layers": layers}
    if activations:
        meta["activations"] = activations
    with open(path, "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta)), **arrays)


class IntegerLayer(nn.Module):
    """A quantized conv / linear computed from integer codes (see the module docstring).

    Input: the float activation ``(N, C, H, W)`` or ``(N, features)``; output as the layer's.
    With weight and input both quantized the product is integer: activation codes
    ``clamp(round(relu?(x)/α_a), Qn, Qp)`` (as the fake quantizer), ``acc = conv(a_codes, w_codes)``
    in int32, then ``acc·(α_w·α_a) + bias`` in float32. Otherwise (a 32-bit side) the float layer.

    The accumulator is computed as a convolution (or matrix product) of the integer-valued codes
    in float32 where ``K·max|w|·max|a| < 2**24`` (``K`` products per output; every 2-4 bit layer
    of the CIFAR ResNets), else in float64 (below ``2**53``): every
    product and partial sum is then an integer the type represents exactly, so the result is
    the integer sum in any summation order, what int32 accumulation gives; it is then
    converted to int32. The constructor checks ``K·max|w|·max|a| < 2**31``, so no int32
    overflow is possible.

    Raises:
        ExportError: an accumulator that could overflow int32.
    """

    def __init__(self, layer: QuantizedLayer, codes: torch.Tensor | None, weight_step: torch.Tensor | None,
                 act_step: torch.Tensor | None, act_range: tuple[int, int] | None, input_relu: bool):
        super().__init__()
        self.layer, self.input_relu = layer, input_relu
        self.codes, self.weight_step, self.act_step, self.act_range = codes, weight_step, act_step, act_range
        self.integer = codes is not None and act_step is not None
        if self.integer:
            products = codes[0].numel() * int(codes.abs().max()) * max(abs(act_range[0]), abs(act_range[1]))
            if products >= 2**31:
                raise ExportError(f"an int32 accumulator could overflow ({products} >= 2**31)")
            self.exact_dtype = torch.float32 if products < 2**24 else torch.float64
            # float32: the one rescale (per output channel with per-channel weight step sizes)
            self.scale = weight_step * act_step
            if self.scale.dim() > 0:
                self.scale = self.scale.view(1, -1, *[1] * (codes.dim() - 2))

    def accumulate(self, act_codes: torch.Tensor) -> torch.Tensor:
        """``Σ w_code·a_code`` per output, int32, for integer-valued float ``act_codes``."""
        a, w = act_codes.to(self.exact_dtype), self.codes.to(self.exact_dtype)
        conv = self.layer
        if isinstance(conv, nn.Conv2d):  # a direct convolution: products and sums, no transform
            acc = F.conv2d(a, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        else:
            acc = a @ w.t()
        return acc.to(torch.int32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_relu:
            x = torch.relu(x)
        bias = self.layer.bias
        if not self.integer:
            weight = (self.layer.weight if self.codes is None
                      else self.codes.float() * per_channel_view(self.weight_step, self.codes))
            if self.act_step is not None:
                x = round_to_grid(x / self.act_step, *self.act_range) * self.act_step
            if isinstance(self.layer, nn.Conv2d):
                return self.layer._conv_forward(x, weight, bias)
            return F.linear(x, weight, bias)
        act_codes = round_to_grid(x / self.act_step, *self.act_range)
        out = self.accumulate(act_codes).float() * self.scale
        if bias is not None:
            out = out + (bias.view(1, -1, 1, 1) if out.dim() == 4 else bias)
        return out


class IntegerActivation(nn.Module):
    """A ``quant.QuantAct`` of the integer reference: the activation, then its output on the grid,
    ``round_to_grid(x/α, Qn, Qp)·α`` (the codes times the step: the fake quantizer's values).
    Input and output: any shape."""

    def __init__(self, activation: nn.Module, step: torch.Tensor, act_range: tuple[int, int], input_relu: bool):
        super().__init__()
        self.activation, self.step, self.act_range, self.input_relu = activation, step, act_range, input_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activation(x)
        if self.input_relu:
            x = torch.relu(x)
        return round_to_grid(x / self.step, *self.act_range) * self.step


def load_integer_model(path: str) -> nn.Module:
    """The ``IntegerReference`` network of an integer file written by ``save_integer_model``.

    Returns:
        the CIFAR network with every quantized layer replaced by an ``IntegerLayer``, in eval mode.

    Raises:
        ExportError: not such a file, or its contents do not fit its own description.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop("meta")))
    except Exception as exc:  # noqa: BLE001 - any read failure means "not an integer file"
        raise ExportError(f"{path} is not an integer weights file ({type(exc).__name__}: {exc})") from None
    if meta.get("format") != FORMAT:
        raise ExportError(f"{path}: format {meta.get('format')}, this code reads format {FORMAT}")
    model = build_network(meta["model"])
    floats = {k[len("float/"):]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("float/")}
    missing, unexpected = model.load_state_dict(floats, strict=False)
    allowed = {f"{n}.weight" for n, e in meta["layers"].items() if "weight_min" in e}
    bad = [k for k in missing if k not in allowed and "_quant." not in k and not k.endswith("num_batches_tracked")]
    if bad or unexpected:
        raise ExportError(f"{path} does not fit its network (missing {bad}, unexpected {list(unexpected)})")
    modules = dict(model.named_modules())
    activations = meta.get("activations", {})
    for name, entry in activations.items():
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child,
                IntegerActivation(modules[name].activation, torch.from_numpy(arrays[f"{name}.act_step"]),
                                  (entry["act_min"], entry["act_max"]), entry["input_relu"]))
    for name, layer in quantized_layers(model).items():
        entry = meta["layers"][name]
        codes = weight_step = act_step = act_range = None
        if "weight_min" in entry:
            shape = entry["weight_shape"]
            codes = torch.from_numpy(unpack_codes(arrays[f"{name}.weight_codes"], entry["weight_bits"],
                                                  int(np.prod(shape)))).reshape(shape)
            weight_step = torch.from_numpy(arrays[f"{name}.weight_step"])
        if "act_min" in entry:
            act_step = torch.from_numpy(arrays[f"{name}.act_step"])
            act_range = (entry["act_min"], entry["act_max"])
        elif "act_from" in entry:  # its input is on that activation's grid: its codes, read back exactly
            source = entry["act_from"]
            act_step = torch.from_numpy(arrays[f"{source}.act_step"])
            act_range = (activations[source]["act_min"], activations[source]["act_max"])
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child,
                IntegerLayer(layer, codes, weight_step, act_step, act_range, entry["input_relu"]))
    return model.eval()
